"""ONNX Runtime backend: the reference backend, always installed (a core dependency).

Runs on the CPU execution provider; CUDA / TensorRT EPs are used only when listed in
``options["providers"]`` AND present in this onnxruntime build (others are logged and skipped, so a
model configured for a GPU device still runs on a CPU-only one). Threads are explicit: ORT's
default (one intra-op thread per core, spinning) competes with the DICOM listener on small devices.

Options understood by ``load``:
    providers: sequence of EP names, or (name, {provider options}) pairs, in priority order.
    allow_spinning: bool, default False: let idle ORT threads spin-wait (lower latency, burns CPU).
    log_severity: int, default 3 (errors only): ORT's own log level.
    warmup_shape: input shape for the warm-up inference (see base.warmup_shape).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.errors import BackendError, BackendUnavailableError
from agent.core.log import log_event
from agent.inference.base import BackendInfo, as_input_batch, check_precision, require_package, warmup_shape
from agent.inference.catalog import register

require_package("onnxruntime")

logger = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


@register("onnxruntime")
class OnnxRuntimeBackend:
    """An ``onnxruntime.InferenceSession`` behind the Backend protocol."""

    name = "onnxruntime"

    def __init__(self) -> None:
        self._session: Any = None
        self._input_name = ""
        self._rank: int | None = None
        self._info: BackendInfo | None = None

    def load(self, model_path: Path, *, precision: str, threads: int, options: Mapping[str, Any]) -> None:
        """Create the session and run one warm-up inference; BackendError on any failure.

        ``precision`` is the variant's precision (the graph decides what ORT computes: an INT8 QDQ
        model runs integer kernels, an FP32 one float); it is reported as given.
        """
        precision = check_precision(precision)
        try:
            import onnxruntime as ort
        except ImportError as exc:  # installed but broken (missing shared library, ABI mismatch)
            raise BackendUnavailableError(
                f"onnxruntime failed to import ({exc}); reinstall it: pip install --force-reinstall onnxruntime"
            ) from exc

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(0, int(threads))  # 0: ORT picks (one per physical core)
        so.inter_op_num_threads = 1  # sequential execution: parallelism is inside the ops
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = int(options.get("log_severity", 3))
        if not options.get("allow_spinning", False):
            # idle worker threads otherwise spin for a while after each run, stealing the cores the
            # DICOM listener and the other stages share with us
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")

        providers = self._providers(options.get("providers", ()), ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own pybind11 exception types
            raise BackendError(f"onnxruntime could not load {model_path.name}: {exc}") from exc

        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise BackendError(f"{model_path.name}: expected one model input, found {len(inputs)}")
        self._session = session
        self._input_name = inputs[0].name
        shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        self._rank = len(shape) if shape else None
        active = tuple(session.get_providers())
        self._info = BackendInfo(
            name=self.name,
            version=ort.__version__,
            device="cuda" if active and active[0] in _GPU_PROVIDERS else "cpu",
            precision=precision,
            providers=active,
        )
        # warm-up: the first run allocates arenas and picks kernels; pay that at load, not per job
        self.run(np.zeros(warmup_shape(shape, options), dtype=np.float32))
        log_event(
            logger,
            "backend.loaded",
            backend=self.name,
            model=model_path.name,
            precision=precision,
            providers=",".join(active),
            threads=so.intra_op_num_threads,
        )

    @staticmethod
    def _providers(requested: Any, available: list[str]) -> list[Any]:
        """Requested EPs that this build has, in order, always ending with the CPU EP."""
        chosen: list[Any] = []
        for entry in requested:
            ep = entry[0] if isinstance(entry, (tuple, list)) else entry
            if ep == _CPU:
                continue
            if ep in available:
                chosen.append(tuple(entry) if isinstance(entry, (tuple, list)) else ep)
            else:
                log_event(
                    logger,
                    "backend.provider_unavailable",
                    logging.WARNING,
                    backend="onnxruntime",
                    provider=ep,
                    available=",".join(available),
                )
        chosen.append(_CPU)
        return chosen

    def run(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """One batch (N, C, *spatial) -> the first output as float32; BackendError on failure."""
        if self._session is None:
            raise BackendError("onnxruntime: run() before load()")
        batch = as_input_batch(inputs, self._rank, self.name)
        try:
            out = self._session.run(None, {self._input_name: batch})[0]
        except Exception as exc:  # ORT's pybind11 exceptions (InvalidArgument, Fail, ...)
            raise BackendError(f"onnxruntime inference failed on input {batch.shape}: {exc}") from exc
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> BackendInfo:
        """Library, version, device, precision and active execution providers."""
        if self._info is None:
            raise BackendError("onnxruntime: describe() before load()")
        return self._info
