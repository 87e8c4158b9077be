"""Calibration ranges, the quantized variant builders and Ctrl-C safety (deploy.calibrate/quantize).

Everything here runs on tiny ONNX models built in the test (a 3-conv classifier on 16x16 inputs),
so the whole file takes seconds; the real models only appear in one smoke test, skipped until
they exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.core.accuracy import classification_metrics, compare_classification
from agent.core.errors import ModelSpecError
from agent.core.modelspec import GateSpec
from agent.core.util import atomic_path, atomic_write
from deploy import quantize as Q
from deploy.calibrate import ArrayCalibrationReader, QuantConfig, collect_ranges, load_quant_config
from deploy.gate_runtime import QdqSimulationBackend, ort_execution_precision
from deploy.quantize_graph import default_opset
from deploy.variants import host

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# A tiny classifier and data with structure (so quantization error is measurable)
# --------------------------------------------------------------------------------------------


def tiny_classifier(path: Path, seed: int = 0) -> Path:
    """Conv(1->8)+Relu -> Conv(8->8)+Relu -> Conv(8->16) -> GlobalAveragePool -> Gemm(16->4).

    Dynamic batch, input ``input`` (N, 1, 16, 16), output ``logits`` (N, 4); weights random but
    scaled so activations stay O(1), and the head's bias centres the logits on :func:`images`
    data so the argmax differs between inputs (a model that always predicts one class would let
    a broken variant pass).
    """
    _tiny(path, seed, np.zeros(4, np.float32))
    mean_logits = run(path, images(256, 99)).mean(axis=0)
    return _tiny(path, seed, -mean_logits.astype(np.float32))


def _tiny(path: Path, seed: int, head_bias: np.ndarray) -> Path:
    rng = np.random.default_rng(seed)

    def conv_w(co: int, ci: int) -> np.ndarray:
        return (rng.normal(size=(co, ci, 3, 3)) * np.sqrt(2.0 / (ci * 9))).astype(np.float32)

    inits = [
        numpy_helper.from_array(conv_w(8, 1), "w1"), numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(conv_w(8, 8), "w2"), numpy_helper.from_array(np.zeros(8, np.float32), "b2"),
        numpy_helper.from_array(conv_w(16, 8), "w3"), numpy_helper.from_array(np.zeros(16, np.float32), "b3"),
        numpy_helper.from_array((rng.normal(size=(4, 16)) * 2.0).astype(np.float32), "wf"),
        numpy_helper.from_array(head_bias, "bf"),
        numpy_helper.from_array(np.array([-1, 16], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1], strides=[2, 2]),
        # no Relu here: the pooled features are signed, so the logits vary around zero from input to
        # input (a head over post-ReLU means is a small difference of large sums: ill-conditioned)
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def images(n: int, seed: int) -> np.ndarray:
    """Smooth random images with varying contrast/offset (zscore-like), (n, 1, 16, 16) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    out = []
    for _ in range(n):
        a, b, c, d = rng.normal(size=4)
        img = a * np.sin(3 * xx + b) + c * np.cos(4 * yy + d) + 0.2 * rng.normal(size=(16, 16))
        out.append((img - img.mean()) / (img.std() + 1e-6))
    return np.asarray(out, dtype=np.float32)[:, None]


