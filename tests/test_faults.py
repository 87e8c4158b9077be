"""Faults that must not silently stop the pipeline, against the real agent process (issue 13):
real Mosquitto, DCMTK storescu, and SQLite faults made from another process or connection (a
write lock held past the busy timeout, triggers that abort writes). Each test checks what a
subscriber sees: every acknowledged series gets its result, the fault is published as an event,
and a loop that cannot recover ends the process with a non-zero status."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, AgentProcess, Mosquitto, ResultCollector, storescu
from test_e2e import CT_SEED, _mr_series, _results, _wait_results

from agent.mqtt.payloads import parse_event
from deploy.synth import make_ct_phantom, write_ct_series

pytestmark = pytest.mark.slow

#: the lock holder: BEGIN EXCLUSIVE on state.db from another process, for argv[2] seconds
HOLD_LOCK = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
"""

#: the agent with the test-only fault injection on (EDGE_AGENT_FAULT; the CLI never turns it on)
FAULTY_AGENT = """
import os, sys
from agent.core.config import load_config
from agent.core.log import setup_logging
from agent.service import Service
cfg = load_config(sys.argv[1])  # EDGE_AGENT_FAULT is not a configuration key (NOT_CONFIG_ENV)
setup_logging(cfg.logging.level, cfg.logging.format)
sys.exit(Service(cfg, fault_injection=True).run_forever())
"""


class FaultyAgent(AgentProcess):
    """The real agent process, started with fault injection (see FAULTY_AGENT)."""

    def start(self, timeout: float = 60.0) -> None:
        import socket

        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", FAULTY_AGENT, str(self.config)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(self.log_text()[-3000:])


def _agent(tmp_path: Path, broker: Mosquitto, pipeline: str = "", sections: str = "", *,
           stable_age_s: float = 1.0, cls: type[AgentProcess] = AgentProcess,
           env: dict[str, str] | None = None) -> AgentProcess:
    """The agent with extra ``[pipeline]`` keys and extra sections (TOML text)."""
    agent = cls(tmp_path, broker.port, stable_age_s=stable_age_s, env=env, extra_toml=sections)
    text = agent.config.read_text()
    agent.config.write_text(text.replace(f"stable_age_s = {stable_age_s}\n",
                                         f"stable_age_s = {stable_age_s}\n{pipeline}"))
    return agent


def _events(collector: ResultCollector) -> list[dict]:
    return [parse_event(p) for t, p in collector.messages if t.endswith("/events")]


def _wait_event(collector: ResultCollector, kind: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in _events(collector) if e["kind"] == kind]
        if found:
            return found
        time.sleep(0.2)
    return []


def _mr_files(tmp_path: Path, i: int) -> tuple[list[Path], str]:
    folder, truth = _mr_series(tmp_path, i)
    return sorted(folder.glob("*.dcm")), str(truth["series_uid"])


