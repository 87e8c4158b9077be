"""Drift reference profile: what the calibration/validation data looked like, for the agent to
compare live traffic against (KS / PSI / chi-square on these, see docs/manifest.md).

:class:`DriftAccumulator` takes each series as it is prepared (raw volume, prepared model input,
non-PHI metadata) and, later, the FP32 model's outputs; :meth:`DriftAccumulator.profile` returns
the ``agent.core.manifest.DriftProfile``-shaped dict published in the manifest. Histograms use fixed
edges decided up front (CT: HU; MR: set from the first series, see :func:`intensity_edges`) so the
agent can bin live data identically; values outside fall into the end bins.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: numeric metadata fields summarised (Volume.meta keys + derived ones)
NUMERIC_FIELDS = ("slice_thickness", "kvp", "magnetic_field_strength", "pixel_spacing_mm", "rows",
                  "columns", "n_slices", "spacing_z_mm")
#: categorical metadata fields counted
CATEGORICAL_FIELDS = ("manufacturer", "manufacturer_model", "convolution_kernel", "body_part",
                      "transfer_syntax")
#: at most this many voxels per series feed the histograms (a strided subsample: exact enough for
#: a 64-bin histogram, and a 512x512x300 CT would otherwise cost seconds)
MAX_VOXELS = 1_000_000


def intensity_edges(modality: str, first_array: np.ndarray | None = None, bins: int = 64) -> np.ndarray:
    """Histogram edges for raw intensities: CT in HU (-1100..1900, 64 bins); other modalities
    (arbitrary units) from 0 to 1.5x the 99.9th percentile of ``first_array``."""
    if modality.upper() == "CT":
        return np.linspace(-1100.0, 1900.0, bins + 1)
    if first_array is None or first_array.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    hi = float(np.percentile(_subsample(first_array), 99.9)) * 1.5
    return np.linspace(0.0, max(hi, 1.0), bins + 1)


def _subsample(a: np.ndarray) -> np.ndarray:
    flat = np.asarray(a).reshape(-1)
    step = max(1, flat.size // MAX_VOXELS)
    return flat[::step]


def _hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # clip into the end bins so every value counts (the agent does the same with live data)
    v = np.clip(_subsample(values), edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(np.int64)


class DriftAccumulator:
    """Collects reference statistics series by series; see the module docstring."""

    def __init__(self, modality: str, input_edges: Sequence[float] | None = None) -> None:
        self.modality = modality
        self.n_series = 0
        self._raw_edges: np.ndarray | None = None
        self._raw_counts: np.ndarray | None = None
        self._in_edges = np.asarray(input_edges, dtype=np.float64) if input_edges is not None else None
        self._in_counts: np.ndarray | None = None
        self._numeric: dict[str, list[float]] = defaultdict(list)
        self._categorical: dict[str, Counter[str]] = defaultdict(Counter)
        self._pred_classes: Counter[str] = Counter()
        self._confidences: list[float] = []
        self._label_fractions: dict[str, list[float]] = defaultdict(list)

    def add_series(self, raw: np.ndarray, model_input: np.ndarray, meta: Mapping[str, Any],
                   spacing: Sequence[float] | None = None) -> None:
        """Add one series: ``raw`` volume in modality units, ``model_input`` the prepared array,
        ``meta`` the Volume's non-PHI metadata, ``spacing`` its (z, y, x) voxel spacing."""
        self.n_series += 1
        if self._raw_edges is None or self._raw_counts is None:  # both are set by the first series
            self._raw_edges = intensity_edges(self.modality, raw)
            self._raw_counts = np.zeros(len(self._raw_edges) - 1, dtype=np.int64)
        self._raw_counts += _hist(raw, self._raw_edges)
        if self._in_edges is None:
            lo, hi = float(np.min(model_input)), float(np.max(model_input))
            pad = 0.25 * max(hi - lo, 1e-3)  # room for live data a little outside the reference
            self._in_edges = np.linspace(lo - pad, hi + pad, 65)
        if self._in_counts is None:
            self._in_counts = np.zeros(len(self._in_edges) - 1, dtype=np.int64)
        self._in_counts += _hist(model_input, self._in_edges)
        for key in NUMERIC_FIELDS:
            value = meta.get(key)
            if key == "pixel_spacing_mm" and meta.get("pixel_spacing"):
                value = float(meta["pixel_spacing"][0])
            if key == "spacing_z_mm" and spacing is not None:
                value = float(spacing[0])
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                self._numeric[key].append(float(value))
        for key in CATEGORICAL_FIELDS:
            value = meta.get(key)
            if value not in (None, ""):
                self._categorical[key][str(value)] += 1

    def add_classification(self, label: str, confidence: float) -> None:
        """Add one FP32 classification output (predicted label and its probability)."""
        self._pred_classes[label] += 1
        self._confidences.append(float(confidence))

    def add_segmentation(self, fractions: Mapping[str, float]) -> None:
        """Add one FP32 segmentation output as each label's share of the volume's voxels."""
        for name, frac in fractions.items():
            self._label_fractions[name].append(float(frac))

    def outputs(self) -> dict[str, Any]:
        """The ``outputs`` section: predicted class counts and a confidence histogram
        (classification) or per-label volume-fraction statistics (segmentation)."""
        outputs: dict[str, Any] = {}
        if self._pred_classes:
            edges = np.linspace(0.0, 1.0, 21)
            outputs["predicted_class_counts"] = dict(self._pred_classes)
            outputs["confidence"] = {"edges": edges.tolist(),
                                     "counts": np.histogram(self._confidences, bins=edges)[0].tolist()}
        if self._label_fractions:
            outputs["label_volume_fraction"] = {
                name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)),
                       "max": float(np.max(v))}
                for name, v in self._label_fractions.items()
            }
        return outputs

    def profile(self, source: str) -> dict[str, Any]:
        """The profile as a dict matching ``agent.core.manifest.DriftProfile``."""
        if (self._raw_edges is None or self._raw_counts is None or self._in_edges is None
                or self._in_counts is None):
            raise ValueError("no series added to the drift profile")
        numeric = {
            key: {
                "min": float(np.min(v)), "max": float(np.max(v)), "mean": float(np.mean(v)),
                "std": float(np.std(v)), "p05": float(np.percentile(v, 5)),
                "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "n": float(len(v)),
            }
            for key, v in self._numeric.items() if v
        }
        outputs = self.outputs()
        return {
            "n_series": self.n_series,
            "source": source,
            "intensity": {"edges": self._raw_edges.tolist(), "counts": self._raw_counts.tolist()},
            "model_input": {"edges": self._in_edges.tolist(), "counts": self._in_counts.tolist()},
            "metadata_numeric": numeric,
            "metadata_categorical": {k: dict(v) for k, v in self._categorical.items()},
            "outputs": outputs,
        }

    @classmethod
    def merge_outputs(cls, profile: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``profile`` with its ``outputs`` section replaced by ``outputs`` (from the gate)."""
        merged = dict(profile)
        merged["outputs"] = dict(outputs)
        return merged
