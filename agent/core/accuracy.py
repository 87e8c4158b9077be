"""Accuracy: the metrics, the gate's comparison of a variant with FP32, and the validation-set file.

One definition serves the build host's gate (``deploy.gate``), the evaluator and training scripts,
and the device's own gate (``agent.variants.device_gate``), so a variant is judged the same way
everywhere.

Metrics for the reference models: segmentation Dice and volumes, classification scores.

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

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from agent.core.modelspec import GateSpec

__all__ = [
    "ScoredCase",
    "SegmentationScorer",
    "ValidationSamples",
    "Verdict",
    "argmax_agreement",
    "classification_metrics",
    "compare",
    "compare_classification",
    "compare_segmentation",
    "dice_per_label",
    "headline",
    "load_validation_set",
    "volume_error_pct",
    "write_validation_set",
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


@dataclass(frozen=True)
class ScoredCase:
    """One segmentation case: Dice and volume error (%) per foreground label."""

    case: str
    dice: Mapping[str, float]
    volume_error_pct: Mapping[str, float]

    def to_json(self) -> dict[str, object]:
        return {"case": self.case, "dice": dict(self.dice), "volume_error_pct": dict(self.volume_error_pct)}


@dataclass
class SegmentationScorer:
    """Accumulates per-case Dice and volume errors; :meth:`summary` gives the aggregate.

    ``labels`` are the model's label names in channel order, ``labels[0]`` the background (not
    scored). Dice per label is the mean over cases; ``mean_dice`` the mean of those over foreground
    labels; ``volume_error_pct`` per label is the largest absolute error over cases (the figure a
    clinician would see on the worst case).
    """

    labels: Sequence[str]
    cases: list[ScoredCase] = field(default_factory=list)

    def add(self, pred: np.ndarray, truth: np.ndarray, case_id: str = "") -> ScoredCase:
        """Score one case; returns its record (also kept for :meth:`summary`)."""
        values = list(range(1, len(self.labels)))
        dice = dice_per_label(pred, truth, values)
        vol = volume_error_pct(pred, truth, values)
        record = ScoredCase(case_id, {self.labels[v]: dice[v] for v in values},
                            {self.labels[v]: vol[v] for v in values})
        self.cases.append(record)
        return record

    def summary(self) -> dict[str, object]:
        """Aggregate over the cases added so far (raises ValueError when there are none)."""
        if not self.cases:
            raise ValueError("no cases scored")
        names = list(self.labels[1:])
        dice = {
            name: float(np.mean([c.dice[name] for c in self.cases]))
            for name in names
        }
        worst_vol = {
            name: float(max(abs(c.volume_error_pct[name]) for c in self.cases))
            for name in names
        }
        min_dice = {
            name: float(min(c.dice[name] for c in self.cases))
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


# --------------------------------------------------------------------------------------------
# The gate's comparison: a variant against FP32 on the same samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Result of comparing one variant's metrics with FP32's."""

    passed: bool
    metrics: dict[str, float]
    reference: dict[str, float]
    drops: dict[str, float]
    thresholds: dict[str, float]
    failures: tuple[str, ...]


def _fail(name: str, drop: float, limit: float, unit: str = "") -> str:
    scale = 100.0 if unit == "points" else 1.0
    return (f"{name} {drop * scale:.3f}{' ' + unit if unit else ''} > {limit * scale:.3f} allowed "
            f"(over by {(drop - limit) * scale:.3f})")


def compare_classification(ref: Mapping[str, Any], var: Mapping[str, Any], agreement: float,
                           gate: GateSpec) -> Verdict:
    """Compare classification metrics (``agent.core.accuracy.classification_metrics`` dicts) of a
    variant with FP32's on the same samples. ``agreement``: share of samples whose argmax equals
    FP32's. Drops are FP32 minus variant (positive = worse); pass only if every drop is within
    ``gate``."""
    metrics = {"accuracy": float(var["accuracy"]), "argmax_agreement": float(agreement)}
    reference = {"accuracy": float(ref["accuracy"])}
    drops = {"accuracy": reference["accuracy"] - metrics["accuracy"]}
    failures = []
    if drops["accuracy"] > gate.max_accuracy_drop + 1e-12:
        failures.append(_fail("accuracy drop", drops["accuracy"], gate.max_accuracy_drop, "points"))
    for name, row in var["per_class"].items():
        ref_row = ref["per_class"][name]
        for key in ("precision", "recall", "f1"):
            metrics[f"{key}.{name}"] = float(row[key])
            reference[f"{key}.{name}"] = float(ref_row[key])
        drop = float(ref_row["recall"]) - float(row["recall"])
        drops[f"recall.{name}"] = drop
        if drop > gate.max_recall_drop + 1e-12:
            failures.append(_fail(f"recall drop of class {name}", drop, gate.max_recall_drop, "points"))
    if agreement < gate.min_argmax_agreement:
        failures.append(f"argmax agreement with FP32 {agreement:.4f} < {gate.min_argmax_agreement:.4f} required "
                        f"(short by {gate.min_argmax_agreement - agreement:.4f})")
    thresholds = {"max_accuracy_drop": gate.max_accuracy_drop, "max_recall_drop": gate.max_recall_drop,
                  "min_argmax_agreement": gate.min_argmax_agreement}
    return Verdict(not failures, metrics, reference, drops, thresholds, tuple(failures))


