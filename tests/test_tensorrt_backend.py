"""TensorRT backend logic against a FAKE ``tensorrt`` module and a fake CUDA API (no GPU here):
engine-cache keys, rebuilds, cache hits, failures, FP8 gating, corrupted engines, timing cache, and
the buffer plumbing of run(). One real test (marked gpu) runs only where TensorRT and a GPU exist.

Nothing here proves TensorRT builds or runs anything: see docs/gpu.md for what was run where.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.core.errors import BackendError, BackendUnavailableError
from agent.inference import base, catalog

MODULE = "agent.inference.backends.tensorrt"
ENGINE_MAGIC = b"FAKE-ENGINE"


# ------------------------------------------------------------------------------------- fakes


class FakeCuda:
    """CudaApi on host memory: pointers index a dict of bytearrays."""

    stream_handle = 7

    def __init__(self, name: str = "NVIDIA L4", cc: str = "8.9") -> None:
        self.name, self.cc = name, cc
        self.mem: dict[int, bytearray] = {}
        self._next = 0x1000
        self.closed = False
        self.syncs = 0

    def device_info(self) -> tuple[str, str]:
        return self.name, self.cc

    def malloc(self, nbytes: int) -> int:
        ptr = self._next
        self._next += nbytes + 256
        self.mem[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr: int) -> None:
        del self.mem[ptr]

    def pinned(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, np.uint8)

    def htod_async(self, dst: int, src: np.ndarray) -> None:
        self.mem[dst][: src.nbytes] = src.tobytes()

    def dtoh_async(self, dst: np.ndarray, src: int) -> None:
        dst[:] = np.frombuffer(bytes(self.mem[src][: dst.nbytes]), np.uint8)

    def synchronize(self) -> None:
        self.syncs += 1

    def close(self) -> None:
        self.closed = True


class FakeState:
    """What the fake TensorRT was asked to do."""

    def __init__(self) -> None:
        self.builds: list[dict[str, Any]] = []
        self.deserialize_calls = 0
        self.timing_loaded: list[bytes] = []
        self.fail_build = False
        self.fail_parse = False
        self.raise_in_build = False
        self.emit_garbage = False  # build "succeeds" but produces a blob that does not deserialize
        self.input_shape: tuple[int, ...] = (-1, 1, 8, 8)


def make_fake_trt(state: FakeState, cuda: FakeCuda, version: str = "10.3.0", *, precision_flags: bool = True) -> Any:
    """A stand-in for the ``tensorrt`` module with the API surface the backend uses."""

    class ILogger:
        def __init__(self) -> None:
            self.logged: list[tuple[str, str]] = []

    flags = {"FP16": "FP16", "BF16": "BF16", "INT8": "INT8", "FP8": "FP8", "TF32": "TF32"}
    builder_flag = SimpleNamespace(**flags) if precision_flags else SimpleNamespace(TF32="TF32")

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.num_inputs = 1

        def get_input(self, i: int) -> Any:
            return SimpleNamespace(name="input", shape=state.input_shape)

    class Parser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.logger = network, logger
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            if state.fail_parse:
                self.num_errors = 1
                return False
            return True

        def get_error(self, i: int) -> str:
            return "In node 3 (Conv): unsupported"

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, ...]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.profiles: list[Profile] = []
            self.timing: TimingCache | None = None
            self.pool: dict[str, int] = {}

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pool[pool] = size

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            state.timing_loaded.append(bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            assert ignore_mismatch is False
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.timing

    class Builder:
        def __init__(self, logger: Any) -> None:
            assert isinstance(logger, ILogger)
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            if state.raise_in_build:
                raise RuntimeError("CUDA out of memory during tactic selection")
            profile = config.profiles[0].shapes["input"] if config.profiles else None
            state.builds.append({"flags": list(config.flags), "network_flags": network.flags, "profile": profile,
                                 "version": version, "gpu": cuda.name, "pool": dict(config.pool)})
            if config.timing is not None:
                config.timing.data += f"|timed-{len(state.builds)}".encode()
            if state.fail_build:
                self.logger.log("Severity.ERROR", "no implementation for layer Conv_3 (FP8)")
                return None
            if state.emit_garbage:
                return b"\x00garbage"
            max_batch = profile[2][0] if profile else state.input_shape[0]
            return ENGINE_MAGIC + json.dumps({"max_batch": max_batch, "shape": list(state.input_shape)}).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shape: tuple[int, ...] = ()
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            if shape[0] > self.engine.max_batch:
                return False
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shape

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            assert stream == cuda.stream_handle
            n = int(np.prod(self.shape)) * 4
            x = np.frombuffer(bytes(cuda.mem[self.addresses["input"]][:n]), np.float32)
            cuda.mem[self.addresses["output"]][:n] = (x * 2.0).astype(np.float32).tobytes()
            return True

    class Engine:
        def __init__(self, meta: dict[str, Any]) -> None:
            self.max_batch = int(meta["max_batch"])
            self.shape = tuple(meta["shape"])
            self.num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["input", "output"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shape

        def get_tensor_dtype(self, name: str) -> str:
            return "FLOAT"

        def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
            rest = self.shape[1:]
            return [(1, *rest), (1, *rest), (self.max_batch, *rest)]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
            state.deserialize_calls += 1
            if not blob.startswith(ENGINE_MAGIC):
                return None
            try:
                return Engine(json.loads(blob[len(ENGINE_MAGIC):]))
            except ValueError:
                return None

    return SimpleNamespace(
        __version__=version,
        ILogger=ILogger,
        Builder=Builder,
        OnnxParser=Parser,
        Runtime=Runtime,
        BuilderFlag=builder_flag,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        nptype=lambda dtype: np.float32,
    )


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture
def trt_mod(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Import the backend module although tensorrt is not installed here, and restore the registry."""
    was_known = "tensorrt" in catalog.known_backends()
    monkeypatch.setattr(base, "require_package", lambda name: None)
    sys.modules.pop(MODULE, None)
    mod = importlib.import_module(MODULE)
    yield mod
    # forget our import (its @register ran with the check disabled); the registry re-imports it
    # for real, and finds tensorrt missing, the next time someone asks
    sys.modules.pop(MODULE, None)
    if was_known:
        catalog.register_module("tensorrt", MODULE, extra="gpu")
    else:
        catalog.unregister("tensorrt")


