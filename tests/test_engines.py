"""Engine choice and the guarded job path, for real: a registry built by `edge-deploy build`, installed
by the pull client, variants self-tested and timed in a spawned inference worker with real ONNX
Runtime / OpenVINO sessions, jobs on synthetic MR DICOM. Faults come from the runner's test-only
fault injection (NaN outputs, a raising backend, plausible-but-wrong outputs), aimed at one variant
or one version. Nothing is mocked (no GPU is involved).

The model is a small conv classifier written here (three 3x3 convolutions at 112x112): big enough
that INT8 on this VNNI CPU is several times faster than FP32, so the measured choice is not a coin
toss; the reference mr-brain-cls is so small that FP32 ties with INT8 here (docs/engines.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.core.config import Config
from agent.core.errors import ActivationError
from agent.core.manifest import parse_manifest
from agent.core.status import ModelSummary
from agent.core.types import Event, Instance, Series
from agent.inference.runner import FAULT_ENV, InferenceRunner, JobOutcome
from agent.updates.client import RegistryClient
from agent.updates.store import ModelStore
from agent.variants import VariantManager

REPO = Path(__file__).resolve().parents[1]
MODEL = "conv-cls"
INT8_X86 = {"ort-int8-u8s8", "ort-int8-u8s8-rr", "ov-int8"}


def make_conv_classifier(path: Path) -> None:
    """Conv(1->32, stride 2) -> Conv(32->64) -> Conv(64->64), ReLU, global pool, Gemm to 4 classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def conv_w(co: int, ci: int) -> np.ndarray:
        return (rng.standard_normal((co, ci, 3, 3)) * np.sqrt(2.0 / (ci * 9))).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("W1", conv_w(32, 1)), ("B1", np.zeros(32, np.float32)), ("W2", conv_w(64, 32)),
        ("B2", np.zeros(64, np.float32)), ("W3", conv_w(64, 64)), ("B3", np.zeros(64, np.float32)),
        ("G", (rng.standard_normal((4, 64)) * 2).astype(np.float32)), ("GB", np.zeros(4, np.float32)))]
    conv = {"pads": [1] * 4, "kernel_shape": [3, 3]}
    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], strides=[2, 2], **conv),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], **conv),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3", "B3"], ["c3"], **conv),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "G", "GB"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "convcls",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@dataclass(frozen=True)
class Registry:
    url: str
    public_key: Path
    model_dir: Path  # models.dir-style folder of the model (model.toml + FP32 model.onnx)
    series: tuple[Series, ...]  # MR series the model takes
    build: Path  # the gated build folder 1.0.0 was published from
    key: Path  # the signing key


def _mr_series(folder: Path, seed: int) -> Series:
    from deploy.synth import make_mr_slice, write_mr_series

    out = write_mr_series(make_mr_slice(seed, difficulty="obvious"), folder)
    path = out / "IM0001.dcm"
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    inst = Instance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                    path, "1.2.840.10008.1.2.1", "MR", 0.0, path.stat().st_size, instance_number=1)
    return Series(inst.study_uid, inst.series_uid, "MR", (inst,))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """conv-cls 1.0.0 built and published by the real toolkit, plus 2.0.0 published from the same
    gated build (only the version differs) for the rollback test."""
    from deploy.cli import main as deploy_main
    from deploy.publish import publish_build

    root = tmp_path_factory.mktemp("engines")
    model_dir = root / "models" / MODEL
    model_dir.mkdir(parents=True)
    make_conv_classifier(model_dir / "model.onnx")
    toml = (REPO / "models/mr-brain-cls/model.toml").read_text().replace('name = "mr-brain-cls"', f'name = "{MODEL}"')
    toml = re.sub(r'(?m)^version = ".*"$', 'version = "1.0.0"', toml)  # whatever the real model's version
    (model_dir / "model.toml").write_text(toml)
    assert deploy_main(["keygen", "--out", str(root / "keys")]) == 0
    reg, build = root / "registry", root / "build"
    assert deploy_main(["build", str(model_dir), "--key", str(root / "keys/signing.key"), "--out", str(reg),
                        "--build", str(build), "--samples", "16", "--val-n", "40", "--skip-bench",
                        "--variants", "fp32,ort-int8-u8s8,ort-int8-u8s8-rr,ort-int8-s8s8,ov-int8"]) == 0
    build2 = root / "build2"
    shutil.copytree(build, build2)
    (build2 / "model.toml").write_text((build2 / "model.toml").read_text().replace('version = "1.0.0"',
                                                                                  'version = "2.0.0"'))
    publish_build(build2, reg, root / "keys/signing.key")
    series = tuple(_mr_series(root / f"mr{i}", 9100 + i) for i in range(3))
    return Registry(reg.as_uri(), root / "keys/signing.pub", model_dir, series, build, root / "keys/signing.key")


