"""The inference worker process, for real: spawned workers, real jobs, and faults the worker really
commits (os._exit, SIGSEGV, a hang that ignores SIGTERM, MemoryError under RLIMIT_AS, NaN outputs)
through the test-only fault-injection hook. Workers are reused across tests: a spawn costs ~1 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import write_ct_series, write_model_dir

from agent.core.types import ClassificationOutput, Instance, SegmentationOutput, Series
from agent.inference.runner import (
    FAULT_ENV,
    InferenceJob,
    InferenceRunner,
    JobOutcome,
    ModelFile,
    SeriesLimits,
)

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 1.0
MEMORY_MB = 1024  # the worker peaks at ~0.4 GB of address space on these tiny models


def series_of(paths: list[Path]) -> Series:
    instances = tuple(
        Instance(
            f"2.25.{i}",
            "1.2.840.10008.5.1.4.1.1.2",
            "2.25.1",
            "2.25.2",
            p,
            "1.2.840.10008.1.2.1",
            "CT",
            0.0,
            p.stat().st_size,
            instance_number=i + 1,
        )
        for i, p in enumerate(paths)
    )
    return Series("2.25.1", "2.25.2", "CT", instances)


@dataclass(frozen=True)
class Env:
    models: Path  # the models folder
    seg: Path  # tiny-seg model folder
    cls: Path  # tiny-cls model folder
    series: Series  # 6 CT slices


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("runner")
    models = root / "models"
    return Env(
        models=models,
        seg=write_model_dir(models, "seg"),
        cls=write_model_dir(models, "cls"),
        series=series_of(write_ct_series(root / "ct")),
    )


def seg_job(env: Env, job_id: str = "job-seg", **changes: Any) -> InferenceJob:
    """A job for the tiny segmentation model on the test series, with ``changes`` applied."""
    job = InferenceJob(job_id, env.series, "tiny-seg", env.seg, env.seg / "model.onnx")
    return replace(job, **changes)


@pytest.fixture(scope="module")
def runner(env: Env):
    """One warm runner shared by the tests below, with fault injection and a memory limit."""
    r = InferenceRunner(
        env.models,
        threads=1,
        job_timeout_s=60,
        memory_limit_mb=MEMORY_MB,
        fault_injection=True,
        kill_grace_s=GRACE_S,
    )
    assert r.start()
    yield r
    r.stop()


def assert_ok(outcome: JobOutcome) -> None:
    assert outcome.ok, f"{outcome.kind}: {outcome.error}"


def test_parent_process_does_not_import_inference_engines() -> None:
    code = textwrap.dedent(
        """
        import sys
        import agent.inference
        from agent.inference import catalog
        from agent.inference.runner import InferenceRunner
        catalog.available_backends()  # imports the backend modules, not their packages
        InferenceRunner("models", threads=1, job_timeout_s=1)
        heavy = {"onnxruntime", "openvino", "tensorrt", "scipy", "agent.imaging", "agent.inference.pipeline"}
        print(sorted(heavy & set(sys.modules)))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_jobs_run_in_a_warm_worker(runner: InferenceRunner, env: Env) -> None:
    pid = runner.worker_pid
    assert pid is not None
    seg = runner.submit(seg_job(env))
    assert_ok(seg)
    assert seg.prediction is not None and isinstance(seg.prediction.outputs, SegmentationOutput)
    assert seg.prediction.outputs.labels["liver"].voxels > 0
    model = seg.prediction.model
    assert (model.name, model.version, model.variant, model.backend, model.precision) == (
        "tiny-seg",
        "0.0.1",
        "fp32",
        "onnxruntime",
        "fp32",
    )
    assert set(seg.prediction.timings_ms) == {"load", "preprocess", "inference", "postprocess"}
    assert seg.summary is None  # the job carried no drift edges

    cls = runner.submit(InferenceJob("job-cls", env.series, "tiny-cls", env.cls, env.cls / "model.onnx"))
    assert_ok(cls)
    assert cls.prediction is not None and isinstance(cls.prediction.outputs, ClassificationOutput)
    assert_ok(runner.submit(seg_job(env)))  # the cached model again
    assert runner.worker_pid == pid  # same process throughout


