"""Per-tensor activation ranges of the preprocessed FP32 graph, with ONNX Runtime's calibrators.

:func:`collect_ranges` takes ``model.pre.onnx`` and the calibration tensors (an
:class:`ArrayCalibrationReader` over the prepared array) and returns the ranges for one of
:data:`METHODS`: ONNX Runtime's ``TensorsData`` (what ``quantize_static`` reads back as its
calibration cache) and, per tensor, the absolute max of that range and of the exact min/max (for
the TensorRT INT8/FP8 graphs). The samples stream through one at a time, so 3D models at 96^3
fit in memory. Raises :class:`CalibrationError` (``deploy.calibrate`` re-exports it).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.errors import EdgeAgentError

__all__ = ["METHODS", "ArrayCalibrationReader", "CalibrationError", "collect_ranges"]

#: activation range methods (``[quantization] method`` in model.toml)
METHODS = ("minmax", "entropy", "percentile")
#: at most this many elements of one tensor per sample feed the range histograms: a strided
#: subsample; the exact min/max always use the whole tensor
HIST_SAMPLE = 2_000_000
#: histogram bins (TensorRT's entropy calibrator uses 2048 bins folded into 128 for int8; ORT's
#: defaults of 128/128 would leave entropy a single candidate, i.e. plain min/max)
NUM_BINS = 2048
NUM_QUANTIZED_BINS = 128


class CalibrationError(EdgeAgentError):
    """The calibration set or the range computation failed."""


class ArrayCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over prepared calibration tensors.

    Takes the array (N, C, *spatial) (an np.load mmap is fine) and the model's input name;
    ``get_next()`` returns ``{input_name: (1, C, *spatial)}`` batches, then None.
    """

    def __init__(self, data: np.ndarray, input_name: str = "input") -> None:
        self.data = data
        self.input_name = input_name
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.data):
            return None
        batch = np.ascontiguousarray(self.data[self._i : self._i + 1], dtype=np.float32)
        self._i += 1
        return {self.input_name: batch}

    def __len__(self) -> int:
        return len(self.data)

    def rewind(self) -> None:
        self._i = 0


def _subsample(arr: np.ndarray) -> np.ndarray:
    flat = arr.reshape(-1)
    step = max(1, flat.size // HIST_SAMPLE)
    return flat[::step]


def collect_ranges(
    pre_path: Path, reader: ArrayCalibrationReader, method: str, percentile: float = 99.99, threads: int = 2
) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Run the calibration data through ORT's calibration graph and compute per-tensor ranges.

    Returns ``(tensors_data, method_amax, max_amax)``: an ``onnxruntime.quantization.TensorsData``
    for ``method`` (what ``quantize_static`` consumes), and per tensor the absolute max of that
    range and of the exact min/max. Percentile and entropy thresholds come from ORT's
    ``HistogramCollector`` (2048 bins; entropy folds into 128); a tensor that never goes below 0
    (after ReLU) gets ``lowest = 0`` so u8 activations use all 256 levels.
    """
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        HistogramCalibrater,
        HistogramCollector,
        TensorData,
        TensorsData,
    )
    from tqdm import tqdm

    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}")
    with tempfile.TemporaryDirectory(prefix="edge-deploy-calib-") as tmp:
        aug_path = Path(tmp) / "augmented.onnx"
        calibrator = HistogramCalibrater(str(pre_path), None, augmented_model_path=str(aug_path))
        calibrator.augment_graph()
        wanted = set(calibrator.tensors_to_calibrate)
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(0, threads)
        # as ORT's calibrators do: no graph optimisation, so every tensor keeps its name
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(aug_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    collector = None
    if method != "minmax":
        collector = HistogramCollector(method=method, symmetric=False, num_bins=NUM_BINS,
                                       num_quantized_bins=NUM_QUANTIZED_BINS, percentile=percentile,
                                       scenario="same")
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    sink = io.StringIO()  # ORT's collector prints progress lines to stdout; stdout is for results
    for _ in tqdm(range(len(reader)), desc=f"calibrate ({method})", unit="sample", file=sys.stderr):
        feed = reader.get_next()
        if feed is None:
            break
        outs = session.run(None, feed)
        subs: dict[str, np.ndarray] = {}
        for name, arr in zip(names, outs, strict=True):
            if name not in wanted or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
                continue
            a_min, a_max = float(np.min(arr)), float(np.max(arr))
            lo[name] = min(lo.get(name, a_min), a_min)
            hi[name] = max(hi.get(name, a_max), a_max)
            if collector is not None:
                subs[name] = _subsample(arr).astype(np.float32, copy=False)
        if collector is not None:
            with contextlib.redirect_stdout(sink):
                collector.collect(subs)
        del outs, subs
    if not lo:
        raise CalibrationError("calibration produced no tensor statistics (empty reader?)")

    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    thresholds: dict[str, tuple[float, float]] = {}
    if collector is not None:
        with contextlib.redirect_stdout(sink):
            result = collector.compute_collection_result()
        thresholds = {k: (float(v[0]), float(v[1])) for k, v in result.items()}
    data = {}
    method_amax: dict[str, float] = {}
    max_amax: dict[str, float] = {}
    for name in lo:
        t_lo, t_hi = thresholds.get(name, (lo[name], hi[name]))
        # keep inside the observed range; a non-negative tensor starts at exactly 0
        t_lo = max(t_lo, lo[name])
        t_hi = min(t_hi, hi[name])
        if lo[name] >= 0.0:
            t_lo = 0.0
        if t_hi < t_lo:
            t_lo, t_hi = lo[name], hi[name]
        data[name] = TensorData(lowest=np.array(t_lo, dtype=np.float32), highest=np.array(t_hi, dtype=np.float32))
        method_amax[name] = max(abs(t_lo), abs(t_hi))
        max_amax[name] = max(abs(lo[name]), abs(hi[name]))
    return TensorsData(ort_method, data), method_amax, max_amax
