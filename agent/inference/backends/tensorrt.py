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

The heavy modules are reached only through ``_import_trt()`` and ``_import_cuda()`` so tests
substitute fakes; nothing here runs on import except the cheap ``require_package`` check.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.errors import BackendError, BackendUnavailableError
from agent.inference.base import BackendInfo, as_input_batch, check_precision, require_package
from agent.inference.registry import register
from agent.log import log_event

require_package("tensorrt")

logger = logging.getLogger(__name__)

#: lowest compute capability per precision (TensorRT support matrix: FP8 on Ada/Hopper and later)
MIN_CC = {"fp8": (8, 9), "bf16": (8, 0), "int8": (6, 1)}
_PRECISION_FLAG = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}
ENGINE_SUFFIX = ".engine"


# ---------------------------------------------------------------------------- module injection


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


class CudaApi(Protocol):
    """The few CUDA runtime calls the backend needs, on one device and one stream."""

    stream_handle: int

    def device_info(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor")."""
        ...

    def malloc(self, nbytes: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def pinned(self, nbytes: int) -> np.ndarray:
        """A page-locked host buffer of ``nbytes`` (uint8) for asynchronous copies."""
        ...

    def htod_async(self, dst: int, src: np.ndarray) -> None: ...

    def dtoh_async(self, dst: np.ndarray, src: int) -> None: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


class _CudaPython:
    """CudaApi over NVIDIA's cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""

    def __init__(self, cudart: Any, device: int) -> None:
        self._rt = cudart
        self._device = device
        self._pinned: list[int] = []
        self._check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self._stream)

    def _check(self, result: Any, what: str) -> Any:
        # cuda-python returns (error, *values)
        err = result[0] if isinstance(result, tuple) else result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA {what} failed: {self._rt.cudaGetErrorName(err)[1]!r}")
        if isinstance(result, tuple) and len(result) > 1:
            return result[1]
        return None

    def device_info(self) -> tuple[str, str]:
        prop = self._check(self._rt.cudaGetDeviceProperties(self._device), "cudaGetDeviceProperties")
        name = prop.name
        name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
        return name.strip(), f"{prop.major}.{prop.minor}"

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._check(self._rt.cudaFree(ptr), "cudaFree")

    def pinned(self, nbytes: int) -> np.ndarray:
        ptr = int(self._check(self._rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        self._pinned.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def htod_async(self, dst: int, src: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._stream), "memcpy H2D")

    def dtoh_async(self, dst: np.ndarray, src: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._stream), "memcpy D2H")

    def synchronize(self) -> None:
        self._check(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._pinned:
            self._check(self._rt.cudaFreeHost(ptr), "cudaFreeHost")
        self._pinned.clear()
        self._check(self._rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")


class _PyCuda:
    """CudaApi over pycuda (the ``gpu`` extra's default), using the device's primary context."""

    def __init__(self, driver: Any, device: int) -> None:
        self._cuda = driver
        driver.init()
        self._dev = driver.Device(device)
        self._ctx = self._dev.retain_primary_context()
        self._ctx.push()
        self._stream = driver.Stream()
        self.stream_handle = int(self._stream.handle)
        self._allocs: dict[int, Any] = {}

    def device_info(self) -> tuple[str, str]:
        major, minor = self._dev.compute_capability()
        return str(self._dev.name()), f"{major}.{minor}"

    def malloc(self, nbytes: int) -> int:
        alloc = self._cuda.mem_alloc(nbytes)
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def pinned(self, nbytes: int) -> np.ndarray:
        return self._cuda.pagelocked_empty(nbytes, np.uint8)

    def htod_async(self, dst: int, src: np.ndarray) -> None:
        self._cuda.memcpy_htod_async(dst, src, self._stream)

    def dtoh_async(self, dst: np.ndarray, src: int) -> None:
        self._cuda.memcpy_dtoh_async(dst, src, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        for ptr in list(self._allocs):
            self.free(ptr)
        self._ctx.pop()


def _import_cuda(device: int) -> CudaApi:
    """A CudaApi on ``device``: cuda-python if installed, else pycuda (tests replace this)."""
    # cuda-python >= 12.6 moved the runtime bindings to cuda.bindings; older ones have cuda.cudart
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = importlib.import_module(name)
        except ImportError:
            continue
        return _CudaPython(cudart, device)
    try:
        import pycuda.driver as driver
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT needs a CUDA Python binding: pip install cuda-python (or pycuda)"
        ) from exc
    try:
        return _PyCuda(driver, device)
    except driver.Error as exc:
        raise BackendError(f"CUDA device {device} cannot be opened: {exc}") from exc


# -------------------------------------------------------------------------------- engine cache


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes one built engine differ from another (see the module docstring)."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    onnx_sha256: str
    precision: str
    typing: str
    flags: tuple[str, ...]
    input_shape: tuple[int, ...] | None
    opt_batch: int | None
    max_batch: int | None
    workspace_mb: int | None
    optimization_level: int | None

    def digest(self) -> str:
        """SHA-256 of the key's canonical JSON: the engine's file name in the cache."""
        doc = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "gpu"


class EngineCache:
    """Engines (``<digest>.engine`` + ``<digest>.json`` with the key) and timing caches in one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()}{ENGINE_SUFFIX}"

    def timing_cache_path(self, key: EngineKey) -> Path:
        """One timing cache per GPU model, CC and TensorRT version (it is specific to all three)."""
        return self.root / f"timing-{_slug(key.gpu_name)}-sm{key.compute_capability}-trt{key.tensorrt_version}.cache"

    def load(self, key: EngineKey) -> bytes | None:
        try:
            return self.engine_path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log_event(logger, "tensorrt.cache_unreadable", logging.WARNING, path=str(self.engine_path(key)), error=exc)
            return None

    def save(self, key: EngineKey, engine: bytes) -> None:
        """Write atomically (temp + fsync + rename): a crash never leaves a half engine under the key."""
        meta = json.dumps(asdict(key), indent=2, sort_keys=True).encode()
        _write_atomic(self.root / f"{key.digest()}.json", meta)
        _write_atomic(self.engine_path(key), engine)

    def delete(self, key: EngineKey) -> None:
        self.engine_path(key).unlink(missing_ok=True)
        (self.root / f"{key.digest()}.json").unlink(missing_ok=True)

    def prune_other_versions(self, tensorrt_version: str) -> list[str]:
        """Delete engines and timing caches made by another TensorRT version: this TensorRT cannot
        load them, and they can be large. Returns the removed file names."""
        removed = []
        for meta in self.root.glob("*.json"):
            try:
                version = json.loads(meta.read_text()).get("tensorrt_version")
            except (OSError, ValueError):
                continue  # a half-written sidecar: leave it, the engine next to it is keyed anyway
            if version is not None and version != tensorrt_version:
                engine = meta.with_suffix(ENGINE_SUFFIX)
                engine.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                removed.append(engine.name)
        for timing in self.root.glob("timing-*.cache"):
            if not timing.name.endswith(f"-trt{tensorrt_version}.cache"):
                timing.unlink(missing_ok=True)
                removed.append(timing.name)
        if removed:
            log_event(logger, "tensorrt.cache_pruned", removed=",".join(sorted(removed)))
        return removed

    def load_timing(self, key: EngineKey) -> bytes:
        try:
            return self.timing_cache_path(key).read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            log_event(logger, "tensorrt.timing_cache_unreadable", logging.WARNING, error=exc)
            return b""

    def save_timing(self, key: EngineKey, data: bytes) -> None:
        _write_atomic(self.timing_cache_path(key), data)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


# ------------------------------------------------------------------------------------- backend


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
        self._host_bufs: dict[str, np.ndarray] = {}
        self._info: BackendInfo | None = None
        self._trt_errors: list[str] = []
        self._trt_logger: Any = None
        self._runtime: Any = None
        self.built = False  # whether the last load built the engine (False: came from the cache)

    # ------------------------------------------------------------------------------------ load

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

    def _load(self, trt: Any, cuda: CudaApi, model_path: Path, precision: str, options: Mapping[str, Any]) -> None:
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
        self._trt_logger = self._make_logger(trt)
        runtime = trt.Runtime(self._trt_logger)

        engine = None
        blob = cache.load(key)
        self.built = False
        if blob is not None:
            engine = self._deserialize(runtime, blob)
            if engine is None:
                # a truncated or corrupted engine file: rebuild once rather than fail the model
                log_event(logger, "tensorrt.cache_corrupt", logging.WARNING, path=str(cache.engine_path(key)))
                cache.delete(key)
            else:
                log_event(logger, "tensorrt.cache_hit", model=model_path.name, key=key.digest()[:16])
        if engine is None:
            blob = self._build(trt, model_path, key, cache, options)
            self.built = True
            engine = self._deserialize(runtime, blob)
            if engine is None:
                raise BackendError(f"TensorRT built an engine for {model_path.name} that does not deserialize: "
                                   + self._errors_text())
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
        typing = str(options.get("typing", "auto"))
        if typing not in {"auto", "weak", "strong"}:
            raise BackendError(f"tensorrt option typing={typing!r}: expected auto, weak or strong")
        has_flags = hasattr(trt.BuilderFlag, "INT8")  # TensorRT 11 removed the precision flags
        if typing == "auto":
            typing = "weak" if has_flags else "strong"
        flags: list[str] = []
        if typing == "weak":
            if not has_flags:
                raise BackendError("this TensorRT has no precision flags (weak typing removed); use typing='strong'")
            if precision in _PRECISION_FLAG:
                flags.append(_PRECISION_FLAG[precision])
            if precision in {"int8", "fp8"} and options.get("fp16_fallback", True):
                flags.append("FP16")  # non-quantized layers (e.g. ConvTranspose3d) may run in FP16
        shape = options.get("input_shape") or options.get("warmup_shape")
        input_shape = tuple(int(d) for d in shape) if shape else None
        opt_batch = options.get("opt_batch") or (input_shape[0] if input_shape else None)
        max_batch = options.get("max_batch") or opt_batch
        try:
            digest = _sha256_file(model_path)
        except OSError as exc:
            raise BackendError(f"cannot read {model_path}: {exc}") from exc
        return EngineKey(
            gpu_name=gpu_name, compute_capability=cc, tensorrt_version=str(trt.__version__),
            onnx_sha256=digest, precision=precision, typing=typing, flags=tuple(flags),
            input_shape=input_shape, opt_batch=int(opt_batch) if opt_batch else None,
            max_batch=int(max_batch) if max_batch else None,
            workspace_mb=int(options["workspace_mb"]) if options.get("workspace_mb") else None,
            optimization_level=int(options["optimization_level"]) if options.get("optimization_level") is not None else None,
        )

    def _make_logger(self, trt: Any) -> Any:
        errors = self._trt_errors

        class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            """Forwards TensorRT's messages to logging and keeps the errors for our exceptions."""

            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                sev = str(severity).upper()
                if "ERROR" in sev:
                    errors.append(str(msg))
                    del errors[:-20]
                    level = logging.ERROR
                elif "WARNING" in sev:
                    level = logging.WARNING
                else:
                    level = logging.DEBUG
                log_event(logger, "tensorrt.log", level, severity=sev, message=str(msg)[:500])

        return _Logger()

    def _errors_text(self) -> str:
        return "; ".join(self._trt_errors[-5:]) or "TensorRT logged no error"

    def _deserialize(self, runtime: Any, blob: bytes) -> Any:
        try:
            return runtime.deserialize_cuda_engine(blob)
        except (RuntimeError, TypeError, ValueError) as exc:  # the bindings raise on garbage, or return None
            log_event(logger, "tensorrt.deserialize_failed", logging.WARNING, error=exc)
            return None

    def _build(self, trt: Any, model_path: Path, key: EngineKey, cache: EngineCache,
               options: Mapping[str, Any]) -> bytes:
        """Parse the ONNX and build a serialized engine; saves the timing cache. BackendError on failure."""
        log_event(logger, "tensorrt.building", model=model_path.name, precision=key.precision,
                  typing=key.typing, flags=",".join(key.flags), gpu=key.gpu_name, cc=key.compute_capability)
        self._trt_errors.clear()
        try:
            builder = trt.Builder(self._trt_logger)
            net_flags = 0
            if key.typing == "strong":
                net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(net_flags)
            parser = trt.OnnxParser(network, self._trt_logger)
            # parse_from_file resolves external weight files next to the model
            if not parser.parse_from_file(str(model_path)):
                errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise BackendError(f"TensorRT cannot parse {model_path.name}: {'; '.join(errs) or self._errors_text()}")
            config = builder.create_builder_config()
            for flag in key.flags:
                config.set_flag(getattr(trt.BuilderFlag, flag))
            if key.workspace_mb:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key.workspace_mb << 20)
            if key.optimization_level is not None:
                config.builder_optimization_level = key.optimization_level
            profile = self._profile(builder, network, key, model_path)
            if profile is not None:
                config.add_optimization_profile(profile)
            use_timing = bool(options.get("timing_cache", True))
            if use_timing:
                timing = config.create_timing_cache(cache.load_timing(key))
                config.set_timing_cache(timing, False)  # ignore_mismatch=False: never reuse another GPU's
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise BackendError(f"TensorRT failed to build {model_path.name} ({key.precision}, "
                                   f"{key.typing} typing): {self._errors_text()}")
            blob = bytes(serialized)
            if use_timing:
                cache.save_timing(key, bytes(config.get_timing_cache().serialize()))
        except BackendError:
            raise
        except Exception as exc:  # TensorRT's bindings raise RuntimeError/TypeError/ValueError
            raise BackendError(f"TensorRT build of {model_path.name} failed: {exc}") from exc
        return blob

    def _profile(self, builder: Any, network: Any, key: EngineKey, model_path: Path) -> Any:
        """An optimization profile covering dynamic dimensions (batch 1..max_batch), or None if static."""
        profile = None
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            dims = tuple(int(d) for d in inp.shape)
            if all(d >= 0 for d in dims):
                continue
            given = key.input_shape
            if given is None or len(given) != len(dims):
                raise BackendError(
                    f"{model_path.name}: input {inp.name!r} has dynamic shape {dims}; pass options "
                    f"input_shape (N, C, *spatial) of rank {len(dims)}")
            base = tuple(g if d < 0 else d for d, g in zip(dims, given, strict=True))
            opt_b = key.opt_batch or base[0]
            max_b = max(key.max_batch or opt_b, opt_b)
            lo = (1 if dims[0] < 0 else base[0], *base[1:])
            opt = (opt_b if dims[0] < 0 else base[0], *base[1:])
            hi = (max_b if dims[0] < 0 else base[0], *base[1:])
            if profile is None:
                profile = builder.create_optimization_profile()
            profile.set_shape(inp.name, lo, opt, hi)
        return profile

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

    # ------------------------------------------------------------------------------------- run

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """One batch (N, C, *spatial) float32 -> the first output as float32; batches larger than
        the engine's profile run in chunks. BackendError on failure."""
        if self._context is None or self._cuda is None:
            raise BackendError("tensorrt: run() before load()")
        batch = as_input_batch(inputs, self._rank, self.name)
        parts = [self._run_chunk(batch[i:i + self._max_batch]) for i in range(0, batch.shape[0], self._max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _buffers(self, name: str, nbytes: int) -> tuple[int, np.ndarray]:
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

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
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
        return host[:nbytes].view(dtype).reshape(shape).astype(np.float32)  # copies out of the pinned buffer

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


def engine_cache_entries(cache_dir: Path) -> Sequence[Mapping[str, Any]]:
    """The keys of the engines in ``cache_dir`` (for ``edge-agent`` diagnostics and pruning)."""
    out = []
    for meta in sorted(Path(cache_dir).glob("*.json")):
        try:
            out.append(json.loads(meta.read_text()))
        except (OSError, ValueError) as exc:
            log_event(logger, "tensorrt.cache_meta_unreadable", logging.WARNING, path=str(meta), error=exc)
    return out
