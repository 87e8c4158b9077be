"""OpenVINO backend (CPU), installed with ``pip install edge-agent[openvino]``.

The precision is set explicitly: OpenVINO runs FP32 models in bf16 by default on CPUs with
AVX512_BF16 / AMX, which changes results without saying so. ``load`` sets
``INFERENCE_PRECISION_HINT`` from the requested precision and ``describe()`` reports what the
compiled model reads back, so a result's ``ModelRef.precision`` is the precision that produced it.

=========  ==========================  ==================================================
requested  INFERENCE_PRECISION_HINT    reported precision
=========  ==========================  ==================================================
fp32       f32                         fp32 (read back)
bf16       bf16                        bf16, or fp32 on a CPU without bf16 support
fp16       f16                         as read back
int8/fp8   f32 (non-quantized ops)     ``int8``; ``int8+bf16`` if the float parts run bf16
=========  ==========================  ==================================================

Options understood by ``load``:
    device: OpenVINO device, default "CPU".
    inference_precision: override the hint ("f32", "bf16", "f16").
    config: extra compile properties (e.g. {"CACHE_DIR": "/var/cache/edge-agent/ov"}).
    warmup_shape: input shape for the warm-up inference (see base.warmup_shape); also the shape
        compiled statically (below).
    static_shape: bool, default True: compile the model for exactly the warm-up shape, and use
        a second, dynamic-batch compilation (made on first use) for any other shape. A static
        compilation skips OpenVINO's per-call shape inference and memory re-planning: 7-12 % off a
        batch-1 classifier slice, 1-7 % off a 3D patch (docs/benchmarks.md). False: one
        dynamic-batch compilation for every call (less memory when shapes vary).
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

require_package("openvino")

logger = logging.getLogger(__name__)

#: agent precision -> OpenVINO element type name used as INFERENCE_PRECISION_HINT
_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32", "fp8": "f32"}
#: OpenVINO element type name read back -> agent precision
_FROM_OV = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


@register("openvino")
class OpenVinoBackend:
    """An ``openvino`` model compiled for the expected input shape (plus, made on first use, a
    dynamic-batch compilation for other shapes) behind the Backend protocol."""

    name = "openvino"

    def __init__(self) -> None:
        self._request: Any = None  # compiled for exactly _static_shape
        self._static_shape: tuple[int, ...] | None = None
        self._dynamic_request: Any = None  # compiled from _model on first use of another shape
        self._core: Any = None
        self._model: Any = None  # the model with a dynamic batch dimension
        self._device = "CPU"
        self._config: dict[str, Any] = {}
        self._rank: int | None = None
        self._info: BackendInfo | None = None

    def load(self, model_path: Path, *, precision: str, threads: int, options: Mapping[str, Any]) -> None:
        """Read the ONNX model, make its batch dimension dynamic, compile it for the warm-up shape
        (``static_shape``, the default) with an explicit precision hint and thread count, and run
        one warm-up inference. BackendError on failure."""
        precision = check_precision(precision)
        try:
            import openvino as ov
        except ImportError as exc:  # installed but broken
            raise BackendUnavailableError(
                f"openvino failed to import ({exc}); reinstall it: pip install --force-reinstall "
                "edge-agent[openvino]"
            ) from exc

        device = str(options.get("device", "CPU"))
        hint = str(options.get("inference_precision", _HINT[precision]))
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",  # one stream: jobs are serial, we want per-job latency
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        config.update(dict(options.get("config", {})))
        compile_static = bool(options.get("static_shape", True))
        try:
            core = ov.Core()
            model = core.read_model(str(model_path))
            if len(model.inputs) != 1:
                raise BackendError(f"{model_path.name}: expected one model input, found {len(model.inputs)}")
            pshape = model.input(0).get_partial_shape()
            if pshape.rank.is_dynamic:
                raise BackendError(
                    f"{model_path.name}: model input rank is dynamic; export with a fixed rank"
                )
            dims = list(pshape)
            if dims and dims[0].is_static:
                # exported with batch 1: make it dynamic so sliding-window batches of N run
                model.reshape({model.input(0): ov.PartialShape([ov.Dimension(), *dims[1:]])})
            static = tuple(d.get_length() if d.is_static else None for d in dims)
            shape = warmup_shape(static, options)
            if compile_static:
                fixed = model.clone()
                fixed.reshape({fixed.input(0): ov.PartialShape(list(shape))})
                compiled = core.compile_model(fixed, device, config)
            else:
                compiled = core.compile_model(model, device, config)
            read_back = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            request = compiled.create_infer_request()
        except BackendError:
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its own messages
            raise BackendError(f"openvino could not load {model_path.name} on {device}: {exc}") from exc

        if compile_static:
            self._request, self._static_shape = request, shape
        else:
            self._dynamic_request = request
        self._core, self._model, self._device, self._config = core, model, device, config
        self._rank = len(dims)
        actual = _FROM_OV.get(read_back, read_back)
        if precision in ("int8", "fp8"):
            reported = precision if actual == "fp32" else f"{precision}+{actual}"
        else:
            reported = actual
            if actual != precision:
                # e.g. bf16 asked on a CPU without bf16: OpenVINO falls back; report what runs
                log_event(
                    logger,
                    "backend.precision_changed",
                    logging.WARNING,
                    backend=self.name,
                    requested=precision,
                    actual=actual,
                )
        self._info = BackendInfo(
            name=self.name,
            version=ov.__version__.split("-")[0],
            device=device.lower(),
            precision=reported,
            providers=(device,),
        )
        self.run(np.zeros(shape, dtype=np.float32))
        log_event(
            logger,
            "backend.loaded",
            backend=self.name,
            model=model_path.name,
            precision=reported,
            hint=read_back,
            device=device,
            threads=threads,
        )

    def run(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """One batch (N, C, *spatial) -> the first output as float32; BackendError on failure."""
        if self._model is None:
            raise BackendError("openvino: run() before load()")
        batch = as_input_batch(inputs, self._rank, self.name)
        try:
            request = self._request if batch.shape == self._static_shape else self._dynamic()
            request.infer({0: batch})
            # copy: the output tensor's buffer is reused by the next infer() on this request
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        except Exception as exc:  # OpenVINO RuntimeError (shape mismatch, allocation, ...)
            raise BackendError(f"openvino inference failed on input {batch.shape}: {exc}") from exc

    def _dynamic(self) -> Any:
        """The dynamic-batch request, compiled on the first call whose shape is not the static one."""
        if self._dynamic_request is None:
            compiled = self._core.compile_model(self._model, self._device, self._config)
            self._dynamic_request = compiled.create_infer_request()
            log_event(logger, "backend.dynamic_compiled", backend=self.name, static_shape=self._static_shape)
        return self._dynamic_request

    def describe(self) -> BackendInfo:
        """Library, version, device and the precision read back from the compiled model."""
        if self._info is None:
            raise BackendError("openvino: describe() before load()")
        return self._info
