"""One series through one model: load -> preprocess -> inference -> postprocess -> ``Prediction``.

Runs inside the inference worker (``runner.py``) and in ``deploy``'s evaluator, which also wants
the label map and raw logits to compare variants (``run_model_detailed``). Pure orchestration:
the pixel work is ``agent.imaging`` (numpy/scipy), the model call is a loaded ``Backend``.

Stages and their ``timings_ms`` keys:
    load         ``load_series``: DICOM files -> ``Volume`` (source grid, HU for CT)
    preprocess   ``prepare``: resample / normalise to the model's input space, (C, *spatial)
    inference    3D: sliding-window over ``patch_size`` with ``overlap``; 2D: one batch
    postprocess  segmentation: argmax in model space -> back to the source grid -> per-label stats
                 (volumes use the SOURCE spacing); classification: softmax -> label, confidence

With ``drift_edges`` (the model's reference profile edges) a successful run also summarises the
series for drift monitoring (``agent.imaging.summary.summarise`` on the volume, the model input and
the outputs: ``ModelRun.summary``). That costs a few milliseconds, is not a stage of
``timings_ms`` (the published timings stay the inference's), and its failure is logged and leaves
``summary`` None: drift bookkeeping never fails a job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from agent.core.drift import DriftEdges, SeriesSummary
from agent.core.errors import BackendError
from agent.core.log import log_event
from agent.core.modelspec import ModelSpec
from agent.core.types import ModelRef, Outputs, Prediction, Volume
from agent.imaging.postprocess import (
    classification_outputs,
    keep_largest_components,
    segmentation_output_from_counts,
)
from agent.imaging.preprocess import prepare, restore_label_map, source_grid_label_stats
from agent.imaging.sliding_window import sliding_window_inference
from agent.imaging.summary import summarise
from agent.imaging.volume import load_series
from agent.inference.base import Backend

logger = logging.getLogger(__name__)


class ModelRun(NamedTuple):
    """``run_model_detailed``'s result (a named tuple; read it by field name).

    ``label_map``: segmentation only, uint8 (z, y, x) on the source grid, after the spec's
    largest-component filter (applied in model space), i.e. the map the published statistics
    describe; None for classification or when not asked for. ``logits``: segmentation
    (K, *model-space spatial) float32; classification (K,). ``summary``: the series in aggregate
    for drift monitoring, when ``drift_edges`` were given and summarising worked, else None.
    """

    prediction: Prediction
    label_map: npt.NDArray[np.uint8] | None
    logits: npt.NDArray[np.float32]
    summary: SeriesSummary | None = None


def run_model(
    series_paths: Sequence[Path],
    spec: ModelSpec,
    backend: Backend,
    model_ref: ModelRef,
    *,
    sw_batch_size: int = 1,
    volume: Volume | None = None,
) -> Prediction:
    """Run one series (its DICOM files) through a loaded backend; return the ``Prediction``.

    ``volume``: the series already decoded from ``series_paths``, if it was prefetched.
    Raises VolumeError / PreprocessError (from imaging) for series the model cannot take, and
    BackendError when the backend fails or its outputs are non-finite or of the wrong shape.
    """
    return run_model_detailed(
        series_paths, spec, backend, model_ref, sw_batch_size=sw_batch_size, want_label_map=False, volume=volume
    ).prediction


def run_model_detailed(
    series_paths: Sequence[Path],
    spec: ModelSpec,
    backend: Backend,
    model_ref: ModelRef,
    *,
    sw_batch_size: int = 1,
    want_label_map: bool = True,
    volume: Volume | None = None,
    drift_edges: DriftEdges | None = None,
) -> ModelRun:
    """Like ``run_model``, also returning the label map and logits (see ``ModelRun``).

    ``sw_batch_size``: patches per backend call in the 3D sliding window. ``want_label_map=False``
    skips restoring the source-grid label map (``label_map`` is then None; the statistics do
    not need it). ``volume``: the series already decoded from ``series_paths`` (a prefetch); the
    load stage then costs nothing. ``drift_edges``: summarise the series on these edges
    (``ModelRun.summary``, see the module docstring).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round((now - clock) * 1000.0, 1)
        clock = now

    if volume is None:
        volume = load_series(list(series_paths))
    lap("load")
    prepared = prepare(volume, spec.input)
    image = np.asarray(prepared.array, dtype=np.float32)
    lap("preprocess")

    n_classes = len(spec.labels)
    predict = _checked(backend, n_classes)
    dims = spec.input.dims
    if dims == 3:
        if image.ndim != 4:
            raise BackendError(f"3D model: preprocessed image has shape {image.shape}, expected (C, Z, Y, X)")
        assert spec.input.patch_size is not None  # ModelSpec validates this for 3D models
        logits = sliding_window_inference(
            image, spec.input.patch_size, spec.input.overlap, predict, batch_size=sw_batch_size
        )
        logits = np.asarray(logits, dtype=np.float32)
    else:
        if image.ndim != 3:
            raise BackendError(f"2D model: preprocessed image has shape {image.shape}, expected (C, Y, X)")
        out = predict(image[None])  # a batch of one slice
        if spec.task == "classification" and out.ndim != 2:
            raise BackendError(f"classifier output has shape {out.shape}, expected (1, {n_classes})")
        logits = out[0]  # classification (K,); 2D segmentation (K, Y, X)
    if not np.isfinite(logits).all():  # the sliding window's blending could in principle produce them
        raise BackendError("non-finite outputs (NaN/Inf) after inference")
    lap("inference")

    outputs: Outputs
    label_map: npt.NDArray[np.uint8] | None = None
    if spec.task == "segmentation":
        if logits.shape[0] != n_classes:
            raise BackendError(
                f"model produced {logits.shape[0]} channels, the spec lists {n_classes} labels"
            )
        if n_classes > 256:
            raise BackendError(f"{n_classes} labels do not fit the uint8 label map (at most 256)")
        # Filtering and statistics run on the model-space grid (about 30x fewer voxels than a
        # 512x512 CT); the counts and boxes are those of the restored source-grid map.
        model_space = np.argmax(logits, axis=0).astype(np.uint8)
        if spec.output.largest_component:
            model_space = keep_largest_components(model_space, n_classes)
        per_label = source_grid_label_stats(model_space, prepared.geometry, n_classes)
        outputs = segmentation_output_from_counts(spec.labels, per_label, volume.spacing)
        if want_label_map:
            label_map = restore_label_map(model_space, prepared.geometry)
    else:
        outputs = classification_outputs(logits, spec.labels)
    lap("postprocess")
    summary = None if drift_edges is None else summary_or_none(volume, image, drift_edges, outputs, spec)
    return ModelRun(
        Prediction(model=model_ref, task=spec.task, outputs=outputs, timings_ms=timings), label_map, logits, summary
    )