def run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FP32 model, its quant_pre_process output and percentile ranges from a calibration set."""
    d = tmp_path_factory.mktemp("quant")
    fp32 = tiny_classifier(d / "model.onnx")
    Q.preprocess_model(fp32, d / "model.pre.onnx")
    from onnxruntime.quantization.calibrate import save_tensors_data

    td, method_amax, max_amax = collect_ranges(d / "model.pre.onnx", ArrayCalibrationReader(images(48, 1)),
                                               "percentile", 99.99, threads=1)
    save_tensors_data(td, d / "ranges.percentile.json")
    (d / "amax.json").write_text(json.dumps({"method_amax": method_amax, "max_amax": max_amax}))
    return {"dir": d, "fp32": fp32, "pre": d / "model.pre.onnx", "ranges": d / "ranges.percentile.json",
            "method_amax": method_amax, "max_amax": max_amax}  # type: ignore[dict-item]


# --------------------------------------------------------------------------------------------
# Ranges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_ranges_cover_every_tensor_and_relu_outputs_start_at_zero(built: dict, method: str) -> None:
    td, method_amax, max_amax = collect_ranges(built["pre"], ArrayCalibrationReader(images(16, 2)), method, threads=1)
    assert "input" in td and "logits" in td
    for name, data in td.items():
        lo, hi = (float(v) for v in data.range_value)
        assert lo <= hi
        assert method_amax[name] <= max_amax[name] + 1e-6  # clipping never widens the range
    relu_out = next(n for n in td.keys() if "r1" == n or n.endswith("r1"))
    assert float(td[relu_out].range_value[0]) == 0.0  # u8 activations get all 256 levels


def test_percentile_clips_outliers_that_minmax_keeps(built: dict) -> None:
    x = images(32, 3)
    x[0, 0, 0, 0] = 60.0  # one outlier pixel
    _, pct, mx = collect_ranges(built["pre"], ArrayCalibrationReader(x), "percentile", 99.9, threads=1)
    assert mx["input"] == pytest.approx(60.0)
    assert pct["input"] < 10.0


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


#: the catalogue variant each ORT Q/DQ form of the test builds (for its target families)
_ORT_FORMS = {"u8": ("ort-int8-u8s8", False), "u8-rr": ("ort-int8-u8s8-rr", True), "s8": ("ort-int8-s8s8", False)}


@pytest.mark.parametrize("form", sorted(_ORT_FORMS))
def test_ort_int8_is_close_to_fp32_and_logits_stay_float(built: dict, form: str) -> None:
    """Every ORT Q/DQ form computes, exactly (the simulation), close to FP32; natively, a CPU of a
    family the variant targets computes the same numbers; on an x86 CPU without VNNI the 8-bit
    u8s8 kernels saturate (16-bit pair sums) and the 7-bit reduce_range weights do not."""
    from deploy.variants import catalogue_by_id

    vid, reduce_range = _ORT_FORMS[form]
    activations = form[:2]
    out = built["dir"] / f"int8-{form}.onnx"
    notes = Q.build_ort_qdq(built["pre"], out, built["ranges"], "percentile", activations=activations,
                            reduce_range=reduce_range)
    assert notes["float_outputs"] == ["logits"]
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"  # no Q/DQ round trip on the logits
    # symmetric per-channel s8 weights: zero points all 0; reduce_range keeps them within 7 bits
    zps = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("zero_point")
           and t.data_type == TensorProto.INT8 and numpy_helper.to_array(t).ndim == 1]
    assert zps and all(not z.any() for z in zps)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer
               if t.data_type == TensorProto.INT8 and numpy_helper.to_array(t).ndim == 4]
    assert weights and max(int(np.abs(w).max()) for w in weights) == (64 if reduce_range else 127)
    x = images(64, 10)
    sim = QdqSimulationBackend()
    sim.load(out, precision="int8", threads=1, options={"warmup_shape": (1, 1, 16, 16)})
    ref, exact = run(built["fp32"], x), sim.run(x)
    scale = np.abs(ref).max()
    assert np.abs(exact - ref).max() < 0.1 * scale
    # 7-bit weights are the coarser grid: on this 3-conv toy some near-tied logits swap
    assert np.mean(exact.argmax(1) == ref.argmax(1)) >= (0.85 if reduce_range else 0.9)
    me = host()
    native = run(out, x)
    exact_family = me.isa_family in catalogue_by_id()[vid].targets or (reduce_range and me.arch == "x86_64")
    if exact_family:
        # the CPU's integer kernels accumulate exactly: the numbers are the simulation's, up to
        # requantization rounding (a step or so of one activation)
        assert np.abs(native - exact).max() < 0.02 * scale
    if me.isa_family == "x86-avx2" and form == "u8":
        # VPMADDUBSW's 16-bit pair sums saturate on 8-bit weights: the error the gate must catch
        assert np.abs(native - exact).max() > 0.05 * scale
    # and ONNX Runtime on x86 really runs integer kernels for the u8 forms
    if me.arch == "x86_64" and activations == "u8":
        prec = ort_execution_precision(out)
        assert (prec.kernels or {}).get("int8", 0) >= 3, prec


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_tensorrt_explicit_qdq_layout_and_accuracy(built: dict, kind: str) -> None:
    out = built["dir"] / f"trt-{kind}.onnx"
    table = built["method_amax"] if kind == "int8" else built["max_amax"]
    notes = Q.build_explicit_qdq(built["pre"], out, table, kind)
    assert notes["quantized_nodes"] == 3  # the 3 Conv; the Gemm head writes the logits: kept float
    assert notes["float_output_layers"] == ["head"]
    model = onnx.load(str(out))
    qtype = TensorProto.INT8 if kind == "int8" else TensorProto.FLOAT8E4M3FN
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # every zero point is 0 of the quantized type (symmetric, as TensorRT requires)
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == qtype
        assert not np.asarray(numpy_helper.to_array(zp), dtype=np.float32).any()
    # weights are stored quantized with a per-output-channel DQ (axis 0 for Conv / transB Gemm)
    for node in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = next(n for n in model.graph.node if node.input[1] in n.output)
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == qtype
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0
        act = next(n for n in model.graph.node if node.input[0] in n.output)
        assert act.op_type == "DequantizeLinear"  # activation input goes through Q -> DQ
    if kind == "fp8":
        assert default_opset(model) >= 19
    x = images(64, 11)
    # run as the gate does: ONNX Runtime simulating the Q/DQ arithmetic, with the graph rewrites
    # that are wrong for FP8 (ReluQuantRewrite) disabled
    sim = QdqSimulationBackend()
    sim.load(out, precision=kind, threads=1, options={"warmup_shape": (1, 1, 16, 16)})
    ref, got = run(built["fp32"], x), sim.run(x)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    # E4M3 keeps 3 mantissa bits (~3 % per value) against int8's ~0.4 % of amax: FP8 is the
    # coarser one on this small random network; whether it is good enough is the gate's call
    assert rel < (0.1 if kind == "int8" else 0.3), rel
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= (0.9 if kind == "int8" else 0.8)


def test_fp8_graph_computes_exactly_the_e4m3_arithmetic(built: dict) -> None:
    """Only conv1 quantized: the simulation must equal FP32 run on E4M3-rounded input (scale
    amax/448, zero point 0) and E4M3-rounded per-channel weights (scale channel amax/448)."""
    import ml_dtypes

    d = built["dir"]
    out = d / "fp8-conv1.onnx"
    Q.build_explicit_qdq(built["pre"], out, built["max_amax"], "fp8", nodes_to_exclude=["conv2", "conv3"])
    sim = QdqSimulationBackend()
    sim.load(out, precision="fp8", threads=1, options={"warmup_shape": (1, 1, 16, 16)})
    x = images(16, 21)

    def e4m3(v: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
        q = np.clip(v / scale, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
        return q.astype(np.float32) * scale

    model = onnx.load(str(built["pre"]))
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    w_init = next(t for t in model.graph.initializer if t.name == conv1.input[1])
    w = numpy_helper.to_array(w_init)
    ch = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 448.0
    w_init.CopyFrom(numpy_helper.from_array(e4m3(w, ch[:, None, None, None]).astype(np.float32), w_init.name))
    onnx.save(model, str(d / "ref-conv1.onnx"))
    x_q = e4m3(x, np.float32(built["max_amax"]["input"] / 448.0))
    np.testing.assert_allclose(sim.run(x), run(d / "ref-conv1.onnx", x_q), rtol=1e-5, atol=1e-5)


def test_fp16_keeps_float32_io(built: dict) -> None:
    out = built["dir"] / "fp16.onnx"
    Q.build_fp16(built["pre"], out)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    x = images(8, 12)
    np.testing.assert_allclose(run(out, x), run(built["fp32"], x), atol=2e-2, rtol=2e-2)


def test_zero_calibration_breaks_the_model_and_the_gate_catches_it(built: dict) -> None:
    """A calibration set of constant zeros gives degenerate scales; the variant's predictions no
    longer follow FP32 and compare_classification fails it, naming the threshold and the margin."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    d = built["dir"]
    td, _, _ = collect_ranges(built["pre"], ArrayCalibrationReader(np.zeros((8, 1, 16, 16), np.float32)),
                              "minmax", threads=1)
    save_tensors_data(td, d / "ranges.minmax.json")
    broken = d / "broken.onnx"
    Q.build_ort_qdq(built["pre"], broken, d / "ranges.minmax.json", "minmax", activations="u8")
    x = images(96, 13)
    ref = run(built["fp32"], x).argmax(1)
    got = run(broken, x).argmax(1)
    assert len(set(ref.tolist())) > 1  # precondition: FP32 predictions vary
    labels = ["a", "b", "c", "d"]
    truth = ref  # judge against FP32's own predictions: FP32 scores 100 %
    verdict = compare_classification(classification_metrics(truth, ref, labels),
                                     classification_metrics(truth, got, labels),
                                     float(np.mean(got == ref)), GateSpec())
    assert not verdict.passed
    assert any(f.startswith("accuracy drop") and "allowed (over by" in f for f in verdict.failures)
    assert any("argmax agreement" in f for f in verdict.failures)


