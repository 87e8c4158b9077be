"""The accuracy gate run on the device: a variant against FP32, on the manifest's validation set.

A self-test vector of one input catches a corrupted file or a broken kernel, not a variant that
is 22 points less accurate on this CPU than on the build host. So a variant whose accuracy was not
shown for this device's instruction-set family (``agent.core.isa``; the verdicts are in
``Variant.isa_gates``) is gated here, before it may be chosen: FP32 and the variant run over the
signed validation set in the inference worker (``agent.inference.validation.predict``), both are
scored against the truth, and :func:`agent.core.accuracy.compare` applies the model's own ``[gate]`` thresholds, exactly as the
build host's gate does.

``agent.core.isa.proof_needed`` is the rule for which variants are gated here; ``predict`` and
:func:`judge_predictions` are shared with ``deploy.gate``, which runs them to gate lower families on
the build host, so both sides compute one thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.core.accuracy import (
    SegmentationScorer,
    ValidationSamples,
    Verdict,
    argmax_agreement,
    classification_metrics,
    compare,
)
from agent.core.modelspec import ModelSpec

__all__ = ["judge_predictions", "score"]


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
