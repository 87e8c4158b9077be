"""TensorRT backend (NVIDIA GPUs, Jetson), installed with ``pip install edge-agent[gpu]`` (or JetPack).

TensorRT engines are not portable: an engine runs only on the GPU architecture and the TensorRT
version that built it. So the registry ships the ONNX graph (FP32, or an INT8/FP8 explicit
quantization Q/DQ graph) and this backend builds the engine *on the device*, once, and keeps it in
an engine cache keyed by everything that makes an engine different::

    (GPU name, compute capability, TensorRT version, ONNX sha256, precision, typing mode,
     builder flags, optimization-profile shapes, workspace limit, optimization level)

A later ``load`` with the same key deserializes the cached engine (seconds instead of minutes);
a driver/TensorRT upgrade or a different GPU changes the key and triggers a rebuild. A cached
engine that does not deserialize (truncated, written by a crashed build, bit rot) is deleted and
rebuilt once. The builder's timing cache is kept per (GPU, CC, TensorRT version) and reused by
every build on this device, which makes rebuilds much faster.

Precision and typing (TensorRT 10 deprecates weak typing; TensorRT 11 removes the precision flags):

=========  ========================================  =========================================
precision  weak typing (TensorRT 10 default)          strong typing (``typing="strong"``, TRT 11)
=========  ========================================  =========================================
fp32       no flag (TF32 as TensorRT defaults)       graph dtypes
fp16       FP16 flag                                 graph must already be FP16
bf16       BF16 flag (CC >= 8.0)                     graph must already be BF16
int8       INT8 + FP16 flags: Q/DQ layers in INT8,   Q/DQ layers in INT8, the rest in the graph's
           the rest may run in FP16 (CC >= 6.1)      float type
fp8        FP8 + FP16 flags (CC >= 8.9)              as int8, FP8 Q/DQ (CC >= 8.9)
=========  ========================================  =========================================

FP8 below compute capability 8.9 (Ampere, Jetson Orin 8.7) is refused with BackendUnavailableError
before anything is built; a failed build raises BackendError, so the agent falls back to a CPU
variant.

Options understood by ``load``:
    cache_dir: engine + timing cache folder (default ``<model dir>/engine-cache``; the service
        should pass ``<state dir>/engine-cache`` so installed version folders stay read-only).
    device: CUDA device index, default 0.
    input_shape / warmup_shape: the input shape with the batch dimension, e.g. (1, 1, 96, 96, 96);
        fills every dynamic dimension of the optimization profile; required when the ONNX
        input has dynamic spatial dimensions.
    opt_batch / max_batch: the profile's batch sizes (default: the batch of input_shape); larger
        batches are run in chunks of max_batch.
    typing: "auto" (default: weak while TensorRT has precision flags, else strong), "weak", "strong".
    fp16_fallback: weak typing, int8/fp8: also allow FP16 for non-quantized layers (default True).
    workspace_mb: builder workspace limit (default: TensorRT's, the whole device memory).
    optimization_level: builder optimization level 0-5 (default: TensorRT's, 3).
    timing_cache: bool, default True.

The package: this module is the backend (``TensorRtBackend``, registered as "tensorrt"), ``cuda``
the CUDA runtime calls (cuda-python or pycuda), ``engines`` the engine key, cache folder, build and
deserialization. The heavy modules are reached only through this module's ``_import_trt()`` and
``_import_cuda()`` so tests substitute fakes; nothing here runs on import except the cheap
``require_package`` check.
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
from agent.inference.backends.tensorrt.cuda import CudaApi
from agent.inference.backends.tensorrt.cuda import import_cuda as _import_cuda  # tests replace it
from agent.inference.backends.tensorrt.engines import (
    ENGINE_SUFFIX,
    EngineCache,
    EngineKey,
    TrtLog,
    build_engine,
    deserialize,
    engine_cache_entries,
    engine_key,
)
from agent.inference.base import BackendInfo, as_input_batch, check_precision, require_package
from agent.inference.catalog import register

require_package("tensorrt")

__all__ = [
    "ENGINE_SUFFIX",
    "MIN_CC",
    "CudaApi",
    "EngineCache",
    "EngineKey",
    "TensorRtBackend",
    "engine_cache_entries",
]

logger = logging.getLogger(__name__)

#: lowest compute capability per precision (TensorRT support matrix: FP8 on Ada/Hopper and later)
MIN_CC = {"fp8": (8, 9), "bf16": (8, 0), "int8": (6, 1)}


def _import_trt() -> Any:
    """The ``tensorrt`` module (tests replace this function with one returning a fake)."""
    try:
        import tensorrt as trt
    except ImportError as exc:  # installed (find_spec saw it) but broken: missing libnvinfer, ABI
        raise BackendUnavailableError(
            f"tensorrt failed to import ({exc}); install the gpu extra from NVIDIA's index "
            "(pip install edge-agent[gpu] --extra-index-url https://pypi.nvidia.com) or JetPack's "
            "python3-libnvinfer (see docs/gpu.md)"
        ) from exc
    return trt


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


@register("tensorrt")
class TensorRtBackend:
    """A TensorRT engine built on this device from the variant's ONNX, behind the Backend protocol."""

    name = "tensorrt"

    def __init__(self) -> None:
        self._trt: Any = None
        self._cuda: CudaApi | None = None
        self._engine: Any = None
        self._context: Any = None
        self._input = ""
        self._outputs: list[str] = []
        self._rank: int | None = None
        self._max_batch = 1
        self._device_bufs: dict[str, tuple[int, int]] = {}  # name -> (ptr, capacity bytes)
        self._host_bufs: dict[str, npt.NDArray[np.uint8]] = {}
        self._info: BackendInfo | None = None
        self._log: TrtLog | None = None
        self._runtime: Any = None
        self.built = False  # whether the last load built the engine (False: came from the cache)

    # ---- load ----------------------------------------------------------------------------------
    def load(self, model_path: Path, *, precision: str, threads: int, options: Mapping[str, Any]) -> None:
        """Build (or fetch from the engine cache) the engine for ``model_path`` and warm it up.

        ``threads`` is unused (the GPU does the work). Raises BackendUnavailableError when tensorrt /
        CUDA bindings are missing or the GPU cannot run ``precision`` (FP8 below CC 8.9),
        BackendError when the build, deserialization or warm-up fails.
        """
        precision = check_precision(precision)
        model_path = Path(model_path)
        trt = _import_trt()
        cuda = _import_cuda(int(options.get("device", 0)))
        try:
            self._load(trt, cuda, model_path, precision, options)
        except BaseException:
            self._release()
            cuda.close()
            raise

    def _load(self, trt: Any, cuda: CudaApi, model_path: Path, precision: str,
              options: Mapping[str, Any]) -> None:
        self._trt, self._cuda = trt, cuda
        gpu_name, cc = cuda.device_info()
        need = MIN_CC.get(precision)
        if need is not None and _cc_tuple(cc) < need:
            raise BackendUnavailableError(
                f"{precision.upper()} TensorRT engines need compute capability >= {need[0]}.{need[1]}; "
                f"{gpu_name} has {cc}"
            )
        key = self._key(trt, gpu_name, cc, model_path, precision, options)
        cache = EngineCache(Path(options.get("cache_dir") or model_path.parent / "engine-cache"))
        self._log = log = TrtLog(trt)
        runtime = trt.Runtime(log.logger)

        engine = None
        blob = cache.load(key)
        self.built = False
        if blob is not None:
            engine = deserialize(runtime, blob)
            if engine is None:
                # a truncated or corrupted engine file: rebuild once rather than fail the model
                log_event(logger, "tensorrt.cache_corrupt", logging.WARNING, path=str(cache.engine_path(key)))
                cache.delete(key)
            else:
                log_event(logger, "tensorrt.cache_hit", model=model_path.name, key=key.digest()[:16])
        if engine is None:
            blob = build_engine(trt, log, model_path, key, cache, options)
            self.built = True
            engine = deserialize(runtime, blob)
            if engine is None:
                raise BackendError(f"TensorRT built an engine for {model_path.name} that does not "
                                   f"deserialize: {log.text()}")
            cache.save(key, blob)
            cache.prune_other_versions(key.tensorrt_version)
        self._runtime = runtime  # the runtime must outlive its engines
        self._engine = engine
        self._bind(trt, engine, model_path)
        self._info = BackendInfo(
            name=self.name,
            version=str(trt.__version__),
            device="cuda",
            precision=precision,
            providers=(f"cuda:{int(options.get('device', 0))} {gpu_name} (CC {cc})",),
        )
        shape = self._warmup_shape(engine, options)
        self.run(np.zeros(shape, dtype=np.float32))
        log_event(logger, "backend.loaded", backend=self.name, model=model_path.name, precision=precision,
                  gpu=gpu_name, cc=cc, built=self.built, typing=key.typing, flags=",".join(key.flags))

    def _key(self, trt: Any, gpu_name: str, cc: str, model_path: Path, precision: str,
             options: Mapping[str, Any]) -> EngineKey:
        return engine_key(trt, gpu_name, cc, model_path, precision, options)

    def _errors_text(self) -> str:
        return self._log.text() if self._log is not None else "TensorRT logged no error"

    def _bind(self, trt: Any, engine: Any, model_path: Path) -> None:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        if len(inputs) != 1 or not self._outputs:
            raise BackendError(f"{model_path.name}: expected one input and at least one output, "
                               f"engine has inputs {inputs} and outputs {self._outputs}")
        self._input = inputs[0]
        shape = tuple(int(d) for d in engine.get_tensor_shape(self._input))
        self._rank = len(shape)
        if shape[0] < 0:
            self._max_batch = int(engine.get_tensor_profile_shape(self._input, 0)[2][0])
        else:
            self._max_batch = shape[0]
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{model_path.name}: TensorRT could not create an execution context "
                               f"(GPU memory?): {self._errors_text()}")

    def _warmup_shape(self, engine: Any, options: Mapping[str, Any]) -> tuple[int, ...]:
        given = options.get("warmup_shape") or options.get("input_shape")
        if given:
            return tuple(int(d) for d in given)
        shape = tuple(int(d) for d in engine.get_tensor_shape(self._input))
        if any(d < 0 for d in shape):
            return tuple(int(d) for d in engine.get_tensor_profile_shape(self._input, 0)[0])
        return shape

    # ---- run -----------------------------------------------------------------------------------
    def run(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """One batch (N, C, *spatial) float32 -> the first output as float32; batches larger than
        the engine's profile run in chunks. BackendError on failure."""
        if self._context is None or self._cuda is None:
            raise BackendError("tensorrt: run() before load()")
        batch = as_input_batch(inputs, self._rank, self.name)
        step = self._max_batch
        parts = [self._run_chunk(batch[i:i + step]) for i in range(0, batch.shape[0], step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _buffers(self, name: str, nbytes: int) -> tuple[int, npt.NDArray[np.uint8]]:
        """Device + pinned host buffers for tensor ``name`` of at least ``nbytes`` (grown on demand)."""
        assert self._cuda is not None
        ptr, cap = self._device_bufs.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                self._cuda.free(ptr)
            ptr = self._cuda.malloc(max(nbytes, 1))
            self._device_bufs[name] = (ptr, nbytes)
            self._host_bufs[name] = self._cuda.pinned(max(nbytes, 1))
        return ptr, self._host_bufs[name]

    def _run_chunk(self, chunk: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        trt, ctx, cuda, engine = self._trt, self._context, self._cuda, self._engine
        assert cuda is not None
        try:
            in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input)))
            data = np.ascontiguousarray(chunk, dtype=in_dtype)
            if not ctx.set_input_shape(self._input, tuple(data.shape)):
                raise BackendError(f"tensorrt: input shape {data.shape} is outside the engine's profile "
                                   f"(max batch {self._max_batch}): {self._errors_text()}")
            in_ptr, in_host = self._buffers(self._input, data.nbytes)
            in_host[: data.nbytes] = data.reshape(-1).view(np.uint8)
            cuda.htod_async(in_ptr, in_host[: data.nbytes])
            ctx.set_tensor_address(self._input, in_ptr)
            outs = []
            for name in self._outputs:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
                nbytes = int(np.prod(shape)) * dtype.itemsize
                ptr, host = self._buffers(name, nbytes)
                ctx.set_tensor_address(name, ptr)
                outs.append((name, shape, dtype, nbytes, ptr, host))
            if not ctx.execute_async_v3(cuda.stream_handle):
                raise BackendError(f"tensorrt: execution failed on input {data.shape}: {self._errors_text()}")
            for _name, _shape, _dtype, nbytes, ptr, host in outs:
                cuda.dtoh_async(host[:nbytes], ptr)
            cuda.synchronize()
        except BackendError:
            raise
        except Exception as exc:  # TensorRT / CUDA binding errors
            raise BackendError(f"tensorrt inference failed on input {chunk.shape}: {exc}") from exc
        _name, shape, dtype, nbytes, _ptr, host = outs[0]
        out: npt.NDArray[np.float32] = host[:nbytes].view(dtype).reshape(shape).astype(np.float32)
        return out  # a copy: the pinned buffer is reused by the next run

    def describe(self) -> BackendInfo:
        """Library, version, device, precision (as requested: the engine's layers may mix in FP16)."""
        if self._info is None:
            raise BackendError("tensorrt: describe() before load()")
        return self._info

    def _release(self) -> None:
        if self._cuda is not None:
            for ptr, _cap in self._device_bufs.values():
                self._cuda.free(ptr)
        self._device_bufs.clear()
        self._host_bufs.clear()
        self._context = None
        self._engine = None

    def close(self) -> None:
        """Free GPU buffers, the engine and the stream (the worker calls this before exiting)."""
        self._release()
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
