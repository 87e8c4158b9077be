"""TensorRT engines on disk: what identifies one (``EngineKey``), where it is kept (``EngineCache``),
and how one is made (``build_engine``: ONNX file -> serialized engine bytes) or read back
(``deserialize``: bytes -> engine, or None for a file that is not one).

The cache folder holds ``<digest>.engine`` with a ``<digest>.json`` sidecar naming its key, and one
builder timing cache per (GPU name, compute capability, TensorRT version). Files are written
atomically (``agent.core.util.atomic_write``), so a crash never leaves half an engine under a key;
engines and timing caches of another TensorRT version are pruned (this TensorRT cannot load them).

Every function takes the ``tensorrt`` module as an argument (``trt``): the backend imports it
lazily, and tests pass a fake.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.core.errors import BackendError
from agent.core.log import log_event
from agent.core.util import atomic_write, sha256_bytes, sha256_file

# the backend's logger, as before the split: log filters and dashboards select on its name
logger = logging.getLogger("agent.inference.backends.tensorrt")

ENGINE_SUFFIX = ".engine"
_PRECISION_FLAG = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}


# ---- keys ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineKey:
    """Everything that makes one built engine differ from another (see the backend's docstring)."""

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
        return sha256_bytes(doc.encode())


def engine_key(trt: Any, gpu_name: str, cc: str, model_path: Path, precision: str,
               options: Mapping[str, Any]) -> EngineKey:
    """The key of the engine ``load`` would build for these arguments (typing mode and builder flags
    resolved for this TensorRT). BackendError for a bad ``typing`` option or an unreadable model."""
    typing = str(options.get("typing", "auto"))
    if typing not in {"auto", "weak", "strong"}:
        raise BackendError(f"tensorrt option typing={typing!r}: expected auto, weak or strong")
    has_flags = hasattr(trt.BuilderFlag, "INT8")  # TensorRT 11 removed the precision flags
    if typing == "auto":
        typing = "weak" if has_flags else "strong"
    flags: list[str] = []
    if typing == "weak":
        if not has_flags:
            raise BackendError(
                "this TensorRT has no precision flags (weak typing removed); use typing='strong'")
        if precision in _PRECISION_FLAG:
            flags.append(_PRECISION_FLAG[precision])
        if precision in {"int8", "fp8"} and options.get("fp16_fallback", True):
            flags.append("FP16")  # non-quantized layers (e.g. ConvTranspose3d) may run in FP16
    shape = options.get("input_shape") or options.get("warmup_shape")
    input_shape = tuple(int(d) for d in shape) if shape else None
    opt_batch = options.get("opt_batch") or (input_shape[0] if input_shape else None)
    max_batch = options.get("max_batch") or opt_batch
    try:
        digest = sha256_file(model_path)
    except OSError as exc:
        raise BackendError(f"cannot read {model_path}: {exc}") from exc
    level = options.get("optimization_level")
    return EngineKey(
        gpu_name=gpu_name, compute_capability=cc, tensorrt_version=str(trt.__version__),
        onnx_sha256=digest, precision=precision, typing=typing, flags=tuple(flags),
        input_shape=input_shape, opt_batch=int(opt_batch) if opt_batch else None,
        max_batch=int(max_batch) if max_batch else None,
        workspace_mb=int(options["workspace_mb"]) if options.get("workspace_mb") else None,
        optimization_level=int(level) if level is not None else None,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "gpu"


# ---- the cache folder ----------------------------------------------------------------------------
class EngineCache:
    """Engines (``<digest>.engine`` + ``<digest>.json`` with the key) and timing caches in one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()}{ENGINE_SUFFIX}"

    def timing_cache_path(self, key: EngineKey) -> Path:
        """One timing cache per GPU model, CC and TensorRT version (it is specific to all three)."""
        gpu = _slug(key.gpu_name)
        return self.root / f"timing-{gpu}-sm{key.compute_capability}-trt{key.tensorrt_version}.cache"

    def load(self, key: EngineKey) -> bytes | None:
        try:
            return self.engine_path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log_event(logger, "tensorrt.cache_unreadable", logging.WARNING, path=str(self.engine_path(key)),
                      error=exc)
            return None

    def save(self, key: EngineKey, engine: bytes) -> None:
        """Write atomically (temp + fsync + rename): a crash never leaves a half engine under the key."""
        meta = json.dumps(asdict(key), indent=2, sort_keys=True).encode()
        atomic_write(self.root / f"{key.digest()}.json", meta)
        atomic_write(self.engine_path(key), engine)

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
        atomic_write(self.timing_cache_path(key), data)


def engine_cache_entries(cache_dir: Path) -> Sequence[Mapping[str, Any]]:
    """The keys of the engines in ``cache_dir`` (for ``edge-agent`` diagnostics and pruning)."""
    out = []
    for meta in sorted(Path(cache_dir).glob("*.json")):
        try:
            out.append(json.loads(meta.read_text()))
        except (OSError, ValueError) as exc:
            log_event(logger, "tensorrt.cache_meta_unreadable", logging.WARNING, path=str(meta), error=exc)
    return out


# ---- building and reading engines ----------------------------------------------------------------
class TrtLog:
    """TensorRT's logger (``logger``, an ``ILogger``): forwards its messages to logging and keeps
    the last errors, which our exceptions quote (``text()``)."""

    def __init__(self, trt: Any) -> None:
        self.errors: list[str] = []
        self.logger = _make_logger(trt, self.errors)

    def text(self) -> str:
        return "; ".join(self.errors[-5:]) or "TensorRT logged no error"


def _make_logger(trt: Any, errors: list[str]) -> Any:
    class _Logger(trt.ILogger):  # type: ignore[misc]  # tensorrt is untyped: its base class is Any
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


def deserialize(runtime: Any, blob: bytes) -> Any:
    """The engine in ``blob``, or None when it is not one (truncated, corrupted, another version)."""
    try:
        return runtime.deserialize_cuda_engine(blob)
    except (RuntimeError, TypeError, ValueError) as exc:  # the bindings raise on garbage, or return None
        log_event(logger, "tensorrt.deserialize_failed", logging.WARNING, error=exc)
        return None


def build_engine(trt: Any, log: TrtLog, model_path: Path, key: EngineKey, cache: EngineCache,
                 options: Mapping[str, Any]) -> bytes:
    """Parse the ONNX and build a serialized engine; saves the timing cache. BackendError on failure."""
    log_event(logger, "tensorrt.building", model=model_path.name, precision=key.precision,
              typing=key.typing, flags=",".join(key.flags), gpu=key.gpu_name, cc=key.compute_capability)
    log.errors.clear()
    try:
        builder = trt.Builder(log.logger)
        net_flags = 0
        if key.typing == "strong":
            net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(net_flags)
        parser = trt.OnnxParser(network, log.logger)
        # parse_from_file resolves external weight files next to the model
        if not parser.parse_from_file(str(model_path)):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(f"TensorRT cannot parse {model_path.name}: {'; '.join(errs) or log.text()}")
        config = builder.create_builder_config()
        for flag in key.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if key.workspace_mb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key.workspace_mb << 20)
        if key.optimization_level is not None:
            config.builder_optimization_level = key.optimization_level
        profile = _profile(builder, network, key, model_path)
        if profile is not None:
            config.add_optimization_profile(profile)
        use_timing = bool(options.get("timing_cache", True))
        if use_timing:
            timing = config.create_timing_cache(cache.load_timing(key))
            config.set_timing_cache(timing, False)  # ignore_mismatch=False: never reuse another GPU's
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"TensorRT failed to build {model_path.name} ({key.precision}, "
                               f"{key.typing} typing): {log.text()}")
        blob = bytes(serialized)
        if use_timing:
            cache.save_timing(key, bytes(config.get_timing_cache().serialize()))
    except BackendError:
        raise
    except Exception as exc:  # TensorRT's bindings raise RuntimeError/TypeError/ValueError
        raise BackendError(f"TensorRT build of {model_path.name} failed: {exc}") from exc
    return blob


def _profile(builder: Any, network: Any, key: EngineKey, model_path: Path) -> Any:
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
