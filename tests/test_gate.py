"""The accuracy gate (deploy.gate): verdicts, batch invariance, and one small end-to-end run.

The end-to-end run uses a tiny classifier (tests/test_quantize.py) behind an MR model.toml with
a 16x16 input, so calibrate -> quantize -> gate over real synthetic DICOM takes seconds; one of
its variants gets a corrupted weight and must fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.manifest import sha256_file
from agent.modelspec import GateSpec
from deploy.calibrate import QuantConfig, calibrate
from deploy.gate import batch_invariance, compare_classification, compare_segmentation, gate
from deploy.metrics import classification_metrics
from deploy.quantize import quantize

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
    assert good["passed"] and good["max_abs_diff"] < 1e-5 and out1.shape == (8, 4)
    bad, _ = batch_invariance(_Linear(5.0), x, "classification")
    assert not bad["passed"] and bad["max_abs_diff"] > 1.0


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
    doc = quantize(build, ["fp32", "ort-int8-u8s8", "ort-int8-s8s8", "trt-fp8"])
    # corrupt the s8s8 file after quantize, keeping variants.json consistent with it (as if the
    # builder itself had produced a broken model)
    rec = next(r for r in doc["variants"] if r["id"] == "ort-int8-s8s8")
    _corrupt_first_conv(build / rec["file"])
    rec["sha256"] = sha256_file(build / rec["file"])
    rec["size"] = (build / rec["file"]).stat().st_size
    (build / "variants.json").write_text(json.dumps(doc))
    result = gate(model_dir, build, cfg, n=24)
    return {"root": root, "model_dir": model_dir, "build": build, "doc": result}


def test_gate_end_to_end(gated: dict) -> None:
    doc = gated["doc"]
    build = gated["build"]
    ref = doc["reference"]
    assert sum(1 for col in zip(*ref["confusion"], strict=True) if sum(col)) >= 2  # FP32 predicts several classes
    assert doc["validation"]["disjoint_from_calibration"] is True
    assert set(doc["passed"]) >= {"fp32", "ort-int8-u8s8"}
    u8 = doc["variants"]["ort-int8-u8s8"]
    assert u8["execution_precision"]["summary"].startswith("int8")
    assert u8["batch_invariance"]["passed"]
    assert u8["metrics"]["argmax_agreement"] >= 0.97
    assert (build / u8["selftest"]["file"]).exists()
    with np.load(build / u8["selftest"]["file"]) as st:
        assert st["input"].shape == (4, 1, 16, 16) and st["expected"].shape == (4, 4)
    # TensorRT FP8 graph: validated by ORT simulating its Q/DQ arithmetic, and says so
    fp8 = doc["variants"]["trt-fp8"]
    assert "simulating" in fp8["validated_with"]


def test_gate_fails_a_corrupted_variant(gated: dict) -> None:
    doc = gated["doc"]
    assert "ort-int8-s8s8" in doc["failed"]
    broken = doc["variants"]["ort-int8-s8s8"]
    assert not broken["passed"] and "selftest" not in broken
    assert any("argmax agreement with FP32" in f and "required (short by" in f for f in broken["failures"])


def test_gate_refuses_a_variant_changed_after_quantize(gated: dict, tmp_path: Path) -> None:
    import shutil

    from deploy.gate import GateError

    build = tmp_path / "build"
    shutil.copytree(gated["build"], build)
    fp32 = build / "model.fp32.onnx"
    fp32.write_bytes(fp32.read_bytes() + b"\0")
    with pytest.raises(GateError, match="changed since `quantize`"):
        gate(gated["model_dir"], build, QuantConfig(threads=1), ["fp32"], n=4)