def test_job_errors_keep_the_worker(runner: InferenceRunner, env: Env, tmp_path: Path) -> None:
    pid = runner.worker_pid
    missing = runner.submit(seg_job(env, variant_file=tmp_path / "nope.onnx"))
    assert missing.kind == "error" and "model file missing" in missing.error
    wrong = runner.submit(seg_job(env, model_name="other-model"))
    assert wrong.kind == "error" and "declares model 'tiny-seg'" in wrong.error
    assert runner.worker_pid == pid


def test_nan_outputs_are_an_error(runner: InferenceRunner, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    pid = runner.worker_pid
    monkeypatch.setenv(FAULT_ENV, "nan")
    outcome = runner.submit(seg_job(env))
    assert outcome.kind == "error" and "non-finite" in outcome.error
    assert runner.worker_pid == pid


@pytest.mark.parametrize(("fault", "reason"), [("crash", "exit code 70"), ("segv", "signal SIGSEGV")])
def test_a_crashing_worker_is_replaced(
    runner: InferenceRunner, env: Env, monkeypatch: pytest.MonkeyPatch, fault: str, reason: str
) -> None:
    assert_ok(runner.submit(seg_job(env)))
    pid = runner.worker_pid
    monkeypatch.setenv(FAULT_ENV, fault)
    outcome = runner.submit(seg_job(env))
    assert outcome.kind == "crash" and reason in outcome.error, outcome
    assert outcome.failure == "model"  # a crash by a signal other than SIGKILL may be the model's
    monkeypatch.delenv(FAULT_ENV)
    assert_ok(runner.submit(seg_job(env)))  # a fresh worker
    assert runner.worker_pid not in (None, pid)


def test_a_worker_that_died_while_idle_is_replaced(runner: InferenceRunner, env: Env) -> None:
    pid = runner.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the kernel OOM killer does
    deadline = time.monotonic() + 5
    while runner.worker_pid is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_ok(runner.submit(seg_job(env)))
    assert runner.worker_pid not in (None, pid)


def test_a_hanging_job_times_out(runner: InferenceRunner, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_ok(runner.submit(seg_job(env)))  # warm: the timeout is spent on the hang, not on loading
    monkeypatch.setattr(runner, "job_timeout_s", 2.0)
    monkeypatch.setenv(FAULT_ENV, "hang")
    t0 = time.monotonic()
    outcome = runner.submit(seg_job(env))
    elapsed = time.monotonic() - t0
    assert outcome.kind == "timeout" and "SIGKILL" in outcome.error, outcome  # the hang ignores SIGTERM
    assert outcome.failure == "resource"  # the budget ran out: never blamed on the model
    assert 2.0 <= elapsed < 2.0 + 2 * GRACE_S + 1.0
    monkeypatch.delenv(FAULT_ENV)
    assert_ok(runner.submit(seg_job(env)))


def test_a_per_job_budget_overrides_the_default_timeout(
    runner: InferenceRunner, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_ok(runner.submit(seg_job(env)))
    monkeypatch.setenv(FAULT_ENV, "hang")
    t0 = time.monotonic()
    outcome = runner.submit(seg_job(env), timeout_s=1.5)  # runner.job_timeout_s is 60
    assert outcome.kind == "timeout" and "1.5 s" in outcome.error, outcome
    assert time.monotonic() - t0 < 1.5 + 2 * GRACE_S + 1.0
    monkeypatch.delenv(FAULT_ENV)


def test_a_series_over_a_size_limit_is_refused_before_decoding(runner: InferenceRunner, env: Env) -> None:
    assert_ok(runner.submit(seg_job(env, limits=SeriesLimits(max_instances=1000, max_rows=4096,
                                                                  max_columns=4096, max_frames=1000))))
    pid = runner.worker_pid
    n = len(env.series.instances)
    for limits, key in ((SeriesLimits(max_instances=n - 1), "series_limits.max_instances"),
                        (SeriesLimits(max_rows=8), "series_limits.max_rows"),
                        (SeriesLimits(max_columns=8), "series_limits.max_columns"),
                        (SeriesLimits(max_frames=n - 1), "series_limits.max_frames")):
        outcome = runner.submit(seg_job(env, limits=limits))
        assert (outcome.kind, outcome.failure, outcome.limit) == ("refused", "input", key), outcome
    assert runner.worker_pid == pid  # a refusal costs the warm worker nothing


def test_compressed_pixels_over_the_configured_decode_limit_are_refused(
    runner: InferenceRunner, env: Env, tmp_path: Path
) -> None:
    from pydicom.uid import RLELossless
    from test_volume import axial_stack, write

    datasets, _ = axial_stack(n=2, shape=(1024, 1024), slope=1.0, intercept=-1024.0)  # 2 MiB per slice
    for ds in datasets:
        ds.compress(RLELossless)
    series = series_of(write(tmp_path, datasets))
    outcome = runner.submit(seg_job(env, series=series, limits=SeriesLimits(max_decompressed_mb=1,
                                                                           max_decompression_ratio=100.0)))
    assert (outcome.kind, outcome.failure, outcome.limit) == ("refused", "input", "dicom.limits.max_decompressed_mb")
    assert "max_decompressed_mb" in outcome.error


def test_out_of_memory_under_the_limit(
    runner: InferenceRunner, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = runner.worker_pid
    monkeypatch.setenv(FAULT_ENV, "oom")  # allocates past RLIMIT_AS
    outcome = runner.submit(seg_job(env))
    assert outcome.kind == "oom" and f"limit {MEMORY_MB} MB" in outcome.error, outcome
    monkeypatch.delenv(FAULT_ENV)
    assert_ok(runner.submit(seg_job(env)))
    assert runner.worker_pid != pid  # recycled after hitting the ceiling


def test_fault_variable_is_ignored_without_fault_injection_and_stop(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "crash")
    r = InferenceRunner(env.models, threads=1, job_timeout_s=60, kill_grace_s=GRACE_S)
    try:
        assert_ok(r.submit(seg_job(env)))  # submit starts the worker when start() was not called
    finally:
        r.stop()
    r.stop()  # twice is fine
    after = r.submit(seg_job(env))
    assert after.kind == "cancelled" and r.worker_pid is None


def test_stop_during_a_job_cancels_it(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    r = InferenceRunner(
        env.models,
        threads=1,
        job_timeout_s=60,
        kill_grace_s=GRACE_S,
        fault_injection=True,
    )
    r.start()
    monkeypatch.setenv(FAULT_ENV, "hang")
    outcomes: list[JobOutcome] = []
    t = threading.Thread(target=lambda: outcomes.append(r.submit(seg_job(env))))
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    r.stop()
    t.join(10)
    assert time.monotonic() - t0 < 2 * GRACE_S + 1.0
    assert outcomes and outcomes[0].kind == "cancelled", outcomes


def test_a_worker_that_cannot_start_is_reported(env: Env) -> None:
    r = InferenceRunner(
        env.models,
        threads=1,
        job_timeout_s=60,
        memory_limit_mb=60,
        kill_grace_s=GRACE_S,
    )
    try:
        assert r.start() is False  # logged, not raised: the service keeps receiving DICOM
        outcome = r.submit(seg_job(env))  # tries again, and says why it cannot run
        assert outcome.kind == "crash" and "memory_limit_mb=60 too low" in outcome.error, outcome
        assert r.worker_pid is None
    finally:
        r.stop()


ORPHAN_SCRIPT = """
import os, sys, threading, time
from pathlib import Path
from agent.inference.runner import InferenceJob, InferenceRunner
from agent.core.types import Instance, Series

model_dir, *paths = sys.argv[1:]
inst = tuple(Instance(f"2.25.{i}", "1.2.840.10008.5.1.4.1.1.2", "2.25.1", "2.25.2", Path(p),
                      "1.2.840.10008.1.2.1", "CT", 0.0, 0) for i, p in enumerate(paths))
job = InferenceJob("orphan", Series("2.25.1", "2.25.2", "CT", inst), "tiny-seg", Path(model_dir),
                   Path(model_dir) / "model.onnx")
if __name__ == "__main__":
    os.environ["EDGE_AGENT_FAULT"] = "hang"
    r = InferenceRunner("models", threads=1, job_timeout_s=600, fault_injection=True)
    r.start()
    print(r.worker_pid, flush=True)
    threading.Thread(target=r.submit, args=(job,), daemon=True).start()
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie waiting for init to reap it is gone too


def test_worker_exits_when_the_parent_is_killed(env: Env, tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    paths = [str(i.path) for i in env.series.instances]
    parent = subprocess.Popen(
        [sys.executable, str(script), str(env.seg), *paths], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # the job is hanging now
        assert _alive(worker)
    finally:
        parent.kill()  # SIGKILL: no atexit, no daemon-process cleanup
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "orphaned worker still running"


def test_prefetched_series_is_used_once_and_only_for_the_same_files(
    runner: InferenceRunner, env: Env, tmp_path: Path
) -> None:
    import shutil

    copies = []
    for inst in env.series.instances:
        copies.append(tmp_path / inst.path.name)
        shutil.copy(inst.path, copies[-1])
    series = series_of(copies)
    assert runner.prefetch(copies)
    for p in copies:
        p.write_bytes(b"gone")  # from here on only the worker's prefetched volume has the pixels
    first = runner.submit(seg_job(env, "job-prefetched", series=series))
    assert_ok(first)
    reference = runner.submit(seg_job(env, "job-reference"))
    assert reference.prediction is not None and first.prediction is not None
    assert first.prediction.outputs == reference.prediction.outputs  # same volume, same result
    again = runner.submit(seg_job(env, "job-after", series=series))  # the prefetch was used up
    assert again.kind == "error" and "not a readable DICOM file" in again.error

    # a prefetch of other files (an instance arrived meanwhile) is not used for this list
    for inst, p in zip(env.series.instances, copies, strict=True):
        shutil.copy(inst.path, p)
    assert runner.prefetch(copies[:-1])
    assert_ok(runner.submit(seg_job(env, "job-full-list", series=series)))  # loaded from disk
    # and a prefetch that fails is harmless: the job reports its own error, the worker stays
    pid = runner.worker_pid
    copies[0].write_bytes(b"not dicom")
    assert not runner.prefetch(copies)
    broken = runner.submit(seg_job(env, "job-broken", series=series))
    assert broken.kind == "error" and "not a readable DICOM file" in broken.error
    assert runner.worker_pid == pid


def test_a_job_with_drift_edges_returns_the_series_summary(runner: InferenceRunner, env: Env) -> None:
    import numpy as np

    from agent.core.drift import DriftEdges

    edges = DriftEdges(tuple(np.linspace(-500, 1900, 65)), tuple(np.linspace(-0.25, 1.25, 65)))
    outcome = runner.submit(seg_job(env, "job-drift", drift_edges=edges))
    assert_ok(outcome)
    s = outcome.summary
    assert s is not None and len(s.intensity_counts) == 64 and sum(s.input_counts) > 0
    assert s.numeric["n_slices"] == 6 and s.numeric["kvp"] == 120.0 and s.categorical["manufacturer"]
    assert s.label_fractions["liver"] > 0
    # the shadow run does not replace it, and a cls job gets its own kind of summary
    with_shadow = runner.submit(seg_job(env, "job-drift-shadow", drift_edges=edges,
                                        shadow=ModelFile(env.seg / "model.onnx", variant="fp32-shadow")))
    assert_ok(with_shadow)
    assert with_shadow.shadow is not None and with_shadow.shadow.agreement == 1.0
    assert with_shadow.summary == s
    cls = runner.submit(InferenceJob("job-drift-cls", env.series, "tiny-cls", env.cls, env.cls / "model.onnx",
                                     drift_edges=edges))
    assert_ok(cls)
    assert cls.summary is not None and cls.summary.predicted_class is not None and cls.summary.entropy is not None


def test_on_a_cuda_host_the_worker_watches_its_resident_memory_instead_of_its_address_space() -> None:
    """CUDA reserves tens of GB of address space, so RLIMIT_AS cannot be the worker's limit there:
    resident memory past the limit ends the worker with EXIT_MEMORY_LIMIT, which the runner reports
    as ``oom`` (the input's size, not the model)."""
    from agent.inference.worker import EXIT_MEMORY_LIMIT

    code = textwrap.dedent("""
        import resource, time
        from agent.inference.worker import _limit_memory
        _limit_memory(150 << 20, cuda=True, every_s=0.02)
        assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
        small = bytearray(50 << 20)       # under the limit: nothing happens
        time.sleep(0.3)
        print("survived", flush=True)
        big = bytearray(300 << 20)        # touched pages: resident
        time.sleep(5)
        print("not stopped", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_MEMORY_LIMIT, proc.stderr
    assert proc.stdout.split() == ["survived"]
    assert "worker.memory_limit" in proc.stderr
