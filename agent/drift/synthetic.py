"""Synthetic series summaries with known distributions, for the drift tests, the false-alarm
benchmark (bench/drift_false_alarms.py) and demonstrations; no DICOM, no model.

:class:`SyntheticSite` describes an imaging site (CT tissue mixture, scanner fleet, protocols,
model outputs) and takes a ``numpy.random.Generator``; ``series(rng)`` returns one
``SeriesSummary``, ``profile(n, seed)`` a reference ``DriftProfile`` of ``n`` series (pooled
histograms, metadata statistics, outputs and the per-series ``series`` list the device calibrates
from). Derived sites (``dataclasses.replace``) model drift: ``hu_shift`` (a scanner's calibration
off by that many HU), other manufacturers or slice thicknesses.

Each series: a 4-tissue mixture (air, fat, soft tissue, bone) with per-series weights (Dirichlet)
and per-series tissue means, binned exactly (normal CDF) into the CT edges and into the model
input's edges after a window/level clip to [-1, 1]; 100k-1M voxels per series (multinomial).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.special import ndtr

from agent.core.drift import DriftEdges, SeriesSummary
from agent.core.manifest import DriftProfile

INTENSITY_EDGES: tuple[float, ...] = tuple(float(x) for x in np.linspace(-1100.0, 1900.0, 65))
INPUT_EDGES: tuple[float, ...] = tuple(float(x) for x in np.linspace(-1.25, 1.25, 65))
#: window/level of the model input: (HU - LEVEL) / HALF_WIDTH, clipped to [-1, 1]
LEVEL, HALF_WIDTH = 40.0, 350.0

Choices = tuple[tuple[Any, float], ...]

#: air, fat, soft tissue, bone: (mean HU, per-series sd of the mean, within-series sd, Dirichlet weight)
TISSUES = ((-1000.0, 0.0, 30.0, 4.0), (-100.0, 10.0, 25.0, 6.0), (45.0, 8.0, 35.0, 12.0),
           (600.0, 50.0, 250.0, 3.0))


@dataclass(frozen=True)
class SyntheticSite:
    """A site's distributions; the defaults are the in-distribution reference (module docstring)."""

    task: Literal["classification", "segmentation"] = "classification"
    hu_shift: float = 0.0
    manufacturers: Choices = (("GE MEDICAL SYSTEMS", 0.4), ("SIEMENS", 0.3), ("Philips", 0.2), ("CANON", 0.1))
    slice_thickness: Choices = ((1.0, 0.2), (1.25, 0.2), (2.0, 0.2), (2.5, 0.2), (5.0, 0.2))
    kvp: Choices = ((100.0, 0.3), (120.0, 0.6), (140.0, 0.1))
    kernels: Choices = (("STANDARD", 0.4), ("B30f", 0.3), ("LUNG", 0.2), ("FC13", 0.1))
    transfer_syntaxes: Choices = (("1.2.840.10008.1.2.1", 0.7), ("1.2.840.10008.1.2.4.80", 0.2),
                                  ("1.2.840.10008.1.2", 0.1))
    classes: Choices = (("normal", 0.6), ("nodule", 0.3), ("effusion", 0.1))
    pixel_spacing: tuple[float, float] = (0.55, 0.95)
    #: Beta(a, b) of the top-class probability (classification)
    confidence: tuple[float, float] = (6.0, 2.0)
    #: Beta(a, b) of each label's share of the voxels (segmentation)
    labels: tuple[tuple[str, float, float], ...] = (("liver", 20.0, 180.0), ("spleen", 5.0, 245.0),
                                                    ("kidney", 8.0, 300.0))

    def edges(self) -> DriftEdges:
        return DriftEdges(INTENSITY_EDGES, INPUT_EDGES)

    def series(self, rng: np.random.Generator) -> SeriesSummary:
        """One series' summary."""
        weights = rng.dirichlet([t[3] for t in TISSUES])
        means = np.array([m + (rng.normal(0.0, s) if s else 0.0) for m, s, _, _ in TISSUES]) + self.hu_shift
        sds = np.array([t[2] for t in TISSUES])
        n_vox = int(rng.integers(100_000, 1_000_000))
        hu = np.asarray(INTENSITY_EDGES)
        x = np.asarray(INPUT_EDGES)
        intensity = _binned(weights, means, sds, hu, lo=-np.inf, hi=np.inf)
        model_input = _binned(weights, (means - LEVEL) / HALF_WIDTH, sds / HALF_WIDTH, x, lo=-1.0, hi=1.0)
        thickness = float(_choose(rng, self.slice_thickness))
        manufacturer = str(_choose(rng, self.manufacturers))
        numeric = {
            "slice_thickness": thickness,
            "kvp": float(_choose(rng, self.kvp)),
            "pixel_spacing_mm": round(float(rng.uniform(*self.pixel_spacing)), 4),
            "rows": 512.0, "columns": 512.0,
            "n_slices": float(max(1, round(rng.normal(350.0, 30.0) / thickness))),
            "spacing_z_mm": thickness * (0.8 if rng.random() < 0.3 else 1.0),
        }
        categorical = {
            "manufacturer": manufacturer,
            "manufacturer_model": f"{manufacturer.split()[0]} {'AB'[int(rng.random() < 0.4)]}",
            "convolution_kernel": str(_choose(rng, self.kernels)),
            "body_part": "CHEST",
            "transfer_syntax": str(_choose(rng, self.transfer_syntaxes)),
        }
        counts = (tuple(int(c) for c in rng.multinomial(n_vox, intensity)),
                  tuple(int(c) for c in rng.multinomial(n_vox, model_input)))
        if self.task == "segmentation":
            fractions = {name: float(rng.beta(a, b)) for name, a, b in self.labels}
            return SeriesSummary(*counts, numeric, categorical, label_fractions=fractions)
        conf = max(float(rng.beta(*self.confidence)), 1.0 / 3.0)
        rest = (1.0 - conf) / 2.0
        entropy = -conf * np.log(conf) - (2.0 * rest * np.log(rest) if rest > 0 else 0.0)
        return SeriesSummary(*counts, numeric, categorical, str(_choose(rng, self.classes)), conf,
                             float(entropy))

    def draw(self, n: int, rng: np.random.Generator) -> list[SeriesSummary]:
        return [self.series(rng) for _ in range(n)]

    def profile(self, n: int, seed: int) -> DriftProfile:
        """A reference profile of ``n`` series drawn with ``seed``."""
        return profile_from_series(self.draw(n, np.random.default_rng(seed)), self.edges(),
                                   source=f"synthetic site, seed {seed}")


