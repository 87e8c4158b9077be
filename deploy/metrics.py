"""Accuracy metrics for the reference models: segmentation Dice and volumes, classification scores.

Pure numpy, no torch: the evaluator (``deploy.evaluate``), the training scripts and the quantization
gate all score predictions with these functions, so an FP32 model and its INT8 variant are judged by
one definition.

Segmentation: :class:`SegmentationScorer` takes one case at a time (predicted and true label maps on
the same grid) and aggregates per-label Dice (mean over cases), the mean over foreground labels, and
the worst relative volume error per label. Classification: :func:`classification_metrics` takes the
true and predicted class indices and returns accuracy, per-class precision / recall / F1 and the
confusion matrix (rows: truth, columns: prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SegmentationScorer",
    "argmax_agreement",
    "classification_metrics",
    "dice_per_label",
    "volume_error_pct",
]


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label value between two label maps of the same shape.

    A label absent from both maps scores 1.0 (nothing to find, nothing found); absent from one only
    scores 0.0.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {truth.shape}")
    out: dict[int, float] = {}
    for value in labels:
        p = pred == value
        t = truth == value
        denom = int(p.sum()) + int(t.sum())
        out[int(value)] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom
    return out


def volume_error_pct(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Signed relative volume error, 100 * (predicted - true) / true, per label (same grid).

    A label absent from the truth scores 0.0 when also absent from the prediction and +inf otherwise.
    """
    out: dict[int, float] = {}
    for value in labels:
        n_true = int((truth == value).sum())
        n_pred = int((pred == value).sum())
        if n_true == 0:
            out[int(value)] = 0.0 if n_pred == 0 else float("inf")
        else:
            out[int(value)] = 100.0 * (n_pred - n_true) / n_true
    return out


@dataclass
class SegmentationScorer:
    """Accumulates per-case Dice and volume errors; :meth:`summary` gives the aggregate.

    ``labels`` are the model's label names in channel order, ``labels[0]`` the background (not
    scored). Dice per label is the mean over cases; ``mean_dice`` the mean of those over foreground
    labels; ``volume_error_pct`` per label is the largest absolute error over cases (the figure a
    clinician would see on the worst case).
    """

    labels: Sequence[str]
    cases: list[dict[str, object]] = field(default_factory=list)

    def add(self, pred: np.ndarray, truth: np.ndarray, case_id: str = "") -> dict[str, object]:
        """Score one case; returns its per-case record (also kept for :meth:`summary`)."""
        values = list(range(1, len(self.labels)))
        dice = dice_per_label(pred, truth, values)
        vol = volume_error_pct(pred, truth, values)
        record: dict[str, object] = {
            "case": case_id,
            "dice": {self.labels[v]: dice[v] for v in values},
            "volume_error_pct": {self.labels[v]: vol[v] for v in values},
        }
        self.cases.append(record)
        return record

    def summary(self) -> dict[str, object]:
        """Aggregate over the cases added so far (raises ValueError when there are none)."""
        if not self.cases:
            raise ValueError("no cases scored")
        names = list(self.labels[1:])
        dice = {
            name: float(np.mean([c["dice"][name] for c in self.cases]))  # type: ignore[index]
            for name in names
        }
        worst_vol = {
            name: float(max(abs(c["volume_error_pct"][name]) for c in self.cases))  # type: ignore[index]
            for name in names
        }
        min_dice = {
            name: float(min(c["dice"][name] for c in self.cases))  # type: ignore[index]
            for name in names
        }
        return {
            "mean_dice": float(np.mean(list(dice.values()))),
            "dice": dice,
            "min_dice": min_dice,
            "volume_error_pct": worst_vol,
        }


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]
) -> dict[str, object]:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix.

    ``confusion[i][j]`` counts samples of true class ``i`` predicted as ``j``. A class with no
    predictions has precision 0.0 (and no samples: recall 0.0); F1 is 0.0 when both are 0.
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("no samples scored")
    k = len(labels)
    if t.min() < 0 or p.min() < 0 or t.max() >= k or p.max() >= k:
        raise ValueError(f"class indices outside 0..{k - 1}")
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)
    per_class: dict[str, dict[str, float]] = {}
    for i, name in enumerate(labels):
        tp = float(confusion[i, i])
        predicted = float(confusion[:, i].sum())
        actual = float(confusion[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(actual),
        }
    return {
        "accuracy": float(np.trace(confusion) / t.size),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def argmax_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Share of elements (voxels or samples) on which two sets of predictions agree.

    Used by the quantization gate to compare a variant's argmax with FP32's on the same inputs.
    """
    if len(a) != len(b):
        raise ValueError(f"different number of predictions: {len(a)} vs {len(b)}")
    same = 0
    total = 0
    for x, y in zip(a, b, strict=True):
        x = np.asarray(x)
        y = np.asarray(y)
        if x.shape != y.shape:
            raise ValueError(f"prediction shapes differ: {x.shape} vs {y.shape}")
        same += int((x == y).sum())
        total += x.size
    if total == 0:
        raise ValueError("no predictions to compare")
    return same / total
