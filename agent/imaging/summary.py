"""One series in aggregate, for drift monitoring: the one implementation the device and the reference share.

Takes a decoded ``Volume`` (modality units, HU for CT), the model input ``prepare`` made from it,
the reference profile's histogram edges (``agent.core.drift.DriftEdges``) and, when the model ran,
its ``Outputs``; returns an ``agent.core.drift.SeriesSummary`` (:func:`summarise`). The inference
worker calls it after a job (``agent.inference.pipeline``) and ``deploy.drift_profile`` calls it for
every reference series, so live data and the reference are binned and measured identically.
:func:`reference_edges` decides the edges of a new reference from its first series.

What a summary holds (numpy only, nothing that identifies a patient or a study):

* ``intensity_counts``: histogram of the raw modality values *inside the body* on
  ``edges.intensity``. Body, kept deliberately simple: CT voxels above :data:`CT_BODY_HU` (-500 HU:
  soft tissue, fat and bone; outside air, lung and bowel gas excluded); other modalities voxels
  above :data:`BODY_FRACTION` of the series' own 99th percentile (the air/noise floor of MR). The
  series is first subsampled to at most :data:`MAX_VOXELS` voxels with a fixed stride over the
  flattened array (deterministic, exact enough for a 64-bin histogram; a 512x512x300 CT would
  otherwise cost seconds).
* ``input_counts``: histogram of every value of the model input on ``edges.model_input`` (what the
  network sees, background included), subsampled the same way.
  Values outside the edges are clipped into the end bins, so every voxel counted counts.
* ``numeric``: :data:`NUMERIC_FIELDS` from ``Volume.meta``, with ``pixel_spacing_mm`` (row spacing,
  ``meta["pixel_spacing"][0]``) and ``spacing_z_mm`` (``Volume.spacing[0]``) derived; absent or
  non-finite values left out. ``categorical``: :data:`CATEGORICAL_FIELDS`, empty strings left out.
* classification: ``predicted_class``, ``confidence`` (its probability) and ``entropy`` of the
  probability vector in nats (0: certain; ln K: uniform over K classes).
* segmentation: ``label_fractions``, each foreground label's voxels over the source grid's voxels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from agent.core.drift import DriftEdges, SeriesSummary
from agent.core.modelspec import ModelSpec
from agent.core.types import ClassificationOutput, Outputs, SegmentationOutput, Volume

__all__ = ["BINS", "BODY_FRACTION", "CATEGORICAL_FIELDS", "CT_BODY_HU", "MAX_VOXELS", "NUMERIC_FIELDS",
           "body_values", "histogram", "intensity_edges", "reference_edges", "subsample", "summarise"]

#: numeric metadata fields summarised (Volume.meta keys + the derived pixel_spacing_mm, spacing_z_mm)
NUMERIC_FIELDS = ("slice_thickness", "kvp", "magnetic_field_strength", "pixel_spacing_mm", "rows",
                  "columns", "n_slices", "spacing_z_mm")
#: categorical metadata fields counted (allow-listed Volume.meta keys; none identifies anyone)
CATEGORICAL_FIELDS = ("manufacturer", "manufacturer_model", "convolution_kernel", "body_part",
                      "transfer_syntax")
#: at most this many voxels per series feed each histogram (a fixed-stride subsample)
MAX_VOXELS = 1_000_000
#: bins of a new reference's histograms
BINS = 64
#: CT "body": voxels above this (HU)
CT_BODY_HU = -500.0
#: other modalities' "body": voxels above this fraction of the series' 99th percentile
BODY_FRACTION = 0.05
#: CT intensity edges of a new reference (HU): from the body threshold to dense bone
CT_RANGE_HU = (CT_BODY_HU, 1900.0)


def subsample(values: npt.ArrayLike, limit: int = MAX_VOXELS) -> npt.NDArray[np.float32]:
    """At most ``limit`` values of ``values`` (any shape), every k-th of the flattened array, as a
    contiguous float32 copy: the same input always gives the same subsample (the device and the
    reference must agree), and what follows runs on contiguous memory."""
    flat = np.asarray(values).reshape(-1)
    step = max(1, math.ceil(flat.size / limit))
    # stride first (never convert the whole volume); the one strided gather is the costly part
    return np.ascontiguousarray(flat[::step], dtype=np.float32)


def body_values(volume_array: npt.ArrayLike, modality: str) -> npt.NDArray[np.float32]:
    """The subsampled raw values inside the body (see the module docstring); NaN never counts."""
    values = subsample(volume_array)
    if modality.upper() == "CT":
        return values[values > CT_BODY_HU]  # NaN compares False: dropped by the same test
    values = values[np.isfinite(values)]
    if values.size == 0:
        return values
    floor = BODY_FRACTION * float(np.percentile(values, 99.0))
    return values[values > floor]


#: slices the noise estimate reads (evenly spaced): enough for a stable median, cheap on 500 slices
NOISE_SLICES = 8


def image_statistics(volume_array: npt.ArrayLike, modality: str) -> dict[str, float]:
    """``noise``: the pixel noise, estimated from neighbouring pixels inside the body, where
    anatomy changes slowly and the difference of two neighbours is mostly noise: 1.4826 x the
    median absolute horizontal difference / sqrt(2) (a robust standard deviation). CT: in HU.
    Other modalities, whose scale is arbitrary: relative to the body's median value. The histogram
    of raw values hardly moves when only the noise grows (a worn coil, a wrong protocol); this does.
    """
    a = np.asarray(volume_array, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[2] < 2 or a.size == 0:
        return {}
    picks = np.unique(np.linspace(0, a.shape[0] - 1, min(NOISE_SLICES, a.shape[0])).round().astype(int))
    slab = a[picks]
    ct = modality.upper() == "CT"
    if ct:
        floor = float(CT_BODY_HU)
    else:
        finite = slab[np.isfinite(slab)]
        if finite.size == 0:
            return {}
        floor = BODY_FRACTION * float(np.percentile(finite, 99.0))
    body = slab > floor
    both = body[:, :, 1:] & body[:, :, :-1]
    diffs = np.diff(slab, axis=2)[both]
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size < 100:
        return {}
    sigma = 1.4826 * float(np.median(np.abs(diffs))) / float(np.sqrt(2.0))
    if ct:
        return {"noise": round(sigma, 4)}
    level = float(np.median(slab[body]))
    return {"noise": round(sigma / level, 6)} if level > 0 else {}


def histogram(values: npt.ArrayLike, edges: npt.ArrayLike) -> tuple[int, ...]:
    """Counts of the (already subsampled) ``values`` on ``edges``: NaN dropped, values outside the
    edges in the end bins. Equal-width edges: bin ``floor((v - e[0]) / width)`` (the last edge falls
    in the last bin); other edges: ``numpy.histogram``."""
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
        raise ValueError(f"histogram edges must be increasing, at least 2 (got {e.size})")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    nan = np.isnan(v)
    v = np.clip(v[~nan] if nan.any() else v, e[0], e[-1])
    n = e.size - 1
    width = (e[-1] - e[0]) / n
    if np.allclose(np.diff(e), width, rtol=1e-9, atol=0.0):
        # one multiply and a bincount: about 3x faster than numpy.histogram's equal-width path,
        # which corrects every value against the edges (irrelevant: both sides bin with this code)
        index = np.minimum(((v - e[0]) * (1.0 / width)).astype(np.int64), n - 1)
        counts = np.bincount(index, minlength=n)
    else:
        counts = np.histogram(v, bins=e)[0]
    return tuple(int(c) for c in counts)


def intensity_edges(modality: str, first_array: npt.ArrayLike | None = None, bins: int = BINS) -> tuple[float, ...]:
    """Raw intensity edges of a new reference: CT in HU over :data:`CT_RANGE_HU`; other modalities
    (arbitrary units) from 0 to 1.5x the 99.9th percentile of ``first_array``'s body values."""
    if modality.upper() == "CT":
        return tuple(float(x) for x in np.linspace(*CT_RANGE_HU, bins + 1))
    body = body_values(first_array, modality) if first_array is not None else np.zeros(0, np.float32)
    hi = float(np.percentile(body, 99.9)) * 1.5 if body.size else 1.0
    return tuple(float(x) for x in np.linspace(0.0, max(hi, 1.0), bins + 1))


