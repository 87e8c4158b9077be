"""Drift reference profile: what the calibration/validation data looked like, for the agent to
compare live traffic against (KS / PSI / chi-square on these, see docs/manifest.md).

:class:`DriftAccumulator` takes each series as it is prepared (raw volume, prepared model input,
non-PHI metadata, and the FP32 model's outputs when known) and summarises it with the agent's own
``agent.imaging.summary.summarise``, exactly as the device's inference worker summarises live
series; or it takes a summary already made (``add_summary``, what ``edge-deploy drift-profile``
does with the pipeline's). :meth:`DriftAccumulator.profile` returns the
``agent.core.manifest.DriftProfile``-shaped dict: the aggregate sections (histograms summed over
the series, metadata statistics and counts, outputs) and ``series``, one ``SeriesSummary.to_json()``
per series. Histogram edges are fixed by the first series (``agent.imaging.summary.reference_edges``:
CT in HU, MR from its intensities) unless given, so the agent bins live data identically.

The gate adds FP32's outputs on its held-out set separately (``add_classification`` /
``add_segmentation`` -> :meth:`DriftAccumulator.outputs`), without per-series records.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.core.drift import DriftEdges, SeriesSummary
from agent.core.modelspec import ModelSpec
from agent.core.types import Outputs, Volume
from agent.imaging.summary import (
    CATEGORICAL_FIELDS,
    MAX_VOXELS,
    NUMERIC_FIELDS,
    intensity_edges,
    reference_edges,
    summarise,
)

__all__ = ["CATEGORICAL_FIELDS", "MAX_VOXELS", "NUMERIC_FIELDS", "DriftAccumulator", "intensity_edges",
           "volume_of"]

_IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def volume_of(raw: np.ndarray, modality: str, meta: Mapping[str, Any],
              spacing: Sequence[float] | None) -> Volume:
    """A ``Volume`` around a raw array, for :func:`summarise` (which reads array, modality, meta and
    the z spacing only; orientation does not matter to a histogram)."""
    z, y, x = (tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0))
    return Volume(np.asarray(raw), (z, y, x), (0.0, 0.0, 0.0), _IDENTITY, modality, meta=dict(meta))


class DriftAccumulator:
    """Collects reference statistics series by series; see the module docstring.

    ``input_edges``: fixed model-input edges (else from the first series); ``edges``: both sets of
    edges fixed up front (e.g. to extend an existing profile)."""

    def __init__(self, modality: str, input_edges: Sequence[float] | None = None, *,
                 edges: DriftEdges | None = None, spec: ModelSpec | None = None) -> None:
        self.modality = modality
        self.spec = spec
        self._input_edges = tuple(float(e) for e in input_edges) if input_edges is not None else None
        self._edges = edges
        self.summaries: list[SeriesSummary] = []
        # outputs added without a series (the gate's held-out set)
        self._pred_classes: Counter[str] = Counter()
        self._confidences: list[float] = []
        self._label_fractions: dict[str, list[float]] = defaultdict(list)

    @property
    def n_series(self) -> int:
        return len(self.summaries)

    @property
    def edges(self) -> DriftEdges | None:
        """The histogram edges in force (None before the first series when not given)."""
        return self._edges

    def edges_for(self, raw: np.ndarray, model_input: np.ndarray) -> DriftEdges:
        """The edges in force, deciding them from this series (the first) when not yet fixed."""
        if self._edges is None:
            derived = reference_edges(self.modality, raw, model_input)
            if self._input_edges is not None:
                derived = DriftEdges(derived.intensity, self._input_edges)
            self._edges = derived
        return self._edges

    def add_series(self, raw: np.ndarray, model_input: np.ndarray, meta: Mapping[str, Any],
                   spacing: Sequence[float] | None = None, outputs: Outputs | None = None) -> SeriesSummary:
        """Add one series: ``raw`` volume in modality units, ``model_input`` the prepared array,
        ``meta`` the Volume's non-PHI metadata, ``spacing`` its (z, y, x) voxel spacing, ``outputs``
        the FP32 model's outputs on it if known. Returns its summary."""
        volume = volume_of(raw, self.modality, meta, spacing)
        summary = summarise(volume, model_input, self.edges_for(raw, model_input), outputs, self.spec)
        self.summaries.append(summary)
        return summary

    def add_summary(self, summary: SeriesSummary) -> None:
        """Add a series already summarised on :attr:`edges` (ValueError on other bin counts)."""
        if self._edges is None:
            raise ValueError("fix the edges (edges_for / edges=) before adding summaries")
        if (len(summary.intensity_counts) != len(self._edges.intensity) - 1
                or len(summary.input_counts) != len(self._edges.model_input) - 1):
            raise ValueError("the summary was binned on other edges")
        self.summaries.append(summary)

    def add_classification(self, label: str, confidence: float) -> None:
        """Add one FP32 classification output (predicted label and its probability), no series."""
        self._pred_classes[label] += 1
        self._confidences.append(float(confidence))

    def add_segmentation(self, fractions: Mapping[str, float]) -> None:
        """Add one FP32 segmentation output as each label's share of the volume's voxels, no series."""
        for name, frac in fractions.items():
            self._label_fractions[name].append(float(frac))

    def outputs(self) -> dict[str, Any]:
        """The ``outputs`` section: predicted class counts and a confidence histogram
        (classification) or per-label volume-fraction statistics (segmentation), over the outputs
        added alone and those of the series summaries."""
        classes = Counter(self._pred_classes)
        confidences = list(self._confidences)
        fractions: dict[str, list[float]] = defaultdict(list, {k: list(v) for k, v in self._label_fractions.items()})
        for s in self.summaries:
            if s.predicted_class is not None and s.confidence is not None:
                classes[s.predicted_class] += 1
                confidences.append(s.confidence)
            for name, frac in s.label_fractions.items():
                fractions[name].append(frac)
        out: dict[str, Any] = {}
        if classes:
            edges = np.linspace(0.0, 1.0, 21)
            out["predicted_class_counts"] = dict(classes)
            out["confidence"] = {"edges": edges.tolist(),
                                 "counts": np.histogram(confidences, bins=edges)[0].tolist()}
        if fractions:
            out["label_volume_fraction"] = {
                name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)),
                       "max": float(np.max(v))}
                for name, v in fractions.items()
            }
        return out

    def profile(self, source: str) -> dict[str, Any]:
        """The profile as a dict matching ``agent.core.manifest.DriftProfile``: the aggregates are
        sums and statistics over ``series`` (so the two can never disagree)."""
        if self._edges is None or not self.summaries:
            raise ValueError("no series added to the drift profile")
        values: dict[str, list[float]] = defaultdict(list)
        categorical: dict[str, Counter[str]] = defaultdict(Counter)
        for s in self.summaries:
            for key, value in s.numeric.items():
                values[key].append(value)
            for key, text in s.categorical.items():
                categorical[key][text] += 1
        numeric = {
            key: {
                "min": float(np.min(v)), "max": float(np.max(v)), "mean": float(np.mean(v)),
                "std": float(np.std(v)), "p05": float(np.percentile(v, 5)),
                "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "n": float(len(v)),
            }
            for key in NUMERIC_FIELDS if (v := values.get(key))
        }
        intensity = np.sum([s.intensity_counts for s in self.summaries], axis=0, dtype=np.int64)
        model_input = np.sum([s.input_counts for s in self.summaries], axis=0, dtype=np.int64)
        return {
            "n_series": self.n_series,
            "source": source,
            "intensity": {"edges": list(self._edges.intensity), "counts": intensity.tolist()},
            "model_input": {"edges": list(self._edges.model_input), "counts": model_input.tolist()},
            "metadata_numeric": numeric,
            "metadata_categorical": {k: dict(categorical[k]) for k in CATEGORICAL_FIELDS if k in categorical},
            "outputs": self.outputs(),
            "series": [s.to_json() for s in self.summaries],
        }

    @classmethod
    def merge_outputs(cls, profile: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``profile`` with its ``outputs`` section replaced by ``outputs`` (from the gate)."""
        merged = dict(profile)
        merged["outputs"] = dict(outputs)
        return merged
