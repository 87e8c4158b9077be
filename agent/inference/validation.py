"""What a model predicts for a validation set, run in the inference worker.

``predict(run, samples, spec)`` -> logits (K,) per slice for a classifier, an argmax label map per
volume for a segmentation model (the agent's own sliding window with the spec's patch and overlap).
The device's accuracy gate (``agent.variants.device_gate``) judges these predictions against FP32's;
``deploy.gate`` runs the same function on the build host, so both sides compute one thing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from agent.core.accuracy import ValidationSamples
from agent.core.modelspec import ModelSpec

__all__ = ["CLASSIFICATION_BATCH", "Run", "predict"]

#: slices per backend call when gating a classifier (the batch-size invariance is the build
#: gate's business; 8 keeps 240 slices at 30 calls)
CLASSIFICATION_BATCH = 8

Run = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def predict(run: Run, samples: ValidationSamples, spec: ModelSpec) -> list[npt.NDArray[np.generic]]:
    """What the model predicts for each sample: logits (K,) per slice for a classifier (batches of
    :data:`CLASSIFICATION_BATCH`), an argmax label map (uint8, the input's grid) per volume for a
    segmentation model."""
    if spec.task == "classification":
        out: list[npt.NDArray[np.generic]] = []
        for i in range(0, len(samples.inputs), CLASSIFICATION_BATCH):
            batch = np.stack(samples.inputs[i:i + CLASSIFICATION_BATCH]).astype(np.float32)
            out.extend(np.asarray(run(batch), dtype=np.float32))
        return out
    from agent.imaging.sliding_window import sliding_window_inference

    if spec.input.patch_size is None:
        raise ValueError(f"{spec.name}: a segmentation model without input.patch_size cannot be gated")
    patch = (spec.input.patch_size[0], spec.input.patch_size[1], spec.input.patch_size[2])
    return [np.argmax(sliding_window_inference(x, patch, spec.input.overlap, run), axis=0).astype(np.uint8)
            for x in samples.inputs]
