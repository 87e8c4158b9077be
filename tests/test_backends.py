"""Backends and the registry against real ONNX Runtime / OpenVINO sessions on tiny ONNX models."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import loaded, make_cls_model, make_seg_model

from agent.core.errors import BackendError, BackendUnavailableError
from agent.inference import catalog
from agent.inference.base import Backend, BackendInfo


@pytest.fixture(scope="module")
def seg_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seg_model(tmp_path_factory.mktemp("m") / "seg.onnx")


@pytest.fixture(scope="module")
def cls_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cls_model(tmp_path_factory.mktemp("m") / "cls.onnx")


def _reference_seg(x: np.ndarray) -> np.ndarray:
    """What make_seg_model computes, in numpy (3x3x3 mean with zero padding for channel 1)."""
    from scipy.ndimage import uniform_filter

    out = np.empty((x.shape[0], 5, *x.shape[2:]), np.float32)
    out[:, 0] = 0.5
    out[:, 2:] = -10.0
    for n in range(x.shape[0]):
        out[n, 1] = uniform_filter(x[n, 0].astype(np.float64), size=3, mode="constant")
    return out


# ---- onnxruntime ---------------------------------------------------------------------------------


def test_onnxruntime_runs_dynamic_batch_and_describes_itself(seg_onnx: Path) -> None:
    import onnxruntime

    backend = loaded("onnxruntime", seg_onnx, warmup_shape=(1, 1, 8, 16, 16))
    assert isinstance(backend, Backend)
    x = np.random.default_rng(0).random((3, 1, 8, 16, 16), dtype=np.float32)
    out = backend.run(x)
    assert out.shape == (3, 5, 8, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference_seg(x), atol=1e-5)
    info = backend.describe()
    assert info == BackendInfo(
        "onnxruntime", onnxruntime.__version__, "cpu", "fp32", ("CPUExecutionProvider",)
    )


def test_onnxruntime_validates_rank_and_translates_errors(seg_onnx: Path, tmp_path: Path) -> None:
    backend = loaded("onnxruntime", seg_onnx)  # warm-up shape derived: (1, 1, 32, 32, 32)
    with pytest.raises(BackendError, match="rank 5"):
        backend.run(np.zeros((1, 8, 16, 16), np.float32))
    with pytest.raises(BackendError, match="onnxruntime inference failed") as exc:
        backend.run(np.zeros((1, 2, 8, 16, 16), np.float32))  # 2 channels into a 1-channel conv
    assert exc.value.__cause__ is not None  # the ORT exception is chained, not swallowed

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(BackendError, match="could not load garbage.onnx"):
        loaded("onnxruntime", garbage)
    with pytest.raises(BackendError, match="before load"):
        catalog.create("onnxruntime").run(np.zeros((1, 1, 8, 8, 8), np.float32))
    with pytest.raises(BackendError, match="unknown precision"):
        loaded("onnxruntime", seg_onnx, precision="int4")


def test_onnxruntime_skips_providers_this_build_lacks(
    cls_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.inference.backends.onnxruntime")
    backend = loaded("onnxruntime", cls_onnx, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert backend.describe().providers == ("CPUExecutionProvider",)
    assert any(r.getMessage() == "backend.provider_unavailable" for r in caplog.records)
    assert backend.run(np.ones((2, 1, 32, 32), np.float32)).shape == (2, 4)


# ---- openvino ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openvino_installed() -> None:
    pytest.importorskip("openvino", reason="openvino not installed (pip install edge-agent[openvino])")


@pytest.mark.usefixtures("openvino_installed")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_precision_is_explicit_and_read_back(seg_onnx: Path, precision: str) -> None:
    import openvino as ov

    backend = loaded("openvino", seg_onnx, precision=precision, warmup_shape=(1, 1, 8, 16, 16))
    info = backend.describe()
    # this CPU has AVX512_BF16: bf16 must be reported as bf16, fp32 as fp32 (OpenVINO's default
    # there would silently be bf16 for both)
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    expected = precision if precision == "fp32" or "BF16" in caps else "fp32"
    assert (info.name, info.device, info.precision, info.providers) == ("openvino", "cpu", expected, ("CPU",))
    x = np.random.default_rng(1).random((2, 1, 8, 16, 16), dtype=np.float32)
    out = backend.run(x)
    assert out.shape == (2, 5, 8, 16, 16) and out.dtype == np.float32
    # bf16 has an 8-bit mantissa: ~0.4 % relative error on values around 0.5
    np.testing.assert_allclose(out, _reference_seg(x), atol=1e-5 if expected == "fp32" else 1e-2)


@pytest.mark.usefixtures("openvino_installed")
def test_openvino_makes_a_static_batch_dynamic(tmp_path: Path) -> None:
    model = make_seg_model(tmp_path / "static.onnx", static_batch=True)
    backend = loaded("openvino", model, warmup_shape=(1, 1, 8, 8, 8))
    out = backend.run(np.ones((3, 1, 8, 8, 8), np.float32))  # batch 3 into a batch-1 export
    assert out.shape == (3, 5, 8, 8, 8)
    with pytest.raises(BackendError, match="rank 5"):
        backend.run(np.ones((8, 8, 8), np.float32))


@pytest.mark.usefixtures("openvino_installed")
def test_openvino_compiles_the_warmup_shape_statically_and_other_shapes_once(
    seg_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.inference.backends.openvino")
    backend = loaded("openvino", seg_onnx, warmup_shape=(1, 1, 8, 16, 16))
    rng = np.random.default_rng(2)
    shapes = [(1, 1, 8, 16, 16), (2, 1, 8, 16, 16), (1, 1, 8, 16, 16), (1, 1, 12, 16, 8), (4, 1, 8, 16, 16)]
    for shape in shapes:  # static, dynamic, static again, other spatial size, other batch
        x = rng.random(shape, dtype=np.float32)
        np.testing.assert_allclose(backend.run(x), _reference_seg(x), atol=1e-5)
    compiled = [r for r in caplog.records if r.getMessage() == "backend.dynamic_compiled"]
    assert len(compiled) == 1  # one dynamic compilation serves every other shape
    assert compiled[0].ea_fields["static_shape"] == (1, 1, 8, 16, 16)  # type: ignore[attr-defined]

    # static_shape=False: one dynamic compilation from the start, same results
    caplog.clear()
    dynamic = loaded("openvino", seg_onnx, warmup_shape=(1, 1, 8, 16, 16), static_shape=False)
    x = rng.random((3, 1, 8, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(dynamic.run(x), backend.run(x), atol=1e-6)
    assert not [r for r in caplog.records if r.getMessage() == "backend.dynamic_compiled"]


@pytest.mark.usefixtures("openvino_installed")
def test_openvino_int8_request_reports_float_parts(cls_onnx: Path) -> None:
    # a float graph asked for as "int8" (what an INT8 QDQ variant's float ops run in): the float
    # parts are pinned to f32, so it reports plain "int8"
    backend = loaded("openvino", cls_onnx, precision="int8")
    assert backend.describe().precision == "int8"


# ---- registry ------------------------------------------------------------------------------------


@pytest.fixture
def fake_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two importable backend modules in a temp folder: one whose package is 'missing', one that works."""
    (tmp_path / "ea_fake_broken.py").write_text("raise ImportError(\"No module named 'libfakeaccel'\")\n")
    (tmp_path / "ea_fake_ok.py").write_text(
        "from agent.inference.catalog import register\n"
        "from agent.inference.base import BackendInfo\n"
        "@register('fake-ok')\n"
        "class FakeOk:\n"
        "    name = 'fake-ok'\n"
        "    def load(self, model_path, *, precision, threads, options): pass\n"
        "    def run(self, inputs): return inputs\n"
        "    def describe(self): return BackendInfo('fake-ok', '1', 'cpu', 'fp32')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    catalog.register_module("fake-broken", "ea_fake_broken", extra="fakeaccel")
    catalog.register_module("fake-ok", "ea_fake_ok")
    yield
    catalog.unregister("fake-broken")
    catalog.unregister("fake-ok")
    for mod in ("ea_fake_broken", "ea_fake_ok"):
        sys.modules.pop(mod, None)


@pytest.mark.usefixtures("fake_modules")
def test_registry_skips_a_backend_whose_import_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.inference.catalog")
    avail = catalog.available_backends()
    assert avail["onnxruntime"] == "ok" and avail["fake-ok"] == "ok"
    assert "libfakeaccel" in avail["fake-broken"]

    def events() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.getMessage() == "backend.unavailable"
            and getattr(r, "ea_fields", {}).get("backend") == "fake-broken"
        ]

    assert len(events()) == 1
    assert events()[0].ea_fields["fix"] == "pip install edge-agent[fakeaccel]"  # type: ignore[attr-defined]
    catalog.available_backends()  # asking again does not log again
    assert len(events()) == 1

    with pytest.raises(BackendUnavailableError, match=r"pip install edge-agent\[fakeaccel\]"):
        catalog.create("fake-broken")
    assert isinstance(catalog.create("fake-ok"), Backend)
    assert catalog.select(["fake-broken", "fake-ok"]) == "fake-ok"
    assert catalog.select(["fake-broken"]) == "onnxruntime"  # the fallback


def test_registry_survives_a_backend_module_with_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ea_fake_buggy.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    catalog.register_module("fake-buggy", "ea_fake_buggy")
    try:
        assert "ZeroDivisionError" in catalog.available_backends()["fake-buggy"]
        with pytest.raises(BackendUnavailableError, match="ZeroDivisionError"):
            catalog.create("fake-buggy")
    finally:
        catalog.unregister("fake-buggy")
        sys.modules.pop("ea_fake_buggy", None)


def test_registry_unknown_backend_is_unavailable() -> None:
    with pytest.raises(BackendUnavailableError, match="unknown inference backend 'tpu'.*onnxruntime"):
        catalog.create("tpu")
    with pytest.raises(BackendUnavailableError, match="none of the inference backends"):
        catalog.select(["tpu"], fallback="npu")


def test_registry_lists_the_builtin_backends() -> None:
    import importlib.util

    avail = catalog.available_backends()
    assert avail["onnxruntime"] == "ok"
    for name in ("openvino", "tensorrt"):
        installed = importlib.util.find_spec(name) is not None
        assert (avail[name] == "ok") == installed, avail[name]
