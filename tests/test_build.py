"""``edge-deploy build`` end to end: calibrate -> quantize -> gate -> bench -> publish.

Two builds, both through the real command line (``deploy.cli.main``) and real engines:

* the tiny classifier of tests/test_quantize.py behind an MR model.toml, calibrated with a
  deliberately broken percentile (50.5: every activation range is clipped near its median), so
  its INT8 variants must fail the gate, stay out of the registry, and the report must say which
  threshold failed and by how much;
* the real mr-brain-cls with the fast options other tests use to make a registry (a few seconds).

Each registry is then verified the way an agent does (signature, digests) and tampered with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.core.errors import RegistryError
from agent.core.manifest import verify_file, verify_index, verify_manifest
from agent.core.modelspec import load_spec
from deploy.cli import main as cli
from deploy.gate_families import isa_limited_families
from deploy.records import BenchReport
from deploy.variants import catalogue_by_id, host

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys") / "k"
    assert cli(["keygen", "--out", str(d)]) == 0
    return d / "signing.key", d / "signing.pub"


def _verified(registry: Path, name: str, pub: bytes, version: str = "1.0.0") -> object:
    """Verify a published version as an agent would; return its Manifest."""
    vdir = registry / name / version
    manifest = verify_manifest((vdir / "manifest.json").read_bytes(), (vdir / "manifest.json.sig").read_bytes(), [pub])
    for v in manifest.variants:
        verify_file(vdir / v.file, v.sha256, v.size)
        assert v.gate.passed and not v.gate.failures
        if v.selftest is not None:
            verify_file(vdir / v.selftest.file, v.selftest.sha256, v.selftest.size)
    verify_index((registry / "index.json").read_bytes(), (registry / "index.json.sig").read_bytes(), [pub])
    return manifest


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> dict[str, Path]:
    """A tiny-model build whose INT8 calibration is deliberately broken (percentile 50.5)."""
    from test_gate import tiny_model_dir

    root = tmp_path_factory.mktemp("build")
    model_dir = tiny_model_dir(root)
    build, registry = root / "build", root / "registry"
    rc = cli(["build", str(model_dir), "--key", str(keys[0]), "--out", str(registry), "--build", str(build),
              "--samples", "24", "--val-n", "24", "--method", "percentile", "--percentile", "50.5",
              "--variants", "fp32,ort-int8-u8s8,trt-int8,ov-fp32", "--iterations", "3", "--threads", "1"])
    assert rc == 0
    return {"build": build, "registry": registry}


def test_broken_calibration_fails_the_gate_and_is_not_published(broken: dict[str, Path],
                                                                 keys: tuple[Path, Path]) -> None:
    build, registry = broken["build"], broken["registry"]
    gate = json.loads((build / "gate.json").read_text())
    assert {"ort-int8-u8s8", "trt-int8"} <= set(gate["failed"])  # both INT8 layouts use the clipped ranges
    assert {"fp32", "ov-fp32"} <= set(gate["passed"])  # float variants do not depend on calibration
    for vid in ("ort-int8-u8s8", "trt-int8"):
        failures = gate["variants"][vid]["failures"]
        # each failure names the threshold and the margin
        assert failures and all(re.search(r"(over by|short by) \d+\.\d+", f) for f in failures), failures
        assert not (build / "selftest" / f"{vid}.npz").exists()

    manifest = _verified(registry, "mr-brain-cls", keys[1].read_bytes())
    ids = {v.id for v in manifest.variants}  # type: ignore[attr-defined]
    assert ids == {"fp32", "ov-fp32"}
    vdir = registry / "mr-brain-cls" / "1.0.0"
    assert not list(vdir.glob("*.qdq.onnx"))  # no failed variant's file reached the registry
    assert set(manifest.validation["failed_variants"]) == {"ort-int8-u8s8", "trt-int8"}  # type: ignore[attr-defined]
    assert cli(["verify", str(registry), "--pub", str(keys[1])]) == 0  # what was published is sound

    # the benchmark report exists and says which threshold failed, by how much
    report = (build / "bench" / "report.md").read_text()
    assert re.search(r"`ort-int8-u8s8` failed the gate: .*\((over|short) by \d", report), report
    raw = json.loads((build / "bench" / "report.json").read_text())
    assert json.loads(json.dumps(BenchReport.read(build / "bench" / "report.json").model_dump())) == raw
    doc = raw
    rows = {r["id"]: r for r in doc["variants"]}
    assert rows["fp32"]["latency_ms_median"] > 0 and rows["fp32"]["loadavg_before"]
    # variants the gate refused are listed as such and never timed
    for vid in ("ort-int8-u8s8", "trt-int8"):
        assert rows[vid]["skipped"].startswith("refused by the gate: ") and "latency_ms_median" not in rows[vid]
        assert f"`{vid}`: refused by the gate" in report
    # the speed targets' baseline: ORT FP32 as a user runs it by default, beside the agent's FP32
    default = rows["fp32-ort-default"]
    assert default["latency_ms_median"] > 0 and default["options"] == {"allow_spinning": True}
    assert doc["isa_family"] == host().isa_family == doc["target"]["isa_family"]
    assert doc["target"]["baseline"] == "fp32-ort-default"
    assert (build / "bench" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tampered_manifest_is_rejected(broken: dict[str, Path], keys: tuple[Path, Path]) -> None:
    """Re-adding a failed variant to the manifest (or any other edit) breaks the signature."""
    vdir = broken["registry"] / "mr-brain-cls" / "1.0.0"
    data = (vdir / "manifest.json").read_bytes()
    sig = (vdir / "manifest.json.sig").read_bytes()
    doc = json.loads(data)
    doc["variants"].append({**doc["variants"][0], "id": "ort-int8-u8s8", "precision": "int8"})
    forged = json.dumps(doc, sort_keys=True, indent=2).encode() + b"\n"
    with pytest.raises(RegistryError, match="does not verify"):
        verify_manifest(forged, sig, [keys[1].read_bytes()])
    with pytest.raises(RegistryError, match="does not verify"):
        verify_manifest(data.replace(b'"passed": true', b'"passed": false', 1), sig, [keys[1].read_bytes()])


def test_fast_build_of_the_real_classifier(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The fast command other tests use to make a registry (see docs/benchmarks.md)."""
    if not (REPO / "models" / "mr-brain-cls" / "model.onnx").exists():
        pytest.skip("models/mr-brain-cls/model.onnx not trained")
    registry = tmp_path / "registry"
    rc = cli(["build", str(REPO / "models" / "mr-brain-cls"), "--key", str(keys[0]), "--out", str(registry),
              "--build", str(tmp_path / "build"), "--samples", "16", "--val-n", "40", "--skip-bench",
              "--variants", "fp32,ort-int8-u8s8,ort-int8-u8s8-rr,ort-int8-s8s8,ov-int8"])
    assert rc == 0
    version = load_spec(REPO / "models" / "mr-brain-cls").version
    manifest = _verified(registry, "mr-brain-cls", keys[1].read_bytes(), version)
    variants = {v.id: v for v in manifest.variants}  # type: ignore[attr-defined]
    assert set(variants) == {"fp32", "ort-int8-u8s8", "ort-int8-u8s8-rr", "ort-int8-s8s8", "ov-int8"}
    assert all(v.selftest is not None and v.bench is None for v in variants.values())
    assert manifest.fallback == "fp32"  # type: ignore[attr-defined]
    assert manifest.validation_set is not None and manifest.validation_set.n_samples == 40  # type: ignore[attr-defined]
    me = host()
    gates = {vid: v.isa_gates for vid, v in variants.items()}
    # u8s8: proven natively on VNNI hosts; on AVX2 hosts its 8-bit weights saturate VPMADDUBSW, so
    # it is published with a failed native x86-avx2 verdict (those devices skip it) and a simulated
    # x86-vnni pass (what VNNI computes)
    if me.isa_family == "x86-vnni":
        assert gates["ort-int8-u8s8"]["x86-vnni"].method == "native" and gates["ort-int8-u8s8"]["x86-vnni"].passed
    else:
        assert gates["ort-int8-u8s8"]["x86-vnni"].method == "simulated" and gates["ort-int8-u8s8"]["x86-vnni"].passed
    if me.isa_family == "x86-avx2":
        native = gates["ort-int8-u8s8"]["x86-avx2"]
        assert native.method == "native" and not native.passed and "accuracy" in native.summary
    if me.isa_family in ("x86-avx2", "x86-vnni"):
        assert variants["ort-int8-u8s8"].execution_precision == "int8"
        # reduce_range: 7-bit weights fit 16-bit pair sums, so it is exact on every x86 family
        rr = gates["ort-int8-u8s8-rr"][me.isa_family]
        assert rr.method == "native" and rr.passed
        assert gates["ov-int8"][me.isa_family].method == "native" and gates["ov-int8"][me.isa_family].passed
        assert {f: g.method for f, g in gates["ov-int8"].items() if f != me.isa_family} == {
            f: "isa-limited" for f in isa_limited_families(catalogue_by_id()["ov-int8"], me)}
    if me.arch == "x86_64":  # s8s8 is ARM-only: gated by computing its arithmetic exactly
        assert {f: (g.method, g.passed) for f, g in gates["ort-int8-s8s8"].items()} == {
            "arm-dotprod": ("simulated", True)}
    assert cli(["verify", str(registry), "--pub", str(keys[1])]) == 0