class Env:
    """A fake device: the state of the fake TensorRT, the fake CUDA, and a loader."""

    def __init__(self, mod: Any, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        self.mod, self.mp, self.tmp = mod, monkeypatch, tmp
        self.state = FakeState()
        self.cuda = FakeCuda()
        self.version = "10.3.0"
        self.precision_flags = True
        self.model = tmp / "model.int8.onnx"
        self.model.write_bytes(b"onnx-qdq-graph-bytes")
        self.cache_dir = tmp / "engine-cache"
        monkeypatch.setattr(mod, "_import_trt", lambda: make_fake_trt(
            self.state, self.cuda, self.version, precision_flags=self.precision_flags))
        monkeypatch.setattr(mod, "_import_cuda", lambda device: self.cuda)

    def gpu(self, name: str, cc: str) -> None:
        self.cuda = FakeCuda(name, cc)

    def load(self, precision: str = "int8", **options: Any) -> Any:
        be = self.mod.TensorRtBackend()
        opts = {"cache_dir": self.cache_dir, "input_shape": (1, 1, 8, 8), "max_batch": 2, **options}
        be.load(self.model, precision=precision, threads=0, options=opts)
        return be

    def engines(self) -> list[Path]:
        return sorted(self.cache_dir.glob("*.engine"))


@pytest.fixture
def env(trt_mod: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Env:
    return Env(trt_mod, monkeypatch, tmp_path)


# ------------------------------------------------------------------------------------- tests


def test_cache_key_covers_gpu_trt_version_model_and_precision(env: Env, trt_mod: Any) -> None:
    be = trt_mod.TensorRtBackend()
    trt = make_fake_trt(env.state, env.cuda)
    opts = {"input_shape": (1, 1, 8, 8)}
    ref = be._key(trt, "NVIDIA L4", "8.9", env.model, "int8", opts)
    assert ref.flags == ("INT8", "FP16") and ref.typing == "weak"
    variants = [
        be._key(trt, "NVIDIA H100 80GB HBM3", "9.0", env.model, "int8", opts),       # GPU
        be._key(trt, "NVIDIA L4", "8.9", env.model, "fp8", opts),                    # precision
        be._key(make_fake_trt(env.state, env.cuda, "10.4.0"), "NVIDIA L4", "8.9", env.model, "int8", opts),
        be._key(trt, "NVIDIA L4", "8.9", env.model, "int8", {"input_shape": (1, 1, 16, 16)}),  # shapes
        be._key(trt, "NVIDIA L4", "8.9", env.model, "int8", {**opts, "typing": "strong"}),     # typing
        be._key(trt, "NVIDIA L4", "8.9", env.model, "int8", {**opts, "fp16_fallback": False}),  # flags
    ]
    other = env.tmp / "other.onnx"
    other.write_bytes(b"another graph")
    variants.append(be._key(trt, "NVIDIA L4", "8.9", other, "int8", opts))           # model digest
    digests = {ref.digest(), *(k.digest() for k in variants)}
    assert len(digests) == len(variants) + 1
    assert be._key(trt, "NVIDIA L4", "8.9", env.model, "int8", dict(opts)).digest() == ref.digest()


def test_build_then_cache_hit_skips_the_build(env: Env) -> None:
    be = env.load()
    assert be.built is True and len(env.state.builds) == 1
    build = env.state.builds[0]
    assert build["flags"] == ["INT8", "FP16"] and build["network_flags"] == 0
    assert build["profile"] == ((1, 1, 8, 8), (1, 1, 8, 8), (2, 1, 8, 8))
    assert len(env.engines()) == 1
    meta = json.loads(env.engines()[0].with_suffix(".json").read_text())
    assert meta["gpu_name"] == "NVIDIA L4" and meta["tensorrt_version"] == "10.3.0"
    info = be.describe()
    assert (info.name, info.version, info.device, info.precision) == ("tensorrt", "10.3.0", "cuda", "int8")
    assert "NVIDIA L4" in info.providers[0]

    again = env.load()
    assert again.built is False and len(env.state.builds) == 1  # deserialized, not rebuilt


def test_rebuild_when_tensorrt_version_or_gpu_changes(env: Env) -> None:
    env.load()
    env.version = "10.4.0"
    assert env.load().built is True
    assert len(env.state.builds) == 2
    # the 10.3 engine can never load again under 10.4: pruned
    assert [json.loads(p.with_suffix(".json").read_text())["tensorrt_version"] for p in env.engines()] == ["10.4.0"]

    env.gpu("NVIDIA H100 80GB HBM3", "9.0")
    assert env.load().built is True
    assert env.state.builds[-1]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert len(env.state.builds) == 3 and len(env.engines()) == 2

    env.gpu("NVIDIA L4", "8.9")
    assert env.load().built is False  # back on the L4 with 10.4: its engine is still cached


def test_changed_model_file_rebuilds(env: Env) -> None:
    env.load()
    env.model.write_bytes(b"a re-published graph")
    assert env.load().built is True
    assert len(env.state.builds) == 2


def test_build_failure_is_a_backend_error_and_caches_nothing(env: Env) -> None:
    env.state.fail_build = True
    with pytest.raises(BackendError, match="failed to build model.int8.onnx.*no implementation for layer"):
        env.load()
    assert env.engines() == []
    assert env.cuda.closed  # GPU resources released on failure


def test_parse_failure_and_builder_exception_are_backend_errors(env: Env) -> None:
    env.state.fail_parse = True
    with pytest.raises(BackendError, match="cannot parse .*unsupported"):
        env.load()
    env.state.fail_parse = False
    env.state.raise_in_build = True
    with pytest.raises(BackendError, match="build of model.int8.onnx failed: CUDA out of memory") as info:
        env.load()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not isinstance(info.value, BackendUnavailableError)


@pytest.mark.parametrize("cc", ["8.7", "8.6", "8.0", "7.5"])
def test_fp8_refused_below_cc_89(env: Env, cc: str) -> None:
    env.gpu("NVIDIA Jetson AGX Orin" if cc == "8.7" else f"GPU sm{cc}", cc)
    with pytest.raises(BackendUnavailableError, match=f"FP8 .*compute capability >= 8.9.*has {cc}"):
        env.load("fp8")
    assert env.state.builds == []  # refused before any build


@pytest.mark.parametrize(("name", "cc"), [("NVIDIA L4", "8.9"), ("NVIDIA H100 80GB HBM3", "9.0")])
def test_fp8_allowed_from_cc_89(env: Env, name: str, cc: str) -> None:
    env.gpu(name, cc)
    be = env.load("fp8")
    assert env.state.builds[-1]["flags"] == ["FP8", "FP16"]
    assert be.describe().precision == "fp8"


def test_int8_allowed_on_orin(env: Env) -> None:
    env.gpu("NVIDIA Jetson AGX Orin", "8.7")
    env.load("int8")
    assert env.state.builds[-1]["flags"] == ["INT8", "FP16"]


def test_corrupted_cached_engine_is_deleted_and_rebuilt_once(env: Env) -> None:
    env.load()
    (engine,) = env.engines()
    engine.write_bytes(b"\x00\x01truncated")
    be = env.load()
    assert be.built is True and len(env.state.builds) == 2
    assert env.engines()[0].read_bytes().startswith(ENGINE_MAGIC)

    # a build whose output still does not deserialize: one rebuild only, then BackendError
    env.engines()[0].write_bytes(b"junk")
    env.state.emit_garbage = True
    with pytest.raises(BackendError, match="does not deserialize"):
        env.load()
    assert len(env.state.builds) == 3
    assert env.engines() == []  # neither the corrupt nor the bad new engine stays cached


def test_timing_cache_saved_and_reused(env: Env) -> None:
    env.load("int8")
    assert env.state.timing_loaded == [b""]
    (timing,) = env.cache_dir.glob("timing-*.cache")
    assert timing.name == "timing-nvidia-l4-sm8.9-trt10.3.0.cache"
    first = timing.read_bytes()
    assert first == b"|timed-1"

    env.load("fp16")  # another engine on the same GPU: starts from the saved timings
    assert env.state.timing_loaded[-1] == first
    assert timing.read_bytes() == b"|timed-1|timed-2"

    env.gpu("NVIDIA H100 80GB HBM3", "9.0")  # never another GPU's timings
    env.load("int8")
    assert env.state.timing_loaded[-1] == b""

    env.load("int8", timing_cache=False, workspace_mb=512)
    assert env.state.builds[-1]["pool"] == {"WORKSPACE": 512 << 20}


def test_strong_typing_sets_the_network_flag_and_no_precision_flags(env: Env) -> None:
    env.load("int8", typing="strong")
    assert env.state.builds[-1]["network_flags"] == 1 << 0
    assert env.state.builds[-1]["flags"] == []


def test_tensorrt_11_without_precision_flags_defaults_to_strong(env: Env) -> None:
    env.precision_flags = False
    env.version = "11.0.0"
    env.load("fp8")
    assert env.state.builds[-1]["network_flags"] == 1 and env.state.builds[-1]["flags"] == []
    with pytest.raises(BackendError, match="typing='strong'"):
        env.load("int8", typing="weak")


def test_dynamic_input_needs_input_shape(env: Env) -> None:
    env.state.input_shape = (-1, 1, -1, -1)
    with pytest.raises(BackendError, match="dynamic shape .* pass options input_shape"):
        env.load(input_shape=None)
    env.load(input_shape=(1, 1, 16, 16), max_batch=3, opt_batch=2)
    assert env.state.builds[-1]["profile"] == ((1, 1, 16, 16), (2, 1, 16, 16), (3, 1, 16, 16))


def test_run_copies_through_device_buffers_and_chunks_large_batches(env: Env) -> None:
    be = env.load(max_batch=2)
    x = np.arange(5 * 64, dtype=np.float32).reshape(5, 1, 8, 8)
    out = be.run(x)
    assert out.dtype == np.float32 and out.shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(out, x * 2)
    with pytest.raises(BackendError, match="rank 4"):
        be.run(np.zeros((1, 8, 8), np.float32))
    be.close()
    assert env.cuda.closed and env.cuda.mem == {}
    with pytest.raises(BackendError, match="before load"):
        be.run(x)


def test_missing_cuda_binding_is_unavailable(env: Env, trt_mod: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(device: int) -> Any:
        raise BackendUnavailableError("TensorRT needs a CUDA Python binding: pip install cuda-python (or pycuda)")

    monkeypatch.setattr(trt_mod, "_import_cuda", no_cuda)
    with pytest.raises(BackendUnavailableError, match="cuda-python"):
        env.load()


def test_registered_lazily_and_unavailable_without_tensorrt() -> None:
    """Through the registry (as the lead wires it): known by name, unavailable here with the fix."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    was_known = "tensorrt" in catalog.known_backends()
    catalog.register_module("tensorrt", MODULE, extra="gpu")
    try:
        assert "tensorrt" in catalog.available_backends()["tensorrt"]  # "No module named 'tensorrt'"
        with pytest.raises(BackendUnavailableError, match=r"pip install edge-agent\[gpu\]"):
            catalog.create("tensorrt")
        assert catalog.select(["tensorrt"]) == "onnxruntime"  # falls back
    finally:
        if not was_known:
            catalog.unregister("tensorrt")


# --------------------------------------------------------------------------- real GPU (skipped)


def _gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.gpu
def test_real_tensorrt_builds_and_matches_onnxruntime(tmp_path: Path) -> None:
    """On a device with TensorRT + a GPU: build a tiny FP32 conv net, compare with ONNX Runtime."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed (pip install edge-agent[gpu], see docs/gpu.md)")
    if not _gpu_present():
        pytest.skip("no NVIDIA GPU")
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))

    sys.modules.pop(MODULE, None)
    mod = importlib.import_module(MODULE)
    be = mod.TensorRtBackend()
    be.load(path, precision="fp32", threads=0,
            options={"cache_dir": tmp_path / "cache", "input_shape": (1, 1, 16, 16), "max_batch": 2})
    x = rng.standard_normal((3, 1, 16, 16)).astype(np.float32)
    got = be.run(x)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)  # TF32 is on by default
    be.close()
    again = mod.TensorRtBackend()
    again.load(path, precision="fp32", threads=0,
               options={"cache_dir": tmp_path / "cache", "input_shape": (1, 1, 16, 16), "max_batch": 2})
    assert again.built is False
    again.close()