def summary_or_none(volume: Volume, model_input: npt.NDArray[np.float32], edges: DriftEdges, outputs: Outputs,
                    spec: ModelSpec) -> SeriesSummary | None:
    """``summarise``, or None (logged) when it fails: a job's result never depends on drift."""
    t0 = time.perf_counter()
    try:
        summary = summarise(volume, model_input, edges, outputs, spec)
    except Exception as exc:  # noqa: BLE001 - logged; any bug or odd input leaves the prediction good
        log_event(logger, "pipeline.summary_failed", logging.WARNING, model=spec.name,
                  error=f"{type(exc).__name__}: {exc}")
        return None
    log_event(logger, "pipeline.summarised", logging.DEBUG, model=spec.name,
              ms=round((time.perf_counter() - t0) * 1000.0, 2))
    return summary


def _checked(
    backend: Backend, n_classes: int
) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
    """``backend.run`` that rejects non-finite outputs and a wrong class count per call, so a bad
    patch fails the job at once instead of being blended into the volume."""

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = np.asarray(backend.run(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)
        if out.ndim < 2 or out.shape[0] != batch.shape[0] or out.shape[1] != n_classes:
            raise BackendError(
                f"model output has shape {out.shape} for input {batch.shape}; expected "
                f"(N={batch.shape[0]}, K={n_classes}, ...) with K the number of labels in model.toml"
            )
        if not np.isfinite(out).all():
            raise BackendError(
                f"non-finite outputs from {getattr(backend, 'name', type(backend).__name__)}: "
                f"{int(np.isnan(out).sum())} NaN, {int(np.isinf(out).sum())} Inf values"
            )
        return out

    return predict