def test_3d_report_splits_the_full_volume_time() -> None:
    """The report says how much of a full volume is spent outside the backend, and what that caps."""
    from agent.core.modelspec import load_spec
    from deploy.bench_report import render_markdown, summarise
    from deploy.records import BenchRow

    spec = load_spec(REPO / "models" / "ct-abdomen-seg")

    def row(vid: str, patch_ms: float, inside: float, outside: float) -> BenchRow:
        return BenchRow(id=vid, backend="openvino" if vid != "fp32" else "onnxruntime", precision="int8",
                        file="m.onnx", size_mb=1.0, gate_passed=True, gate_metrics={"mean_dice": 0.93},
                        gate_failures=(), execution_precision="", latency_ms_median=patch_ms,
                        latency_ms_p95=patch_ms, throughput_per_s=1000 / patch_ms, full_volume_ms=inside + outside,
                        full_volume_inference_ms=inside, full_volume_outside_ms=outside, full_volume_patches=8)

    doc = summarise(spec, [row("fp32", 400.0, 3200.0, 100.0), row("ov-int8", 50.0, 400.0, 100.0)],
                    "test host", 2, 10, 2, "x86-vnni")
    # no default-ORT row measured: the agent's FP32 is the baseline; the x86-vnni CT goal is 6.0x
    assert doc.target.fastest == "ov-int8" and doc.target.speedup == 6.6 and doc.target.met
    assert doc.target.goal_speedup == 6.0 and doc.target.baseline == "fp32"
    # on an AVX2 host the same figures meet its 4.5x goal; where no goal is set, none is claimed
    avx2 = summarise(spec, [row("fp32", 400.0, 3200.0, 100.0), row("ov-int8", 50.0, 400.0, 100.0)],
                     "test host", 2, 10, 2, "x86-avx2").target
    assert avx2.goal_speedup == 4.5 and avx2.met
    assert summarise(spec, [row("fp32", 400.0, 3200.0, 100.0)], "test host", 2, 10, 2,
                     "arm-dotprod").target.met is None
    assert doc.variants[1].speedup_full_volume_inference == 8.0
    text = render_markdown(doc)
    assert "Inference alone is 8.0x faster than FP32's" in text
    assert "limits the full-volume speed-up to at most 33.0x" in text
