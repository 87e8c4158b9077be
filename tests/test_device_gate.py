"""Instruction-set families and the device's own accuracy gate: the rules (agent.core.isa, agent.core.accuracy,
agent.variants.device_gate) on their own. The whole path, a registry built by edge-deploy and gated
in a real worker at activation, is in tests/test_engines.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.core.accuracy import ValidationSamples, load_validation_set, write_validation_set
from agent.core.isa import isa_family, proof_needed, refusal
from agent.core.manifest import Variant
from agent.core.modelspec import load_spec
from agent.inference.validation import predict
from agent.variants.device_gate import judge_predictions, score

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("arch", "flags", "family"), [
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "x86-vnni"),
    ("x86_64", {"avx2", "avx_vnni"}, "x86-vnni"),
    ("x86_64", {"avx2", "amx_int8", "avx512_vnni"}, "x86-vnni"),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "x86-avx2"),  # Skylake-X: AVX-512 but VPMADDUBSW
    ("x86_64", {"avx2", "fma"}, "x86-avx2"),
    ("x86_64", {"sse4_1"}, "x86-baseline"),
    ("aarch64", {"asimd", "asimddp"}, "arm-dotprod"),
    ("aarch64", {"asimd"}, "arm-baseline"),
    ("riscv64", set(), "other"),
])
def test_isa_family_follows_the_integer_dot_product_path(arch: str, flags: set[str], family: str) -> None:
    assert isa_family(arch, flags) == family


def _variant(vid: str = "ort-int8-u8s8", precision: str = "int8", backend: str = "onnxruntime",
             **extra: Any) -> Variant:
    return Variant.model_validate({
        "id": vid, "backend": backend, "precision": precision, "file": f"{vid}.onnx", "sha256": "0" * 64,
        "size": 1, "execution_precision": precision,
        "gate": {"passed": True, "validated_with": backend, "n_samples": 1, "metrics": {}}, **extra})


def _verdict(passed: bool, method: str) -> dict[str, Any]:
    return {"passed": passed, "method": method, "summary": "accuracy 0.7812 vs FP32 1.0000" if not passed else "ok"}


def test_proof_needed_trusts_only_native_or_isa_limited_passes_for_the_devices_family() -> None:
    assert proof_needed(_variant("fp32", "fp32"), "fp32", "x86-avx2").decision == "proven"
    assert proof_needed(_variant("ov-fp32", "fp32", "openvino"), "fp32", "x86-avx2").decision == "proven"
    native = _variant(isa_gates={"x86-vnni": _verdict(True, "native")})
    assert proof_needed(native, "fp32", "x86-vnni").decision == "proven"
    # the same verdict says nothing about another family: the device gates it itself
    other = proof_needed(native, "fp32", "x86-avx2")
    assert other.decision == "gate" and "x86-vnni (native)" in other.reason
    limited = _variant("ov-int8", backend="openvino", isa_gates={"x86-avx2": _verdict(True, "isa-limited")})
    assert proof_needed(limited, "fp32", "x86-avx2").decision == "proven"
    simulated = _variant(isa_gates={"x86-vnni": _verdict(True, "simulated")})
    assert proof_needed(simulated, "fp32", "x86-vnni").decision == "gate"
    refused = proof_needed(_variant(isa_gates={"x86-avx2": _verdict(False, "native")}), "fp32", "x86-avx2")
    assert refused.decision == "refused" and "accuracy 0.7812 vs FP32 1.0000" in refused.reason
    # a failed simulation refuses too: nothing gets past a verdict that says it is wrong there
    assert proof_needed(_variant(isa_gates={"arm-dotprod": _verdict(False, "simulated")}), "fp32",
                        "arm-dotprod").decision == "refused"
    # a manifest from before per-family verdicts proves nothing about this device
    assert proof_needed(_variant(), "fp32", "x86-avx2").decision == "gate"
    # what the pull and the activation skip: a refusal, or a variant to gate with nothing to gate it on
    assert refusal(refused, has_validation_set=True) == refused.reason
    unproven = proof_needed(_variant(), "fp32", "x86-avx2")
    assert refusal(unproven, has_validation_set=True) == ""
    assert refusal(unproven, has_validation_set=False).endswith("and the manifest has no validation set to gate it here")
    assert refusal(proof_needed(native, "fp32", "x86-vnni"), has_validation_set=False) == ""


def test_validation_set_round_trips_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1, 8, 8)).astype(np.float32) * 3 for _ in range(5)]
    write_validation_set(tmp_path / "set.npz", "classification", inputs, [0, 1, 2, 3, 0])
    back = load_validation_set(tmp_path / "set.npz")
    assert back.task == "classification" and len(back) == 5
    assert [int(t) for t in back.truth] == [0, 1, 2, 3, 0]
    for a, b in zip(inputs, back.inputs, strict=True):  # 8 bits over each sample's own range
        assert np.max(np.abs(a - b)) <= (a.max() - a.min()) / 255 / 2 + 1e-5
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="unreadable"):
        load_validation_set(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="unreadable"):
        load_validation_set(tmp_path / "other.npz")
    with pytest.raises(ValueError):
        write_validation_set(tmp_path / "x.npz", "classification", inputs, [0])


def test_judge_refuses_a_variant_that_disagrees_with_fp32_and_names_its_figures() -> None:
    spec = load_spec(REPO / "models" / "mr-brain-cls")
    truth = [i % 4 for i in range(40)]
    samples = ValidationSamples("classification", tuple(np.zeros((1, 2, 2), np.float32) for _ in truth),
                                tuple(np.asarray(t) for t in truth))
    ref = [np.eye(4, dtype=np.float32)[t] for t in truth]
    same = [r + 0.01 for r in ref]
    assert judge_predictions(samples, ref, same, spec).passed
    # the pituitary class predicted as no tumour: what saturating INT8 kernels did on AVX2
    wrong = [np.eye(4, dtype=np.float32)[0 if t == 3 else t] for t in truth]
    verdict = judge_predictions(samples, ref, wrong, spec)
    assert not verdict.passed
    assert verdict.metrics["accuracy"] == pytest.approx(0.75) and verdict.reference["accuracy"] == 1.0
    assert any("recall drop of class pituitary" in f for f in verdict.failures)
    assert score(samples, ref, spec)["accuracy"] == 1.0


def test_predict_runs_the_sliding_window_for_a_segmentation_model() -> None:
    spec = load_spec(REPO / "models" / "ct-abdomen-seg")
    image = np.zeros((1, 40, 70, 70), np.float32)
    image[0, 10:30, 20:50, 20:50] = 1.0
    calls: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:  # label 1 where the input is bright, 0 elsewhere
        calls.append(batch.shape)
        logits = np.zeros((batch.shape[0], len(spec.labels), *batch.shape[2:]), np.float32)
        logits[:, 1] = batch[:, 0] * 2 - 1
        return logits

    samples = ValidationSamples("segmentation", (image,), ((image[0] > 0.5).astype(np.uint8),))
    preds = predict(run, samples, spec)
    assert calls and all(s[2:] == tuple(spec.input.patch_size or ()) for s in calls)
    assert preds[0].shape == image.shape[1:] and preds[0].dtype == np.uint8
    assert np.array_equal(preds[0], samples.truth[0])
    assert score(samples, preds, spec)["dice"]["liver"] == 1.0  # type: ignore[index]