@pytest.fixture(scope="module")
def runner():
    """One warm worker for the module, with the test-only fault injection."""
    r = InferenceRunner(Path("models"), threads=2, job_timeout_s=120, fault_injection=True)
    assert r.start()
    yield r
    r.stop()


def make_cfg(state: Path, models_dir: Path | None = None, **engines: object) -> Config:
    return Config.model_validate({"storage": {"dir": str(state)},
                                  "models": {"dir": str(models_dir or state / "no-models")},
                                  "pipeline": {"threads": 2}, "engines": engines})


def install(reg: Registry, state: Path, version: str) -> ModelStore:
    """Pull ``version`` with the real client (signature, digests) and make it current."""
    client = RegistryClient(reg.url, [reg.public_key], state)
    manifest = client.fetch_manifest(MODEL, version)
    client.install(MODEL, version, client.select_variants(manifest))
    store = ModelStore(state)
    if store.current_version(MODEL) != version:
        store.activate(MODEL, version)
    return store


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch):
    def set_fault(value: str) -> None:
        monkeypatch.setenv(FAULT_ENV, value)
    return set_fault


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def run(mgr: VariantManager, runner: InferenceRunner, series: Series, job_id: str = "job") -> JobOutcome:
    outcome = mgr.run_job(job_id, series, MODEL, runner.submit)
    assert outcome.ok, f"{outcome.kind}: {outcome.error}"
    assert outcome.prediction is not None
    return outcome


# ------------------------------------------------------------------------------------------ tests