def _hold_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_write_lock_held_past_the_busy_timeout_stalls_then_every_series_gets_its_result(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    busy_s, hold_s = 2.0, 7.0  # held for ~3x the busy timeout
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = _agent(tmp_path, mosquitto, sections=f"[supervision]\ndb_busy_timeout_s = {busy_s}\n",
                   stable_age_s=2.0)
    agent.start()
    sent: list[str] = []
    try:
        for i in range(2):
            files, uid = _mr_files(tmp_path, 20 + i)
            assert storescu(agent.dicom_port, files).returncode == 0  # acknowledged
            sent.append(uid)
        holder = _hold_lock(agent.state / "state.db", hold_s)  # before the series fall due
        assert holder.wait(30) == 0
        assert holder.stdout is not None
        holder.stdout.close()
        docs = _wait_results(collector, len(sent), timeout=120)
        recovered = _wait_event(collector, "loop.recovered", timeout=30)
        alive = agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.stop()
        collector.close()
    log = agent.log_text()
    assert sorted(d["series_uid"] for d in docs) == sorted(sent), log[-3000:]
    stalled = [e for e in _events(collector) if e["kind"] == "loop.stalled"]
    assert stalled and any("locked" in e["fields"]["error"] for e in stalled), _events(collector)
    assert recovered and alive


def test_job_creation_failing_once_is_retried_without_a_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = _agent(tmp_path, mosquitto)
    agent.start()
    pid = agent.proc.pid if agent.proc else 0
    other = sqlite3.connect(agent.state / "state.db", isolation_level=None, timeout=30)
    other.execute("CREATE TRIGGER fault_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'injected'); END")
    try:
        files, uid = _mr_files(tmp_path, 30)
        assert storescu(agent.dicom_port, files).returncode == 0
        stalled = _wait_event(collector, "loop.stalled", timeout=60)  # published while it lasts
        assert _results(collector) == []
        other.execute("DROP TRIGGER fault_jobs")
        docs = _wait_results(collector, 1, timeout=120)
        recovered = _wait_event(collector, "loop.recovered", timeout=30)
        same_process = agent.proc is not None and agent.proc.poll() is None and agent.proc.pid == pid
    finally:
        agent.stop()
        collector.close()
        other.close()
    assert stalled and stalled[0]["fields"]["loop"] == "assembly" and "injected" in stalled[0]["fields"]["error"]
    assert [d["series_uid"] for d in docs] == [uid], agent.log_text()[-3000:]
    assert recovered and same_process


def test_a_result_the_outbox_cannot_take_is_kept_not_rerun_and_delivered_once(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = _agent(tmp_path, mosquitto)
    agent.start()
    other = sqlite3.connect(agent.state / "state.db", isolation_level=None, timeout=30)
    # the job's "inferred" update fails, so its transaction (outbox row included) rolls back
    other.execute("CREATE TRIGGER fault_result BEFORE UPDATE ON jobs WHEN NEW.state = 'inferred'"
                  " BEGIN SELECT RAISE(ABORT, 'injected'); END")
    try:
        files, uid = _mr_files(tmp_path, 40)
        assert storescu(agent.dicom_port, files).returncode == 0
        assert _wait_event(collector, "loop.stalled", timeout=60)
        time.sleep(3)  # a few retries of the write
        other.execute("DROP TRIGGER fault_result")
        docs = _wait_results(collector, 1, timeout=60)
        time.sleep(2)
    finally:
        agent.stop()
        collector.close()
        other.close()
    log = agent.log_text()
    assert [d["series_uid"] for d in _results(collector)] == [uid], log[-3000:]
    assert "event=job.result_unwritten" in log
    assert len(re.findall(r"event=runner\.job_done .*kind=ok", log)) == 1  # inferred once, not re-run
    assert not [e for e in _events(collector) if e["kind"] == "job.failed"]
    assert docs


def test_a_series_resent_after_retention_gets_a_new_result(tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/results")
    agent = _agent(tmp_path, mosquitto, stable_age_s=0.5)
    agent.config.write_text(agent.config.read_text().replace(
        "min_free_mb = 50\n", "min_free_mb = 50\nretention_days = 0.00003\njanitor_interval_s = 0.5\n"))
    spool = agent.state / "spool"
    agent.start()
    files, uid = _mr_files(tmp_path, 50)
    try:
        assert storescu(agent.dicom_port, files).returncode == 0
        assert len(_wait_results(collector, 1, timeout=120)) == 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and list(spool.rglob("*.dcm")):
            time.sleep(0.2)
        assert not list(spool.rglob("*.dcm")), "retention did not sweep the series"
        assert storescu(agent.dicom_port, files).returncode == 0  # the same instances again
        docs = _wait_results(collector, 2, timeout=120)
    finally:
        agent.stop()
        collector.close()
    assert len(docs) == 2, agent.log_text()[-3000:]
    assert docs[0]["series_uid"] == docs[1]["series_uid"] == uid
    assert docs[0]["result_id"] == docs[1]["result_id"]
    assert [d["revision"] for d in docs] == [1, 2]  # the new result supersedes the old one


def test_a_slow_series_delays_a_small_one_sent_after_it_by_at_most_one_job(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    budget_s = 6.0
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    # every CT job hangs (the worker ignores SIGTERM; SIGKILLed after the budget); MR jobs are fine
    agent = _agent(tmp_path, mosquitto, f"job_timeout_s = {budget_s}\nmax_attempts = 3\n",
                   "[jobs]\nretry_backoff_s = 1\n", cls=FaultyAgent,
                   env={"EDGE_AGENT_FAULT": "hang@ct-abdomen-seg"})
    ct = write_ct_series(make_ct_phantom(CT_SEED, size=256, slice_thickness=3.0), tmp_path / "ct")
    mr_files, mr_uid = _mr_files(tmp_path, 60)
    agent.start()
    try:
        assert storescu(agent.dicom_port, sorted(ct.glob("*.dcm"))).returncode == 0
        assert storescu(agent.dicom_port, mr_files).returncode == 0
        sent_at = time.monotonic()
        mr = _wait_results(collector, 1, timeout=120)
        waited = time.monotonic() - sent_at
        failed = _wait_event(collector, "job.failed", timeout=180)
    finally:
        agent.stop()
        collector.close()
    log = agent.log_text()
    assert [d["series_uid"] for d in mr] == [mr_uid], log[-3000:]
    done = [(m.group(1), m.group(2)) for m in re.finditer(r"event=runner\.job_done job_id=\S*\|(\S+)\|\d+ .*?kind=(\w+)",
                                                          log)]
    before_mr = done[:[n for n, _ in done].index("mr-brain-cls")]
    assert before_mr == [("ct-abdomen-seg", "timeout")], done  # one attempt of the slow series, then ours
    assert waited < budget_s + 60, waited  # one budget (+ kill grace, a fresh worker, its own job)
    assert failed and failed[0]["fields"]["kind"] == "timeout" and failed[0]["fields"]["attempts"] == 3
    messages = [json.loads(p) for t, p in collector.messages if t.endswith("/events")]
    assert not [m for m in messages if m["kind"].startswith("engine.")]  # not blamed on a model


def test_a_series_over_a_size_limit_is_refused_with_an_event_and_never_retried(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = _agent(tmp_path, mosquitto, sections="[series_limits]\nmax_rows = 128\n")
    agent.start()
    files, uid = _mr_files(tmp_path, 70)  # 256 rows
    try:
        assert storescu(agent.dicom_port, files).returncode == 0
        refused = _wait_event(collector, "series.refused", timeout=120)
        time.sleep(2)
    finally:
        agent.stop()
        collector.close()
    assert refused, agent.log_text()[-3000:]
    assert refused[0]["fields"] == {"series_uid": uid, "model": "mr-brain-cls", "limit": "series_limits.max_rows",
                                    "reason": "256 rows per frame, over the limit of 128"}
    assert _results(collector) == [] and not [e for e in _events(collector) if e["kind"] == "job.failed"]
    assert len(re.findall(r"event=runner\.job_done", agent.log_text())) == 1  # refused once, not retried


def test_a_loop_that_cannot_recover_ends_the_process_non_zero(tmp_path: Path, mosquitto: Mosquitto) -> None:
    agent = _agent(tmp_path, mosquitto, sections="[supervision]\ndb_busy_timeout_s = 1\ngive_up_after_s = 3\n")
    agent.start()
    holder = _hold_lock(agent.state / "state.db", 60)
    try:
        assert agent.proc is not None
        rc = agent.proc.wait(45)
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
        agent.stop()
    log = agent.log_text()
    assert rc == 3, log[-3000:]
    assert "event=loop.failed" in log and "event=service.exiting" in log


def test_a_job_that_hits_the_worker_memory_limit_is_refused_as_too_large(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    # the MR job allocates past the worker's limit (the default, 8192 MB) and gets MemoryError
    agent = _agent(tmp_path, mosquitto, cls=FaultyAgent, env={"EDGE_AGENT_FAULT": "oom@mr-brain-cls"})
    agent.start()
    files, uid = _mr_files(tmp_path, 80)
    try:
        assert storescu(agent.dicom_port, files).returncode == 0
        refused = _wait_event(collector, "series.refused", timeout=120)
        time.sleep(2)
    finally:
        agent.stop()
        collector.close()
    log = agent.log_text()
    assert refused, log[-3000:]
    assert refused[0]["fields"]["series_uid"] == uid
    assert refused[0]["fields"]["limit"] == "pipeline.worker_memory_mb"
    assert "limit 8192 MB" in refused[0]["fields"]["reason"]
    assert len(re.findall(r"event=runner\.job_done", log)) == 1  # not retried
    assert not [e for e in _events(collector) if e["kind"] in ("job.failed", "engine.fallback")]