# --------------------------------------------------------------------------------------------
# Configuration and interruption
# --------------------------------------------------------------------------------------------


def test_quant_config_defaults_and_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "model.toml").write_text('name = "x"\n[quantization]\nmethod = "entropy"\nvariants = ["ov-int8"]\n')
    cfg = load_quant_config(tmp_path)
    assert cfg.method == "entropy" and cfg.variants == ("ov-int8",) and cfg.percentile == 99.99
    assert QuantConfig().method == ""  # resolved per task by calibrate (resolve_method)
    assert cfg.calibration_seed != cfg.validation_seed
    (tmp_path / "model.toml").write_text('[quantization]\nmetod = "entropy"\n')
    with pytest.raises(ModelSpecError, match="metod"):
        load_quant_config(tmp_path)
    with pytest.raises(ModelSpecError):
        QuantConfig(method="kl")


def test_ctrl_c_mid_write_leaves_no_file(tmp_path: Path) -> None:
    final = tmp_path / "model.int8.onnx"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half a model")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    atomic_write(final, b"complete")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half of version 2")
            raise KeyboardInterrupt
    assert final.read_bytes() == b"complete"  # the previous complete version survives
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_ctrl_c_inside_quantize_static_leaves_no_output(built: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization as oq

    def interrupted(model_input: str, model_output: str, *args: object, **kwargs: object) -> None:
        Path(model_output).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(oq, "quantize_static", interrupted)
    out = tmp_path / "int8.onnx"
    with pytest.raises(KeyboardInterrupt):
        Q.build_ort_qdq(built["pre"], out, built["ranges"], "percentile", activations="u8")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Real models: smoke only
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mr-brain-cls", "ct-abdomen-seg"])
def test_real_model_explicit_qdq_smoke(model: str, tmp_path: Path) -> None:
    """The reference model converts to every graph form without error (no calibration data: unit
    amax everywhere; this checks the graph surgery, not accuracy, which is the gate's job)."""
    src = REPO / "models" / model / "model.onnx"
    if not src.exists():
        pytest.skip(f"{src} not trained yet")
    Q.preprocess_model(src, tmp_path / "pre.onnx")
    pre = onnx.load(str(tmp_path / "pre.onnx"))
    amax = {n.input[0]: 1.0 for n in pre.graph.node if n.op_type in Q.TRT_QUANT_OPS}
    for kind in ("int8", "fp8"):
        notes = Q.build_explicit_qdq(tmp_path / "pre.onnx", tmp_path / f"{kind}.onnx", amax, kind)
        assert notes["quantized_nodes"] >= 5
    Q.build_fp16(tmp_path / "pre.onnx", tmp_path / "fp16.onnx")
    shape = [d.dim_value or 1 for d in pre.graph.input[0].type.tensor_type.shape.dim]
    y = run(tmp_path / "fp8.onnx", np.zeros(shape, np.float32))
    assert np.isfinite(y).all()


def test_default_method_depends_on_the_task() -> None:
    from agent.core.modelspec import load_spec
    from deploy.calibrate import resolve_method

    seg = load_spec(REPO / "models" / "ct-abdomen-seg")
    cls = load_spec(REPO / "models" / "mr-brain-cls")
    assert resolve_method(QuantConfig(), seg).method == "minmax"
    assert resolve_method(QuantConfig(), cls).method == "percentile"
    assert resolve_method(QuantConfig(method="entropy"), seg).method == "entropy"  # explicit wins
