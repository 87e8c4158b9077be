"""The accuracy gate (deploy.gate and its parts): verdicts, batch invariance, one small end-to-end run.

The end-to-end run uses a tiny classifier (tests/test_quantize.py) behind an MR model.toml with
a 16x16 input, so calibrate -> quantize -> gate over real synthetic DICOM takes seconds; one of
its variants gets a corrupted weight and must fail. Nothing assumes this host's instruction set:
the planning rules are tested on constructed hosts of each family, the end-to-end run asks
``host().isa_family`` what it should have done here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.core.accuracy import (
    classification_metrics,
    compare_classification,
    compare_segmentation,
    load_validation_set,
)
from agent.core.isa import ONEDNN_MAX_ISA
from agent.core.manifest import IsaVerdict
from agent.core.modelspec import GateSpec
from agent.core.util import sha256_file
from deploy.calibrate import QuantConfig, calibrate
from deploy.gate import gate
from deploy.gate_compare import batch_invariance
from deploy.gate_families import isa_limited_families, plan_runs, publishability
from deploy.quantize import quantize
from deploy.records import GateDoc, MeasuredVariant, VariantVerdict
from deploy.variants import SIM_BACKEND, Host, catalogue_by_id, host

REPO = Path(__file__).resolve().parents[1]
LABELS = ["no_tumour", "glioma", "meningioma", "pituitary"]


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------


def _cls(y_true: list[int], y_pred: list[int]) -> dict:
    return classification_metrics(y_true, y_pred, LABELS)


def test_classification_within_thresholds_passes() -> None:
    truth = [0, 1, 2, 3] * 50
    ref = list(truth)
    var = list(truth)
    var[0] = 1  # one sample of 200 flips: accuracy -0.5 point, class 0 recall -2 points (50 samples)
    verdict = compare_classification(_cls(truth, ref), _cls(truth, var), 199 / 200, GateSpec())
    assert verdict.passed, verdict.failures
    assert verdict.drops["accuracy"] == pytest.approx(0.005)
    assert verdict.drops["recall.no_tumour"] == pytest.approx(0.02)


def test_classification_reports_each_failed_threshold_and_by_how_much() -> None:
    truth = [0, 1, 2, 3] * 25
    ref = list(truth)
    var = list(truth)
    for i in (0, 4, 8):  # three class-0 samples become class 1
        var[i] = 1
    verdict = compare_classification(_cls(truth, ref), _cls(truth, var), 0.96, GateSpec())
    assert not verdict.passed
    text = "\n".join(verdict.failures)
    assert "accuracy drop 3.000 points > 1.000 allowed (over by 2.000)" in text
    assert "recall drop of class no_tumour 12.000 points > 2.000 allowed (over by 10.000)" in text
    assert re.search(r"argmax agreement with FP32 0\.9600 < 0\.9700 required \(short by 0\.0100\)", text)
    # a variant that is *better* than FP32 has negative drops and passes the accuracy check
    better = compare_classification(_cls(truth, var), _cls(truth, ref), 1.0, GateSpec())
    assert better.passed and better.drops["accuracy"] < 0


def test_segmentation_label_and_mean_dice() -> None:
    ref = {"mean_dice": 0.90, "dice": {"liver": 0.95, "spleen": 0.90, "kidney_left": 0.88, "kidney_right": 0.87}}
    ok = {"mean_dice": 0.895, "dice": {"liver": 0.95, "spleen": 0.89, "kidney_left": 0.875, "kidney_right": 0.865}}
    assert compare_segmentation(ref, ok, 0.995, GateSpec()).passed
    bad = {"mean_dice": 0.89, "dice": {"liver": 0.95, "spleen": 0.865, "kidney_left": 0.88, "kidney_right": 0.865}}
    verdict = compare_segmentation(ref, bad, 0.99, GateSpec())
    assert not verdict.passed
    assert any(f.startswith("Dice drop of label spleen 0.035 > 0.020") for f in verdict.failures)
    assert not any("mean Dice" in f for f in verdict.failures)  # 0.010 is exactly the limit: allowed


# --------------------------------------------------------------------------------------------
# Batch invariance
# --------------------------------------------------------------------------------------------


class _Linear:
    """A fake backend: logits = x @ W, optionally perturbed by the batch size."""

    def __init__(self, noise: float) -> None:
        self.w = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
        self.noise = noise

    def run(self, x: np.ndarray) -> np.ndarray:
        out = x.reshape(len(x), -1) @ self.w
        return out + self.noise * (len(x) - 1)


def test_batch_invariance() -> None:
    x = np.random.default_rng(1).normal(size=(8, 1, 4, 4)).astype(np.float32)
    good, out1 = batch_invariance(_Linear(0.0), x, "classification")
    # float32 matmul may round differently per batch size (BLAS kernels differ by shape): tiny diffs
    assert good.passed and good.max_abs_diff < 1e-5 and out1.shape == (8, 4)
    bad, _ = batch_invariance(_Linear(5.0), x, "classification")
    assert not bad.passed and bad.max_abs_diff > 1.0


# --------------------------------------------------------------------------------------------
# Which runs prove which family (constructed hosts: one per family, whatever this machine is)
# --------------------------------------------------------------------------------------------

_FLAGS = {"x86-vnni": {"avx2", "avx512f", "avx512_vnni"}, "x86-avx2": {"avx2"}, "x86-baseline": {"sse4_1"},
          "arm-dotprod": {"asimd", "asimddp", "asimdhp"}}


def _host(family: str) -> Host:
    arch = "aarch64" if family.startswith("arm") else "x86_64"
    h = Host(arch=arch, cpu_model=f"test {family}", cores=2, cpu_flags=frozenset(_FLAGS[family]),
             libraries={"onnxruntime": "1.20", "openvino": "2025.0"})
    assert h.isa_family == family
    return h


def _plan(vid: str, family: str) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(r.method, r.backend, r.families) for r in plan_runs(catalogue_by_id()[vid], _host(family))]


def test_u8s8_is_native_on_vnni_and_simulated_for_vnni_elsewhere() -> None:
    assert _plan("ort-int8-u8s8", "x86-vnni") == [("native", "onnxruntime", ("x86-vnni",))]
    # on AVX2 its native run is kept (it proves the variant wrong there), plus the exact arithmetic
    assert _plan("ort-int8-u8s8", "x86-avx2") == [("native", "onnxruntime", ("x86-avx2",)),
                                                  ("simulated", SIM_BACKEND, ("x86-vnni",))]
    assert _plan("ort-int8-u8s8", "arm-dotprod") == [("simulated", SIM_BACKEND, ("x86-vnni",))]


def test_reduce_range_and_s8s8_plans() -> None:
    assert _plan("ort-int8-u8s8-rr", "x86-avx2") == [("native", "onnxruntime", ("x86-avx2",))]
    assert _plan("ort-int8-u8s8-rr", "x86-vnni") == [("native", "onnxruntime", ("x86-vnni",)),
                                                     ("simulated", SIM_BACKEND, ("x86-avx2",))]
    # s8s8 cannot run on x86 (arch aarch64): no native run, only the simulation for ARM SDOT
    for family in ("x86-vnni", "x86-avx2"):
        assert _plan("ort-int8-s8s8", family) == [("simulated", SIM_BACKEND, ("arm-dotprod",))]
    assert _plan("ort-int8-s8s8", "arm-dotprod") == [("native", "onnxruntime", ("arm-dotprod",))]
    # TensorRT keeps its CPU simulation and proves no CPU family
    assert _plan("trt-int8", "x86-avx2") == [("simulated", SIM_BACKEND, ())]


def test_isa_limited_families_are_the_lower_x86_ones() -> None:
    ov = catalogue_by_id()["ov-int8"]
    assert isa_limited_families(ov, _host("x86-vnni")) == ["x86-avx2", "x86-baseline"]
    assert isa_limited_families(ov, _host("x86-avx2")) == ["x86-baseline"]
    assert isa_limited_families(ov, _host("arm-dotprod")) == []  # ov-int8 is x86 only
    assert isa_limited_families(catalogue_by_id()["ort-int8-u8s8"], _host("x86-vnni")) == []  # not OpenVINO


def test_publishability_rules() -> None:
    u8 = catalogue_by_id()["ort-int8-u8s8"]
    ov = catalogue_by_id()["ov-int8"]

    def verdict(passed: bool, method: str) -> IsaVerdict:
        return IsaVerdict.model_validate({"passed": passed, "method": method})

    # a failed native verdict for a family it does not target is recorded, not blocking
    ok, note = publishability(u8, True, {"x86-avx2": verdict(False, "native"), "x86-vnni": verdict(True, "simulated")},
                              True)
    assert ok and "x86-avx2 (native)" in note and "skip" in note
    # a failed target family blocks, whatever the other verdicts and the method
    assert not publishability(ov, True, {"x86-vnni": verdict(True, "native"),
                                         "x86-avx2": verdict(False, "isa-limited")}, True)[0]
    # at least one target family must be shown accurate
    assert not publishability(u8, True, {"x86-avx2": verdict(True, "native")}, True)[0]
    # and nothing is publishable without FP32
    assert not publishability(u8, True, {"x86-vnni": verdict(True, "native")}, False)[0]
    # target-less variants keep the old rule: their own run
    assert publishability(catalogue_by_id()["ov-fp32"], True, {}, True)[0]
    assert not publishability(catalogue_by_id()["ov-fp32"], False, {}, True)[0]


def test_label_maps_map_onto_the_model_grid_and_back() -> None:
    """The device set's segmentation truth is on the model grid (deploy.training's mapping, the one
    the model's targets were made with): the inverse of restore_label_map, exact where the source
    grid is finer, with reorientation (axes swapped and flipped)."""
    from agent.imaging.preprocess import Geometry, restore_label_map
    from deploy.training import labels_to_model_space

    model = np.random.default_rng(3).integers(0, 5, size=(6, 7, 8)).astype(np.uint8)
    perm, flips = (0, 2, 1), (True, False, True)
    source_shape = (13, 20, 15)  # canonical (13, 15, 20): finer than the model grid on every axis
    canonical_shape = tuple(source_shape[p] for p in perm)
    geometry = Geometry(dims=3, source_shape=source_shape, source_spacing=(1.0, 1.0, 1.0), permutation=perm,
                        flips=flips, canonical_shape=canonical_shape, canonical_spacing=(1.0, 1.0, 1.0),
                        resampled_shape=model.shape, zoom=tuple(m / c for m, c in zip(model.shape, canonical_shape, strict=True)),
                        resampled_spacing=(1.0, 1.0, 1.0))
    source = restore_label_map(model, geometry)
    assert source.shape == source_shape
    np.testing.assert_array_equal(labels_to_model_space(source, geometry, 5), model)


# --------------------------------------------------------------------------------------------
# End to end on a tiny model (real synthetic DICOM, the agent's pipeline and backends)
# --------------------------------------------------------------------------------------------


def tiny_model_dir(root: Path) -> Path:
    """An MR classification model folder: the real mr-brain-cls model.toml at a 16x16 input and
    version 1.0.0 (whatever the real model's version), with the tiny classifier of test_quantize
    as model.onnx."""
    from test_quantize import tiny_classifier

    d = root / "tiny-mr"
    d.mkdir()
    toml = (REPO / "models" / "mr-brain-cls" / "model.toml").read_text()
    toml = re.sub(r"(?m)^target_size = .*$", "target_size = [16, 16]", toml)
    toml = re.sub(r'(?m)^version = ".*"$', 'version = "1.0.0"', toml)
    (d / "model.toml").write_text(toml)
    tiny_classifier(d / "model.onnx")
    return d


def _corrupt_first_conv(path: Path) -> None:
    """Zero the first convolution's (quantized) weights: a corrupted variant file."""
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = next(n for n in model.graph.node if conv.input[1] in n.output)
    init = next(t for t in model.graph.initializer if t.name == dq.input[0])
    init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gate")
    model_dir = tiny_model_dir(root)
    build = root / "build"
    cfg = QuantConfig(calibration_samples=24, validation_samples=24, threads=1)
    calibrate(model_dir, build, cfg)
    quantize(build, ["fp32", "ort-int8-u8s8", "ort-int8-s8s8", "ov-int8", "trt-fp8"])
    # corrupt the s8s8 file after quantize, keeping variants.json consistent with it (as if the
    # builder itself had produced a broken model): edited as plain JSON, as any other tool would
    doc = json.loads((build / "variants.json").read_text())
    rec = next(r for r in doc["variants"] if r["id"] == "ort-int8-s8s8")
    _corrupt_first_conv(build / rec["file"])
    rec["sha256"] = sha256_file(build / rec["file"])
    rec["size"] = (build / rec["file"]).stat().st_size
    (build / "variants.json").write_text(json.dumps(doc))
    result = gate(model_dir, build, cfg, n=24)
    return {"root": root, "model_dir": model_dir, "build": build, "doc": result}


def _measured(doc: GateDoc, vid: str) -> MeasuredVariant:
    entry = doc.variants[vid]
    assert isinstance(entry, MeasuredVariant), f"{vid} was not measured: {entry.failures}"
    return entry


def test_gate_end_to_end(gated: dict) -> None:
    doc: GateDoc = gated["doc"]
    build = gated["build"]
    me = host()
    ref = doc.reference
    assert sum(1 for col in zip(*ref["confusion"], strict=True) if sum(col)) >= 2  # FP32 predicts several classes
    assert doc.validation.disjoint_from_calibration is True
    assert doc.isa_family == me.isa_family
    assert set(doc.passed) >= {"fp32", "ort-int8-u8s8"}
    u8 = _measured(doc, "ort-int8-u8s8")
    assert u8.isa_family == me.isa_family and u8.targets == ("x86-vnni",) and u8.publishable
    if me.arch == "x86_64":
        assert u8.execution_precision.summary.startswith("int8")  # this host's kernels, read back
        assert u8.isa_verdicts[me.isa_family].method == "native"
    # its target family: proven natively on a VNNI host, else by computing its arithmetic exactly
    vnni = u8.isa_verdicts["x86-vnni"]
    assert vnni.passed and vnni.method == ("native" if me.isa_family == "x86-vnni" else "simulated")
    assert u8.method == vnni.method  # the figures stand for the target family's run
    assert u8.batch_invariance.passed
    assert u8.metrics["argmax_agreement"] >= 0.97
    assert u8.selftest is not None and (build / u8.selftest.file).exists()
    with np.load(build / u8.selftest.file) as st:
        assert st["input"].shape == (4, 1, 16, 16) and st["expected"].shape == (4, 4)
    # TensorRT FP8 graph: validated by ORT simulating its Q/DQ arithmetic, and says so
    fp8 = _measured(doc, "trt-fp8")
    assert "simulating" in fp8.validated_with and fp8.isa_verdicts == {}


def test_gate_json_reads_back_as_written(gated: dict) -> None:
    """The typed records write exactly the JSON they read: gate.json and variants.json round-trip."""
    from deploy.records import VariantsDoc

    build = gated["build"]
    for cls, name in ((GateDoc, "gate.json"), (VariantsDoc, "variants.json")):
        raw = json.loads((build / name).read_text())
        assert json.loads(json.dumps(cls.read(build / name).model_dump())) == raw
    assert GateDoc.read(build / "gate.json") == gated["doc"]
    # an entry the gate could not measure has no figures, and is told apart from one it could
    doc = GateDoc.model_validate({**json.loads((build / "gate.json").read_text()), "variants": {
        "x": {"passed": False, "failures": ["not built: y"], "isa_verdicts": {}, "targets": []}}})
    assert type(doc.variants["x"]) is VariantVerdict and not doc.variants["x"].may_publish


def test_isa_limited_runs_cover_every_lower_family(gated: dict) -> None:
    """OpenVINO is run restricted (ONEDNN_MAX_CPU_ISA) to each family below this host's, in a fresh
    process, and judged on the device validation set; a family the host cannot emulate gets none."""
    me = host()
    doc: GateDoc = gated["doc"]
    ov = _measured(doc, "ov-int8")
    lower = isa_limited_families(catalogue_by_id()["ov-int8"], me)
    assert sorted(f for f, r in ov.isa_verdicts.items() if r.method == "isa-limited") == sorted(lower)
    assert doc.device_validation is not None
    for fam in lower:
        assert ov.isa_limited is not None
        run = ov.isa_limited[fam]
        assert run.onednn_max_cpu_isa == ONEDNN_MAX_ISA[fam]
        assert run.n_samples == doc.device_validation.n_samples
        assert run.kernels  # what OpenVINO compiled to under the restriction
    if me.isa_family in ("x86-avx2", "x86-vnni"):
        assert ov.isa_verdicts[me.isa_family].method == "native"
        assert "x86-baseline" in lower


def test_device_validation_set_round_trips(gated: dict) -> None:
    from agent.inference.validation import predict
    from agent.variants.device_gate import score
    from deploy.gate_reference import flat_metrics
    from deploy.gate_runtime import load_variant, warmup_shape

    doc, build = gated["doc"], gated["build"]
    dv = doc.device_validation
    path = build / dv.file
    assert dv.sha256 == sha256_file(path) and dv.size == path.stat().st_size
    samples = load_validation_set(path)
    assert samples.task == "classification" and len(samples) == dv.n_samples == 24  # min(240, n=24)
    assert all(x.shape == (1, 16, 16) for x in samples.inputs)
    assert sorted({int(t) for t in samples.truth}) == [0, 1, 2, 3]  # classes round robin
    # FP32's reference figures are reproducible from the file alone
    from agent.core.modelspec import load_spec

    spec = load_spec(gated["model_dir"])
    fp32 = load_variant(spec, catalogue_by_id()["fp32"], build / "model.fp32.onnx", 1, warmup_shape(spec))
    assert flat_metrics(score(samples, predict(fp32.run, samples, spec), spec)) == pytest.approx(dv.reference)


def test_gate_fails_a_corrupted_variant(gated: dict) -> None:
    doc: GateDoc = gated["doc"]
    assert "ort-int8-s8s8" in doc.failed
    broken = _measured(doc, "ort-int8-s8s8")
    assert not broken.passed and not broken.publishable and broken.selftest is None
    assert "selftest" not in json.loads((gated["build"] / "gate.json").read_text())["variants"]["ort-int8-s8s8"]
    # its target family is ARM SDOT: gated natively there, by the exact simulation elsewhere
    dotprod = broken.isa_verdicts["arm-dotprod"]
    assert not dotprod.passed and dotprod.method == ("native" if host().isa_family == "arm-dotprod" else "simulated")
    if host().arch != "aarch64":  # it cannot run natively here: no native run at all
        assert [r.method for r in broken.runs] == ["simulated"]
    assert any("argmax agreement with FP32" in f and "required (short by" in f for f in broken.failures)


def test_gate_refuses_a_variant_changed_after_quantize(gated: dict, tmp_path: Path) -> None:
    import shutil

    from deploy.gate_runtime import GateError

    build = tmp_path / "build"
    shutil.copytree(gated["build"], build)
    fp32 = build / "model.fp32.onnx"
    fp32.write_bytes(fp32.read_bytes() + b"\0")
    with pytest.raises(GateError, match="changed since `quantize`"):
        gate(gated["model_dir"], build, QuantConfig(threads=1), ["fp32"], n=4)