def test_activation_measures_picks_int8_and_a_restart_reuses_the_choice(
        registry: Registry, runner: InferenceRunner, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = install(registry, tmp_path, "1.0.0")
    events: list[Event] = []
    cfg = make_cfg(tmp_path)
    mgr = VariantManager(cfg, store, cfg.db_path, events.append, runner=runner)
    act = mgr.activate(MODEL, "1.0.0", correlation_id="c-1")

    results = {t.id: t for t in act.results}
    assert act.measured and act.variant in INT8_X86, act.reason
    assert act.precision == "int8"
    assert results["fp32"].passed and results[act.variant].passed
    assert results[act.variant].latency_ms is not None and results["fp32"].latency_ms is not None
    assert not results["ort-int8-s8s8"].tried and "aarch64" in results["ort-int8-s8s8"].error
    # this host built the registry: each variant's verdict for this host's family is native, and the
    # device follows it (a refusal is never tried; a pass needs no device gate). Which way u8s8 goes
    # depends on the family (its sums saturate without VNNI) and the model; never assume the family.
    family = mgr.probe.cpu.isa_family
    manifest = parse_manifest(store.installed(MODEL, "1.0.0").manifest_path.read_bytes())  # type: ignore[union-attr]
    for vid in ("ort-int8-u8s8", "ort-int8-u8s8-rr", "ov-int8"):
        verdict, trial = manifest.variant(vid).isa_gates[family], results[vid]
        assert verdict.method == "native", (vid, verdict)
        if verdict.passed:
            assert trial.passed and trial.proof == f"passed the publisher's gate on {family} (native)", trial
        else:
            assert not trial.tried and trial.error.startswith(f"failed the publisher's gate on {family}"), trial
    assert not [e for e in events if e.kind.startswith("engine.device_gate")]  # nothing left to prove here
    assert f"accuracy: passed the publisher's gate on {family}" in act.reason
    activated = [e for e in events if e.kind == "engine.activated"]
    assert activated and activated[0].fields["correlation_id"] == "c-1"
    # cmd/selftest: the tried variants again, now; all pass, the event carries the correlation id
    reports = mgr.selftest(MODEL, correlation_id="c-2")
    assert {r.variant for r in reports} == {t.id for t in act.results if t.tried}
    assert all(r.passed for r in reports)
    assert [e.fields["correlation_id"] for e in events if e.kind == "engine.selftest"] == ["c-2"]
    mgr.close()

    # a restart: same manifest, backends and hardware -> the stored choice, no trial run at all
    idle = InferenceRunner(Path("models"), threads=2, job_timeout_s=60)
    again = VariantManager(cfg, ModelStore(tmp_path), cfg.db_path, events.append, runner=idle)
    act2 = again.activate(MODEL, "1.0.0")
    assert not act2.measured and act2.variant == act.variant and act2.results == act.results
    assert idle.worker_pid is None  # nothing was loaded or timed
    # the job path runs the chosen variant and the result says so
    outcome = run(again, runner, registry.series[0])
    pred = outcome.prediction
    assert pred is not None and (pred.model.variant, pred.model.version) == (act.variant, "1.0.0")
    assert pred.model.precision.startswith("int8")
    # the job carried the manifest's drift edges: the series comes back summarised on them, and the
    # manager hands the service the profile of the version that ran
    assert manifest.drift is not None and len(manifest.drift.series) == manifest.drift.n_series > 0
    assert again.drift_profile(MODEL) == ("1.0.0", manifest.drift)
    assert outcome.summary is not None and outcome.summary.predicted_class in manifest.spec["labels"]
    assert len(outcome.summary.intensity_counts) == len(manifest.drift.intensity.edges) - 1
    assert len(outcome.summary.input_counts) == len(manifest.drift.model_input.edges) - 1
    assert again.shadow_agreement(MODEL) is None  # no shadow comparison yet
    again.close()

    # a different hardware/backend fingerprint (here: the thread count) is measured afresh
    cfg1 = make_cfg(tmp_path)
    cfg1.pipeline.threads = 1
    other = VariantManager(cfg1, ModelStore(tmp_path), cfg1.db_path, events.append, runner=runner)
    assert other.activate(MODEL, "1.0.0").measured
    other.close()

    # edge-agent models --json shows every variant as measured here and the active one with its reason
    (tmp_path / "agent.toml").write_text(f'[storage]\ndir = "{tmp_path}"\n[models]\ndir = "{tmp_path / "none"}"\n'
                                         '[pipeline]\nthreads = 2\n')
    from agent.cli import main

    assert main(["models", "--config", str(tmp_path / "agent.toml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (m,) = doc["models"]
    assert (m["name"], m["version"], m["source"]) == (MODEL, "1.0.0", "registry")
    assert m["active"]["variant"] == act.variant and "fastest passing" in m["active"]["reason"]
    by_id = {v["id"]: v for v in m["variants"]}
    assert by_id["fp32"]["passed"] and by_id["fp32"]["latency_ms"] > 0
    assert by_id["ort-int8-s8s8"]["tried"] is False
    # the documented JSON (docs/engines.md; printed with sorted keys): every key, the same omissions
    assert set(m) == {"name", "source", "version", "previous", "versions", "task", "manifest_sha256",
                      "choice_key", "active", "jobs", "variants", "guard"}
    assert set(m["active"]) == {"variant", "backend", "precision", "reason", "chosen", "measured_at"}
    assert set(by_id["fp32"]) == {"id", "backend", "precision", "installed", "priority", "fast_on", "targets",
                                  "tried", "passed", "error", "max_abs_err", "latency_ms", "load_ms",
                                  "measured_precision", "proof"}
    assert m["previous"] is None and m["versions"] == ["1.0.0"] and m["jobs"] == {"ok": 1, "failed": 0}
    assert m["guard"] == {}  # counters live in the daemon's jobs only
    assert main(["models", "--config", str(tmp_path / "agent.toml")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{MODEL} 1.0.0 (registry): {act.variant} [") and "\n  why: fastest passing" in text


def _republish(reg: Registry, version: str, change: dict[str, object]) -> Path:
    """Publish the gated build again as ``version``, then apply ``change`` ({variant id: callable
    taking (version folder, manifest entry)}) to the published files and manifest and sign the
    result with the registry's key: what a publisher whose gate was wrong would ship."""
    from agent.core.manifest import canonical_json
    from agent.core.util import sha256_bytes
    from deploy.publish import publish_build, update_index
    from deploy.sign import load_private_key, public_pem, sign

    copy = reg.build.parent / f"build-{version}"
    shutil.copytree(reg.build, copy)
    (copy / "model.toml").write_text((copy / "model.toml").read_text().replace('version = "1.0.0"',
                                                                              f'version = "{version}"'))
    registry = Path(reg.url.removeprefix("file://"))
    publish_build(copy, registry, reg.key)
    vdir = registry / MODEL / version
    doc = json.loads((vdir / "manifest.json").read_text())
    for entry in doc["variants"]:
        if entry["id"] in change:
            change[entry["id"]](vdir, entry)  # type: ignore[operator]
    key = load_private_key(reg.key)
    raw = canonical_json(doc)
    (vdir / "manifest.json").write_bytes(raw)
    (vdir / "manifest.json.sig").write_bytes(sign(key, raw))
    update_index(registry, key, public_pem(key), MODEL, version, sha256_bytes(raw), doc["created_at"],
                 [v["id"] for v in doc["variants"]])
    return vdir


def _unproven(vdir: Path, entry: dict) -> None:
    """The manifest no longer says how the variant did on any family: the device must gate it."""
    entry["isa_gates"] = {}


def _wrong_but_self_consistent(vdir: Path, entry: dict) -> None:
    """Replace the variant's graph by one whose classes come out rotated (a variant that computes
    something else on this device), with a self-test vector recorded from that graph, so only an
    accuracy check can tell; and drop its per-family verdicts so the device gate runs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from agent.core.util import sha256_file

    path = vdir / entry["file"]
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    model.graph.initializer.append(helper.make_tensor("rotate", TensorProto.INT64, [4], [1, 2, 3, 0]))
    model.graph.node.append(helper.make_node("Gather", [f"{out}_raw", "rotate"], [out], axis=1))
    onnx.save(model, str(path))
    npz = vdir / entry["selftest"]["file"]
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays["expected"] = sess.run(None, {sess.get_inputs()[0].name: arrays["input"]})[0].astype(arrays["expected"].dtype)
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
    entry.update(sha256=sha256_file(path), size=path.stat().st_size, isa_gates={})
    entry["selftest"].update(sha256=sha256_file(npz), size=npz.stat().st_size)


def test_device_gate_refuses_a_variant_wrong_on_this_device_and_proves_an_unproven_one(
        registry: Registry, runner: InferenceRunner, tmp_path: Path) -> None:
    """A signed manifest whose INT8 variant computes something else than FP32 on this CPU (its
    self-test recorded from that same graph, so the self-test passes) and no verdict for this
    family: the device's own gate on the validation set refuses it at activation, with its figures,
    and FP32 stays. A correct variant without a verdict for this family is gated and proven."""
    version = "3.0.0"
    _republish(registry, version, {"ort-int8-u8s8-rr": _wrong_but_self_consistent, "ov-int8": _unproven})
    store = install(registry, tmp_path, version)
    assert (store.installed(MODEL, version).path / "validation" / "set.npz").is_file()  # type: ignore[union-attr]
    events: list[Event] = []
    cfg = make_cfg(tmp_path)
    mgr = VariantManager(cfg, store, cfg.db_path, events.append, runner=runner)
    act = mgr.activate(MODEL, version)
    results = {t.id: t for t in act.results}
    family = mgr.probe.cpu.isa_family

    wrong = results["ort-int8-u8s8-rr"]
    assert wrong.tried and not wrong.passed, wrong
    assert wrong.error.startswith("device accuracy gate: accuracy ") and "vs FP32" in wrong.error, wrong.error
    assert "recall drop" in wrong.error
    assert act.variant != "ort-int8-u8s8-rr" and results["fp32"].passed
    proven = results["ov-int8"]
    assert proven.passed and proven.proof.startswith(f"device accuracy gate on {family}: accuracy"), proven
    gate_events = {e.fields["variant"]: e for e in events if e.kind == "engine.device_gate"}
    assert set(gate_events) == {"ort-int8-u8s8-rr", "ov-int8"}
    assert gate_events["ort-int8-u8s8-rr"].fields["passed"] is False
    assert gate_events["ort-int8-u8s8-rr"].severity == "warning"
    assert "accuracy" in gate_events["ort-int8-u8s8-rr"].fields["result"]
    assert gate_events["ov-int8"].fields["passed"] is True
    assert "engine.device_gate_started" in kinds(events)
    # the refusal is remembered with the choice: a restart does not run the gate again
    again = VariantManager(cfg, ModelStore(tmp_path), cfg.db_path, events.append,
                          runner=InferenceRunner(Path("models"), threads=2, job_timeout_s=60))
    act2 = again.activate(MODEL, version)
    assert not act2.measured and {t.id: t for t in act2.results}["ort-int8-u8s8-rr"].error == wrong.error
    again.close()
    mgr.close()


def test_failing_variant_falls_back_to_fp32_then_is_demoted(
        registry: Registry, runner: InferenceRunner, tmp_path: Path, fault) -> None:
    store = install(registry, tmp_path, "1.0.0")
    events: list[Event] = []
    cfg = make_cfg(tmp_path, max_consecutive_failures=2, shadow_every=0)
    mgr = VariantManager(cfg, store, cfg.db_path, events.append, runner=runner)
    chosen = mgr.activate(MODEL, "1.0.0").variant

    fault(f"nan@{chosen}")  # the chosen variant returns NaN; FP32 is untouched
    first = run(mgr, runner, registry.series[0], "job-nan").prediction
    assert first is not None and (first.model.variant, first.model.backend, first.model.precision) == \
        ("fp32", "onnxruntime", "fp32")
    fallback = [e for e in events if e.kind == "engine.fallback"]
    assert len(fallback) == 1 and "non-finite" in fallback[0].message and fallback[0].fields["variant"] == chosen
    assert "engine.demoted" not in kinds(events)

    fault(f"raise@{chosen}")  # now it raises: second consecutive failure -> demoted
    second = run(mgr, runner, registry.series[1], "job-raise").prediction
    assert second is not None and second.model.variant == "fp32"
    assert kinds(events).count("engine.fallback") == 2
    demoted = [e for e in events if e.kind == "engine.demoted"]
    assert len(demoted) == 1 and demoted[0].fields["variant"] == chosen

    # demoted until the next update: FP32 is the primary now, also for a fresh manager (restart)
    fault("")
    assert mgr.plan(MODEL).primary.variant == "fp32"
    restarted = VariantManager(cfg, ModelStore(tmp_path), cfg.db_path, events.append, runner=runner)
    assert restarted.plan(MODEL).primary.variant == "fp32"
    (desc,) = restarted.describe()
    assert desc.active is not None and desc.active.variant == "fp32" and "demoted" in desc.active.reason
    assert desc.active.chosen == chosen
    (row,) = [v for v in desc.variants if v.id == chosen]
    assert row.demoted and list(row.to_json())[-1] == "demoted"
    mgr.close()
    restarted.close()


def test_shadow_validation_demotes_a_variant_that_disagrees_with_fp32(
        registry: Registry, runner: InferenceRunner, tmp_path: Path, fault) -> None:
    store = install(registry, tmp_path, "1.0.0")
    events: list[Event] = []
    cfg = make_cfg(tmp_path, shadow_every=1, shadow_min_samples=2, shadow_window=10)
    mgr = VariantManager(cfg, store, cfg.db_path, events.append, runner=runner)
    chosen = mgr.activate(MODEL, "1.0.0").variant

    # an honest variant agrees with FP32 on every shadowed job
    agree = run(mgr, runner, registry.series[0], "job-agree")
    stats = mgr.guard.stats(MODEL)
    assert stats is not None and stats.shadow_agreement == 1.0
    assert mgr.shadow_agreement(MODEL) == 1.0
    assert agree.shadow is not None and agree.summary is not None  # the primary's summary, shadow or not
    assert mgr.describe()[0].to_json()["guard"] == {"variant": f"1.0.0/{chosen}", "jobs": 1,
                                                     "consecutive_failures": 0, "shadow_comparisons": 1,
                                                     "shadow_agreement": 1.0}

    fault(f"disagree@{chosen}")  # finite, plausible, wrong: only the shadow comparison can tell
    outcomes = [run(mgr, runner, s, f"job-{i}") for i, s in enumerate(registry.series)]
    # until demotion the variant's own result is published (it is not a failure); then FP32 runs
    assert outcomes[0].prediction is not None and outcomes[0].prediction.model.variant == chosen
    alerts = [e for e in events if e.kind == "engine.shadow_disagreement"]
    assert len(alerts) == 1 and alerts[0].severity == "error" and alerts[0].fields["variant"] == chosen
    assert mgr.plan(MODEL).primary.variant == "fp32"
    last = outcomes[-1].prediction
    assert last is not None and last.model.variant == "fp32"
    mgr.close()


def test_new_version_whose_first_jobs_fail_is_rolled_back(
        registry: Registry, runner: InferenceRunner, tmp_path: Path, fault) -> None:
    install(registry, tmp_path, "1.0.0")
    store = install(registry, tmp_path, "2.0.0")
    assert (store.current_version(MODEL), store.previous_version(MODEL)) == ("2.0.0", "1.0.0")
    events: list[Event] = []
    cfg = make_cfg(tmp_path, rollback_after_failures=2, shadow_every=0)
    mgr = VariantManager(cfg, store, cfg.db_path, events.append, runner=runner)
    mgr.activate(MODEL, "1.0.0")
    mgr.activate(MODEL, "2.0.0")

    fault("raise@2.0.0")  # every variant of 2.0.0 raises, FP32 included; 1.0.0 is fine
    first = mgr.run_job("job-1", registry.series[0], MODEL, runner.submit)
    assert not first.ok and first.failure == "model"  # the service retries it (max_attempts)
    assert store.current_version(MODEL) == "2.0.0" and "engine.rolled_back" not in kinds(events)

    second = run(mgr, runner, registry.series[1], "job-2")  # second failure -> rollback -> re-run on 1.0.0
    assert second.prediction is not None and second.prediction.model.version == "1.0.0"
    assert (store.current_version(MODEL), store.previous_version(MODEL)) == ("1.0.0", "2.0.0")
    rolled = [e for e in events if e.kind == "engine.rolled_back"]
    assert len(rolled) == 1 and rolled[0].fields == {**rolled[0].fields, "from_version": "2.0.0",
                                                     "to_version": "1.0.0"}
    mgr.close()


def test_version_whose_fp32_fails_its_self_test_is_not_activated(
        registry: Registry, runner: InferenceRunner, tmp_path: Path) -> None:
    store = install(registry, tmp_path, "1.0.0")
    fp32 = store.version_dir(MODEL, "1.0.0") / "model.fp32.onnx"
    data = bytearray(fp32.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged on disk after install
    os.chmod(fp32, 0o644)
    fp32.write_bytes(bytes(data))
    events: list[Event] = []
    cfg = make_cfg(tmp_path)
    mgr = VariantManager(cfg, store, cfg.db_path, events.append, runner=runner)
    with pytest.raises(ActivationError, match="FP32 fallback 'fp32' failed its self-test.*sha256"):
        mgr.activate(MODEL, "1.0.0", correlation_id="c-9")
    failed = [e for e in events if e.kind == "engine.activation_failed"]
    assert failed and failed[0].fields["correlation_id"] == "c-9"
    assert store.current_version(MODEL) == "1.0.0"  # activate never switches versions itself
    mgr.close()


def test_without_a_registry_model_the_models_dir_fp32_runs(
        registry: Registry, runner: InferenceRunner, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, models_dir=registry.model_dir.parent)
    mgr = VariantManager(cfg, ModelStore(tmp_path), cfg.db_path, lambda _e: None, runner=runner)
    (desc,) = mgr.describe()
    assert desc.to_json() == {
        "name": MODEL, "source": "models.dir", "version": "1.0.0", "task": "classification",
        "path": str(registry.model_dir / "model.onnx"),
        "active": {"variant": "fp32", "backend": "onnxruntime", "precision": "fp32",
                   "reason": "no registry model installed: running the FP32 ONNX from models.dir"},
        "variants": []}
    pred = run(mgr, runner, registry.series[0]).prediction
    assert pred is not None and (pred.model.variant, pred.model.backend, pred.model.version) == \
        ("fp32", "onnxruntime", "1.0.0")
    assert mgr.summary() == [ModelSummary(name=MODEL, version="1.0.0", variant="fp32", backend="onnxruntime",
                                          precision="fp32", accuracy="", source="models.dir")]
    assert [m.to_json() for m in mgr.summary()] == [{"name": MODEL, "version": "1.0.0", "variant": "fp32",
                                                     "backend": "onnxruntime", "precision": "fp32", "accuracy": "",
                                                     "source": "models.dir"}]
    mgr.close()


def test_a_models_dir_model_takes_its_drift_profile_from_drift_json(
        registry: Registry, runner: InferenceRunner, tmp_path: Path) -> None:
    from agent.core.manifest import DriftProfile

    models = tmp_path / "models"
    shutil.copytree(registry.model_dir, models / MODEL)
    cfg = make_cfg(tmp_path, models_dir=models)
    mgr = VariantManager(cfg, ModelStore(tmp_path), cfg.db_path, lambda _e: None, runner=runner)
    assert mgr.drift_profile(MODEL) is None and mgr.shadow_agreement(MODEL) is None
    assert run(mgr, runner, registry.series[0]).summary is None  # no profile: nothing to bin on

    # the build's profile (calibrate's, per-series summaries included) beside model.onnx
    shutil.copy(registry.build / "drift.json", models / MODEL / "drift.json")
    profile = DriftProfile.model_validate_json((models / MODEL / "drift.json").read_bytes())
    assert mgr.drift_profile(MODEL) == ("1.0.0", profile)  # read afresh: no restart needed
    outcome = run(mgr, runner, registry.series[1])
    assert outcome.summary is not None and len(outcome.summary.intensity_counts) == len(profile.intensity.edges) - 1
    assert outcome.summary.numeric["n_slices"] == 1.0 and outcome.summary.entropy is not None

    (models / MODEL / "drift.json").write_text("{not json")  # a broken file: no profile, jobs unharmed
    assert mgr.drift_profile(MODEL) is None
    assert run(mgr, runner, registry.series[2]).summary is None
    mgr.close()


def test_the_daemon_runs_the_chosen_variant_and_says_so(registry: Registry, tmp_path: Path, mosquitto) -> None:
    """`edge-agent run` with a registry model installed and no models.dir: the birth message and
    the result name the measured variant (DICOM in over C-STORE, results out over MQTT)."""
    from conftest import AgentProcess, ResultCollector, storescu

    from agent.mqtt.payloads import parse_result

    agent = AgentProcess(tmp_path, mosquitto.port, stable_age_s=0.5,
                         extra_toml="")
    agent.config.write_text(agent.config.read_text().replace(f'dir = "{REPO / "models"}"',
                                                             f'dir = "{tmp_path / "no-models"}"'))
    install(registry, agent.state, "1.0.0")
    status = ResultCollector(mosquitto.port, "edge/+/status")
    results = ResultCollector(mosquitto.port, "edge/+/results")
    agent.start(timeout=120)  # activation measures the variants before the listener opens
    try:
        series = registry.series[0]
        assert storescu(agent.dicom_port, [series.instances[0].path]).returncode == 0
        results.wait_for(1, timeout=90)  # after activation: the status was published again by then
        status.wait_for(2, timeout=10)
    finally:
        agent.stop()
        results.close()
        status.close()
    doc = parse_result(results.messages[0][1])
    # the newest online status: published again once activation ended
    birth = [d for d in (json.loads(p) for _t, p in status.messages) if d["state"] == "online"][-1]
    (model,) = [m for m in birth["models"] if m["name"] == MODEL]
    assert model["variant"] in INT8_X86 and model["version"] == "1.0.0", agent.log_text()[-2000:]
    assert doc["model"]["variant"] == model["variant"] and doc["model"]["version"] == "1.0.0"
    assert doc["model"]["precision"].startswith("int8")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