def compare_segmentation(ref: Mapping[str, Any], var: Mapping[str, Any], agreement: float,
                         gate: GateSpec) -> Verdict:
    """Compare segmentation metrics (``SegmentationScorer.summary`` dicts) of a variant with
    FP32's on the same cases. ``agreement``: share of voxels whose label equals FP32's."""
    metrics = {"mean_dice": float(var["mean_dice"]), "argmax_agreement": float(agreement)}
    reference = {"mean_dice": float(ref["mean_dice"])}
    drops = {"mean_dice": reference["mean_dice"] - metrics["mean_dice"]}
    failures = []
    if drops["mean_dice"] > gate.max_mean_dice_drop + 1e-12:
        failures.append(_fail("mean Dice drop", drops["mean_dice"], gate.max_mean_dice_drop))
    for name, value in var["dice"].items():
        metrics[f"dice.{name}"] = float(value)
        reference[f"dice.{name}"] = float(ref["dice"][name])
        drop = float(ref["dice"][name]) - float(value)
        drops[f"dice.{name}"] = drop
        if drop > gate.max_label_dice_drop + 1e-12:
            failures.append(_fail(f"Dice drop of label {name}", drop, gate.max_label_dice_drop))
    if agreement < gate.min_argmax_agreement:
        failures.append(f"voxel agreement with FP32 {agreement:.4f} < {gate.min_argmax_agreement:.4f} required "
                        f"(short by {gate.min_argmax_agreement - agreement:.4f})")
    thresholds = {"max_mean_dice_drop": gate.max_mean_dice_drop, "max_label_dice_drop": gate.max_label_dice_drop,
                  "min_argmax_agreement": gate.min_argmax_agreement}
    return Verdict(not failures, metrics, reference, drops, thresholds, tuple(failures))


def compare(task: str, ref: Mapping[str, Any], var: Mapping[str, Any], agreement: float, gate: GateSpec) -> Verdict:
    """:func:`compare_classification` or :func:`compare_segmentation`, by ``task``."""
    if task == "classification":
        return compare_classification(ref, var, agreement, gate)
    return compare_segmentation(ref, var, agreement, gate)


def headline(verdict: Verdict) -> str:
    """The figures a person checks first, in one phrase: ``accuracy 0.7812 vs FP32 0.9958 (drop
    limit 0.01), agreement 0.7812``; the failures follow when there are any."""
    key = "accuracy" if "accuracy" in verdict.metrics else "mean_dice"
    limit = verdict.thresholds.get("max_accuracy_drop" if key == "accuracy" else "max_mean_dice_drop")
    text = (f"{key.replace('_', ' ')} {verdict.metrics[key]:.4f} vs FP32 {verdict.reference[key]:.4f}"
            f"{f' (drop limit {limit:g})' if limit is not None else ''}, "
            f"agreement {verdict.metrics.get('argmax_agreement', float('nan')):.4f}")
    if verdict.failures:
        text += ": " + "; ".join(verdict.failures)
    return text


# --------------------------------------------------------------------------------------------
# The validation-set file shipped in a manifest (``agent.core.manifest.ValidationSet``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationSamples:
    """Preprocessed model inputs (float32, each (C, *spatial)) with their truth: a class index per
    sample (classification) or a label map per sample on the input's grid (segmentation)."""

    task: str
    inputs: tuple[np.ndarray, ...]
    truth: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.inputs)


def write_validation_set(path: Path, task: str, inputs: Sequence[np.ndarray], truth: Sequence[Any]) -> None:
    """Write ``inputs`` and ``truth`` as a compressed ``.npz`` readable by :func:`load_validation_set`.

    Each input is stored as 8 bits with its own offset and scale (an MR slice in 34 KB instead of
    200): the device runs FP32 and every variant on the *stored* values, so the quantization of
    the inputs changes nothing in the comparison, only how representative the samples are.
    """
    if len(inputs) != len(truth) or not inputs:
        raise ValueError(f"{len(inputs)} inputs but {len(truth)} truths")
    arrays: dict[str, np.ndarray] = {"task": np.asarray(task)}
    offsets, scales = [], []
    for i, (x, y) in enumerate(zip(inputs, truth, strict=True)):
        x = np.asarray(x, dtype=np.float32)
        lo, hi = float(x.min()), float(x.max())
        scale = (hi - lo) / 255.0 or 1.0
        arrays[f"input_{i}"] = np.round((x - lo) / scale).astype(np.uint8)
        offsets.append(lo)
        scales.append(scale)
        arrays[f"truth_{i}"] = np.asarray(y, dtype=np.uint8 if task == "segmentation" else np.int64)
    arrays["offset"] = np.asarray(offsets, dtype=np.float32)
    arrays["scale"] = np.asarray(scales, dtype=np.float32)
    with open(path, "wb") as f:
        # numpy's stub types **kwds as its own bool keyword (allow_pickle): arrays are what it saves
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]


def load_validation_set(path: Path) -> ValidationSamples:
    """Read a validation set written by :func:`write_validation_set`. ValueError (naming what is
    wrong) when the file is not one: a truncated or hostile file must not get further."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            task = str(npz["task"])
            offset = np.asarray(npz["offset"], dtype=np.float32)
            scale = np.asarray(npz["scale"], dtype=np.float32)
            n = len(offset)
            inputs = tuple(npz[f"input_{i}"].astype(np.float32) * scale[i] + offset[i] for i in range(n))
            truth = tuple(np.asarray(npz[f"truth_{i}"]) for i in range(n))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"validation set {path} is unreadable: {exc}") from exc
    if task not in ("classification", "segmentation") or n == 0 or len(scale) != n:
        raise ValueError(f"validation set {path}: task {task!r} with {n} samples is not a validation set")
    return ValidationSamples(task, inputs, truth)
