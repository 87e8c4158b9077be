"""The accuracy gate run on the device: a variant against FP32, on the manifest's validation set.

A self-test vector of one input catches a corrupted file or a broken kernel, not a variant that
is 22 points less accurate on this CPU than on the build host. So a variant whose accuracy was not
shown for this device's instruction-set family (``agent.isa``; the verdicts are in
``Variant.isa_gates``) is gated here, before it may be chosen: FP32 and the variant run over the
signed validation set in the inference worker (:func:`predict`), both are scored against the truth,
and :func:`agent.accuracy.compare` applies the model's own ``[gate]`` thresholds, exactly as the
build host's gate does.

``agent.isa.proof_needed`` is the rule for which variants are gated here; :func:`predict` and
:func:`judge_predictions` are shared with ``deploy.gate``, which runs them to gate lower families on
the build host, so both sides compute one thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from agent.accuracy import (
    SegmentationScorer,
    ValidationSamples,
    Verdict,
    argmax_agreement,
    classification_metrics,
    compare,
)
from agent.modelspec import ModelSpec

__all__ = ["CLASSIFICATION_BATCH", "judge_predictions", "predict", "score"]

#: slices per backend call when gating a classifier (the batch-size invariance is the build
#: gate's business; 8 keeps 240 slices at 30 calls)
CLASSIFICATION_BATCH = 8

Run = Callable[[np.ndarray], np.ndarray]


def predict(run: Run, samples: ValidationSamples, spec: ModelSpec) -> list[np.ndarray]:
    """What the model predicts for each sample: logits (K,) per slice for a classifier (batches of
    :data:`CLASSIFICATION_BATCH`), an argmax label map (uint8, the input's grid) per volume for a
    segmentation model (the agent's own sliding window, the spec's patch and overlap)."""
    if spec.task == "classification":
        out: list[np.ndarray] = []
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


def score(samples: ValidationSamples, predictions: Sequence[np.ndarray], spec: ModelSpec) -> dict[str, object]:
    """Metrics of ``predictions`` against the set's truth: ``classification_metrics`` or the
    ``SegmentationScorer`` summary."""
    if spec.task == "classification":
        labels = [int(np.argmax(p)) for p in predictions]
        return classification_metrics([int(t) for t in samples.truth], labels, spec.labels)
    scorer = SegmentationScorer(spec.labels)
    for i, (pred, truth) in enumerate(zip(predictions, samples.truth, strict=True)):
        scorer.add(np.asarray(pred), np.asarray(truth), str(i))
    return scorer.summary()


def judge_predictions(samples: ValidationSamples, reference: Sequence[np.ndarray], variant: Sequence[np.ndarray],
                      spec: ModelSpec) -> Verdict:
    """The gate's verdict on ``variant``'s predictions against FP32's (``reference``), both on
    ``samples``: metric drops and argmax agreement within ``spec.gate``."""
    if spec.task == "classification":
        agreement = argmax_agreement([np.asarray([np.argmax(p)]) for p in reference],
                                     [np.asarray([np.argmax(p)]) for p in variant])
    else:
        agreement = argmax_agreement(list(reference), list(variant))
    return compare(spec.task, score(samples, reference, spec), score(samples, variant, spec), agreement, spec.gate)