def _choose(rng: np.random.Generator, choices: Choices) -> Any:
    p = np.array([c[1] for c in choices])
    return choices[int(rng.choice(len(choices), p=p / p.sum()))][0]


def _binned(weights: np.ndarray, means: np.ndarray, sds: np.ndarray, edges: np.ndarray, *,
            lo: float, hi: float) -> np.ndarray:
    """Bin probabilities of a normal mixture clipped to [lo, hi] (clipped mass lands in the bins
    holding lo and hi; mass beyond the edges in the end bins, as the worker bins live data)."""
    inner = edges[1:-1]
    cdf = (weights[:, None] * ndtr((inner[None, :] - means[:, None]) / sds[:, None])).sum(axis=0)
    cdf = np.where(inner < lo, 0.0, np.where(inner >= hi, 1.0, cdf))
    p = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    p = np.clip(p, 0.0, None)
    return np.asarray(p / p.sum())


def profile_from_series(series: Sequence[SeriesSummary], edges: DriftEdges, source: str) -> DriftProfile:
    """A ``DriftProfile`` from per-series summaries (pooled histograms, metadata statistics,
    outputs, and the ``series`` list itself)."""
    def pooled(attr: str, bin_edges: tuple[float, ...]) -> dict[str, Any]:
        counts = np.sum([getattr(s, attr) for s in series], axis=0)
        return {"edges": list(bin_edges), "counts": [int(c) for c in counts]}

    numeric: dict[str, dict[str, float]] = {}
    for key in sorted({k for s in series for k in s.numeric}):
        v = np.array([s.numeric[key] for s in series if key in s.numeric])
        numeric[key] = {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
                        "std": float(v.std()), "p05": float(np.percentile(v, 5)),
                        "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                        "n": float(v.size)}
    categorical = {key: dict(Counter(s.categorical[key] for s in series if key in s.categorical))
                   for key in sorted({k for s in series for k in s.categorical})}
    outputs: dict[str, Any] = {}
    if any(s.predicted_class is not None for s in series):
        conf = [s.confidence for s in series if s.confidence is not None]
        outputs["predicted_class_counts"] = dict(Counter(s.predicted_class for s in series
                                                         if s.predicted_class is not None))
        cedges = np.linspace(0.0, 1.0, 21)
        outputs["confidence"] = {"edges": cedges.tolist(), "counts": np.histogram(conf, cedges)[0].tolist()}
    labels = sorted({k for s in series for k in s.label_fractions})
    if labels:
        outputs["label_volume_fraction"] = {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)),
                "max": float(np.max(v))}
            for k in labels for v in [[s.label_fractions[k] for s in series if k in s.label_fractions]]}
    return DriftProfile.model_validate({
        "n_series": len(series), "source": source,
        "intensity": pooled("intensity_counts", edges.intensity),
        "model_input": pooled("input_counts", edges.model_input),
        "metadata_numeric": numeric, "metadata_categorical": categorical, "outputs": outputs,
        "series": [s.to_json() for s in series],
    })