def reference_edges(modality: str, first_raw: npt.ArrayLike, first_input: npt.ArrayLike,
                    bins: int = BINS) -> DriftEdges:
    """The edges of a new reference profile, from its first series (raw volume and model input).

    Model input: the first series' range with a quarter of its width added on each side, room for
    live data a little outside the reference (window-normalised inputs span [0, 1] anyway)."""
    values = subsample(first_input)
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = 0.25 * max(hi - lo, 1e-3)
    model_input = tuple(float(x) for x in np.linspace(lo - pad, hi + pad, bins + 1))
    return DriftEdges(intensity_edges(modality, first_raw, bins), model_input)


def summarise(volume: Volume, model_input: npt.ArrayLike, edges: DriftEdges,
              prediction_outputs: Outputs | None = None, spec: ModelSpec | None = None) -> SeriesSummary:
    """One series in aggregate (see the module docstring). ``prediction_outputs``: the model's
    outputs on it (None: inputs only); ``spec``: orders the label fractions as its labels (else the
    outputs' order) and names the modality when the volume has none."""
    modality = volume.modality or (spec.input.modality if spec is not None else "")
    summary = SeriesSummary(
        intensity_counts=histogram(body_values(volume.array, modality), edges.intensity),
        input_counts=histogram(subsample(model_input), edges.model_input),
        numeric=_numeric(volume),
        categorical=_categorical(volume.meta),
        image=image_statistics(volume.array, modality),
    )
    if isinstance(prediction_outputs, ClassificationOutput):
        probs = np.asarray(list(prediction_outputs.probabilities.values()), dtype=np.float64)
        p = probs[probs > 0]
        return SeriesSummary(summary.intensity_counts, summary.input_counts, summary.numeric, summary.categorical,
                             predicted_class=prediction_outputs.label,
                             confidence=float(prediction_outputs.confidence),
                             entropy=float(-np.sum(p * np.log(p))) + 0.0,  # + 0.0: no -0.0 when certain
                             image=summary.image)
    if isinstance(prediction_outputs, SegmentationOutput):
        total = max(1, int(np.asarray(volume.array).size))
        names = [n for n in spec.labels[1:] if n in prediction_outputs.labels] if spec is not None else []
        names += [n for n in prediction_outputs.labels if n not in names]
        fractions = {n: prediction_outputs.labels[n].voxels / total for n in names}
        return SeriesSummary(summary.intensity_counts, summary.input_counts, summary.numeric, summary.categorical,
                             label_fractions=fractions, image=summary.image)
    return summary


def _numeric(volume: Volume) -> dict[str, float]:
    meta = volume.meta
    out: dict[str, float] = {}
    for key in NUMERIC_FIELDS:
        value: object = meta.get(key)
        if key == "pixel_spacing_mm":
            spacing = meta.get("pixel_spacing")
            value = spacing[0] if isinstance(spacing, (tuple, list)) and spacing else None
        elif key == "spacing_z_mm":
            value = volume.spacing[0] if volume.spacing else None
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                out[key] = number
    return out


def _categorical(meta: Mapping[str, object]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in CATEGORICAL_FIELDS:
        value = meta.get(key)
        if value is not None and str(value).strip():
            out[key] = str(value).strip()
    return out
