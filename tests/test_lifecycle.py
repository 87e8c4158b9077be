"""The agent under a service manager (issue 14), against the real agent process: a test
``NOTIFY_SOCKET`` (a datagram socket bound here, by path and in the abstract namespace) stands in for
systemd, with ``WATCHDOG_USEC``; DICOM peers are DCMTK storescu and pynetdicom; results arrive on a
real Mosquitto. Faults come from a file the test writes and removes (EDGE_AGENT_FAULT_FILE:
``slow-activation``, ``wedge-jobs``; agent/inference/faults.py)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import REPO, AgentProcess, Mosquitto, ResultCollector, storescu
from pynetdicom import AE
from pynetdicom.association import Association
from test_e2e import CT_SEED, _mr_series, _results

from agent.mqtt.payloads import parse_event
from deploy.synth import make_ct_phantom, write_ct_series

pytestmark = pytest.mark.slow

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

#: the agent with test-only fault injection (the CLI never turns it on) and its config file re-read on SIGHUP
AGENT = """
import sys
from agent.core.config import load_config
from agent.core.log import setup_logging
from agent.service import Service
cfg = load_config(sys.argv[1])
setup_logging(cfg.logging.level, cfg.logging.format)
sys.exit(Service(cfg, fault_injection=True, config_path=sys.argv[1]).run_forever())
"""


class NotifySocket:
    """What systemd would receive: every sd_notify datagram, with its arrival time. ``on_ready`` runs
    on the receiving thread the moment READY=1 arrives (before the next datagram is read)."""

    def __init__(self, address: str) -> None:
        self.address = address  # as in NOTIFY_SOCKET: a path, or "@name" (abstract namespace)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.on_ready: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            text = data.decode()
            self.messages.append((time.monotonic(), text))
            if "READY=1" in text.splitlines() and self.on_ready is not None:
                self.on_ready()

    def lines(self, key: str, since: float = 0.0) -> list[tuple[float, str]]:
        """(time, value) of every ``key=value`` line received after ``since``."""
        return [(t, line.partition("=")[2]) for t, text in list(self.messages) if t >= since
                for line in text.splitlines() if line.startswith(key + "=")]

    def wait(self, key: str, value: str | None = None, *, since: float = 0.0, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, v in self.lines(key, since):
                if value is None or v == value:
                    return t
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value or '*'} in {timeout}s: {self.messages[-10:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class LifecycleAgent(AgentProcess):
    """The real agent process (AGENT) with NOTIFY_SOCKET and WATCHDOG_USEC, started without waiting."""

    def __init__(self, tmp: Path, broker_port: int, notify: NotifySocket, *, watchdog_usec: int = 0,
                 extra_toml: str = "", stable_age_s: float = 1.0) -> None:
        self.fault_file = tmp / "fault"
        env = {"NOTIFY_SOCKET": notify.address, "EDGE_AGENT_FAULT_FILE": str(self.fault_file)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        super().__init__(tmp, broker_port, stable_age_s=stable_age_s, extra_toml=extra_toml, env=env)
        self.notify = notify

    def start(self, timeout: float = 60.0) -> None:
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT, str(self.config)], stdout=self._logf,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=REPO)

    def wait_ready(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while not self.notify.lines("READY", self.started_at) and time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()[-3000:]
            time.sleep(0.1)
        return self.notify.wait("READY", "1", since=self.started_at, timeout=1)

    def terminate(self, timeout: float = 120) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds the stop took)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        took = time.monotonic() - t0
        self.proc = None
        self._logf.close()
        return rc, took


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "n.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are short"
    sock = NotifySocket(str(path))
    yield sock
    sock.close()


def _scu(aet: str = "EDGE_SCU", contexts: tuple[str, ...] = (VERIFICATION,)) -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae


def _associate(port: int, aet: str = "EDGE_SCU", contexts: tuple[str, ...] = (VERIFICATION,)) -> Association:
    return _scu(aet, contexts).associate("127.0.0.1", port, ae_title="EDGE_AGENT")


def _echo(port: int, aet: str = "EDGE_SCU") -> bool:
    assoc = _associate(port, aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def _events(collector: ResultCollector, kind: str) -> list[dict]:
    docs = [parse_event(p) for t, p in list(collector.messages) if t.endswith("/events")]
    return [d for d in docs if d["kind"] == kind]


def _wait(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


def _query(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        conn.close()


def _per_result_id(collector: ResultCollector) -> dict[str, int]:
    counts: dict[str, int] = {}
    for doc in _results(collector):
        counts[doc["result_id"]] = counts.get(doc["result_id"], 0) + 1
    return counts


# ------------------------------------------------------------------------------ readiness, watchdog


@pytest.mark.parametrize("namespace", ["path", "abstract"])
def test_ready_comes_only_once_the_listener_answers_then_status_and_watchdog_pings(
        tmp_path: Path, mosquitto: Mosquitto, notify: NotifySocket, namespace: str) -> None:
    if namespace == "abstract":
        notify.close()
        notify = NotifySocket(f"@edge-agent-test-{os.getpid()}-{time.monotonic_ns()}")
    agent = LifecycleAgent(tmp_path, mosquitto.port, notify, watchdog_usec=1_000_000)
    echo_at_ready: list[bool] = []
    notify.on_ready = lambda: echo_at_ready.append(_echo(agent.dicom_port)) if not echo_at_ready else None
    agent.start()
    try:
        ready = agent.wait_ready()
        _wait(lambda: echo_at_ready, 15, "the echo at READY")
        assert echo_at_ready == [True], agent.log_text()[-3000:]  # C-ECHO answered the moment READY came
        first = notify.lines("READY", agent.started_at)
        assert len(first) == 1 and first[0][0] == ready  # one READY, nothing claimed ready before it
        # a person's STATUS= line: models with their variant, queue, outbox, broker, drift
        notify.wait("STATUS", since=ready)
        _wait(lambda: any(v.startswith("ready;") for _t, v in notify.lines("STATUS")), 30, "STATUS ready")
        line = [v for _t, v in notify.lines("STATUS") if v.startswith("ready;")][-1]
        for part in ("models: ", "ct-abdomen-seg", "fp32", "queue 0", "outbox ", "broker connected", "drift:"):
            assert part in line, line
        t0 = time.monotonic()
        time.sleep(3)
        pings = notify.lines("WATCHDOG", t0)
        assert len(pings) >= 4, pings  # every half of WATCHDOG_USEC while all is well
        rc, took = agent.terminate()
    finally:
        agent.stop()
        if namespace == "abstract":
            notify.close()
    assert rc == 0
    assert notify.lines("STOPPING")[-1][1] == "1"


def test_stores_are_acknowledged_while_models_activate_and_processed_after(
        tmp_path: Path, mosquitto: Mosquitto, notify: NotifySocket) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = LifecycleAgent(tmp_path, mosquitto.port, notify)
    agent.fault_file.write_text("slow-activation\n")  # activation lasts until the file goes
    agent.start()
    try:
        agent.wait_ready()
        folder, truth = _mr_series(tmp_path, 1)
        proc = storescu(agent.dicom_port, sorted(folder.glob("*.dcm")))
        assert proc.returncode == 0, proc.stderr[-2000:]  # acknowledged before activation ended
        time.sleep(4)  # past the quiet period: the series is due, its job waits
        assert not _results(collector) and not _events(collector, "job.failed")
        assert _query(agent.state / "state.db", "SELECT state, attempts FROM jobs") == [("pending", 0)]
        status = notify.lines("STATUS")[-1][1]
        assert status.startswith("receiving; activating models"), status
        agent.fault_file.unlink()  # activation ends
        _wait(lambda: _results(collector), 120, "the result after activation")
        doc = _results(collector)[0]
        assert doc["series_uid"] == truth["series_uid"]
        log = agent.log_text()
        assert log.index("service.models_activated") > log.index("service.started")
        assert not _events(collector, "engine.fallback")  # nobody blamed
    finally:
        rc = agent.stop()
        collector.close()
    assert rc == 0


def test_watchdog_pings_stop_while_the_job_loop_is_wedged_and_resume_when_released(
        tmp_path: Path, mosquitto: Mosquitto, notify: NotifySocket) -> None:
    agent = LifecycleAgent(tmp_path, mosquitto.port, notify, watchdog_usec=1_000_000,
                           extra_toml="[service]\nwatchdog_stall_s = 2\n[jobs]\nbudget_base_s = 3600\n")
    agent.start()
    try:
        agent.wait_ready()
        t0 = time.monotonic()
        time.sleep(2.5)
        assert len(notify.lines("WATCHDOG", t0)) >= 3  # healthy and idle: pinging
        agent.fault_file.write_text("wedge-jobs\n")
        wedged = time.monotonic()
        time.sleep(7)  # the stall bound (2 s) plus the next job step (<= 1 s idle wait) and margin
        silent_from = wedged + 4.0
        assert notify.lines("WATCHDOG", silent_from) == [], "pings went on while the job loop was wedged"
        assert "watchdog.withheld" in agent.log_text() and "jobs: no step" in agent.log_text()
        agent.fault_file.unlink()
        released = time.monotonic()
        _wait(lambda: len(notify.lines("WATCHDOG", released)) >= 2, 10, "pings after the release")
        assert "watchdog.resumed" in agent.log_text()
    finally:
        rc = agent.stop()
    assert rc == 0


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_during_a_store_burst_rejects_new_associations_and_loses_nothing(
        tmp_path: Path, mosquitto: Mosquitto, notify: NotifySocket) -> None:
    budget = 40.0
    ct = write_ct_series(make_ct_phantom(CT_SEED, size=256, slice_thickness=3.0), tmp_path / "ct")
    files = sorted(ct.glob("*.dcm"))
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = LifecycleAgent(tmp_path, mosquitto.port, notify, stable_age_s=2.0,
                           extra_toml=f"[service]\nstop_timeout_s = {budget}\nstop_associations_s = 20\n")
    agent.start()
    db = agent.state / "state.db"
    try:
        agent.wait_ready()
        held = _associate(agent.dicom_port, "PACS")  # open and idle: the drain waits for it
        assert held.is_established
        burst = subprocess.Popen([sys.executable, "-c", STORE_ALL, str(agent.dicom_port), *map(str, files)],
                                 stdout=subprocess.PIPE, text=True)
        _wait(lambda: (_query(db, "SELECT COUNT(*) FROM instances") or [(0,)])[0][0] >= 10, 60, "stores begin")
        assert agent.proc is not None
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        notify.wait("STOPPING", "1", since=t0, timeout=10)
        late = _associate(agent.dicom_port, "EDGE_SCU")  # a new association: rejected, not reset
        assert late.is_rejected, "a new association during the stop must get A-ASSOCIATE-RJ"
        out, _ = burst.communicate(timeout=120)
        acked = set(out.split())
        assert held.is_established
        assert held.send_c_echo().Status == 0x0000  # the open association still works
        held.release()
        rc = agent.proc.wait(budget + 30)
        took = time.monotonic() - t0
        agent.proc = None
        agent._logf.close()
        assert rc == 0 and took < budget, (rc, took)
        assert acked and acked <= sops  # what the agent answered Success for ...
        stored = {r[0] for r in _query(db, "SELECT sop_instance_uid FROM instances")}
        assert acked <= stored  # ... is in the spool
        agent.start()  # after the restart, every acknowledged instance is processed
        agent.wait_ready()
        _wait(lambda: _results(collector), 300, "the CT result")
        time.sleep(3)  # a duplicate would arrive now
        assert list(_per_result_id(collector).values()) == [1]
    finally:
        agent.stop()
        collector.close()


#: a C-STORE SCU (pynetdicom) that prints the SOP Instance UID of every instance answered Success
STORE_ALL = """
import sys
from pynetdicom import AE
import pydicom
ae = AE(ae_title="STORESCU")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="EDGE_AGENT")
assert assoc.is_established
for path in sys.argv[2:]:
    ds = pydicom.dcmread(path)
    status = assoc.send_c_store(ds)
    if status and status.Status == 0:
        print(ds.SOPInstanceUID, flush=True)
assoc.release()
"""


def test_sigterm_during_inference_releases_the_job_untried_and_its_result_comes_once(
        tmp_path: Path, mosquitto: Mosquitto, notify: NotifySocket) -> None:
    budget = 30.0
    ct = write_ct_series(make_ct_phantom(CT_SEED, size=256, slice_thickness=3.0), tmp_path / "ct")
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = LifecycleAgent(tmp_path, mosquitto.port, notify, stable_age_s=1.0,
                           extra_toml=f"[service]\nstop_timeout_s = {budget}\nstop_job_s = 0\n")
    agent.config.write_text(agent.config.read_text().replace("[pipeline]\n", "[pipeline]\nprefetch = false\n"))
    agent.start()
    db = agent.state / "state.db"
    try:
        agent.wait_ready()
        assert storescu(agent.dicom_port, sorted(ct.glob("*.dcm"))).returncode == 0
        _wait(lambda: _query(db, "SELECT state FROM jobs") == [("running",)], 60, "the job running")
        time.sleep(0.5)  # inside the worker
        rc, took = agent.terminate(budget + 30)
        assert rc == 0 and took < budget, (rc, took)
        # interrupted: back to pending, the attempt not counted, no failure published
        assert _query(db, "SELECT state, attempts FROM jobs") == [("pending", 0)], agent.log_text()[-3000:]
        assert not _results(collector) and not _events(collector, "job.failed")
        agent.start()
        agent.wait_ready()
        _wait(lambda: _results(collector), 300, "the CT result after the restart")
        time.sleep(3)
        assert list(_per_result_id(collector).values()) == [1]
        assert _query(db, "SELECT attempts FROM jobs") == [(1,)]
    finally:
        agent.stop()
        collector.close()


# ------------------------------------------------------------------------------ SIGHUP


def test_sighup_applies_a_new_allow_list_to_the_next_association_and_refuses_an_invalid_file(
        tmp_path: Path, mosquitto: Mosquitto, notify: NotifySocket) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/events")
    agent = LifecycleAgent(tmp_path, mosquitto.port, notify)
    agent.start()
    mr, _truth = _mr_series(tmp_path, 2)
    ds = pydicom.dcmread(next(mr.glob("*.dcm")))
    try:
        agent.wait_ready()
        live = _associate(agent.dicom_port, "PACS", (VERIFICATION, MR_IMAGE))
        assert live.is_established
        original = agent.config.read_text()
        agent.config.write_text(original.replace('"PACS@127.0.0.1"', '"NEWPACS"').replace(
            "[pipeline]", "[pipeline]\nworker_memory_mb = 4096"))
        assert agent.proc is not None
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGHUP)
        _wait(lambda: _events(collector, "config.reloaded"), 30, "config.reloaded")
        fields = _events(collector, "config.reloaded")[0]["fields"]
        assert fields["applied"] == ["dicom.allowed_callers"]
        assert fields["needs_restart"] == ["pipeline.worker_memory_mb"]
        assert [v for _t, v in notify.lines("RELOADING", t0)] == ["1"]
        assert notify.wait("READY", "1", since=t0) > notify.wait("RELOADING", "1", since=t0)
        # the association in progress completes ...
        assert live.is_established and live.send_c_store(ds).Status == 0x0000
        live.release()
        # ... the next one is checked against the new list
        assert _associate(agent.dicom_port, "PACS").is_rejected
        assert _echo(agent.dicom_port, "NEWPACS")

        agent.config.write_text(original.replace('"PACS@127.0.0.1"', '"PACS@not-an-address"'))
        agent.proc.send_signal(signal.SIGHUP)
        _wait(lambda: _events(collector, "config.reload_failed"), 30, "config.reload_failed")
        error = _events(collector, "config.reload_failed")[0]["fields"]["error"]
        assert "allowed_callers" in error
        assert _echo(agent.dicom_port, "NEWPACS")  # the old (last good) list stays in force
        assert _associate(agent.dicom_port, "PACS").is_rejected

        agent.config.write_text(original.replace("[dicom]", "[dicom]\nno_such_key = 1"))
        agent.proc.send_signal(signal.SIGHUP)
        _wait(lambda: len(_events(collector, "config.reload_failed")) == 2, 30, "second reload_failed")
        assert "no_such_key" in _events(collector, "config.reload_failed")[1]["fields"]["error"]
        assert _echo(agent.dicom_port, "NEWPACS")
    finally:
        rc = agent.stop()
        collector.close()
    assert rc == 0


# ------------------------------------------------------------------------------ the parts


def test_notifier_is_silent_without_a_socket_and_honours_watchdog_pid(notify: NotifySocket) -> None:
    from agent.service.notify import Notifier

    assert Notifier({}).send("READY=1") is False  # no NOTIFY_SOCKET: a no-op, no error
    n = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_usec == 4_000_000
    assert n.ready("line one\nline two") and n.extend_timeout(1.5)
    notify.wait("EXTEND_TIMEOUT_USEC", "1500000", timeout=5)
    assert ("STATUS", "line one line two") in [("STATUS", v) for _t, v in notify.lines("STATUS")]
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_usec == 0  # not ours
    gone = Notifier({"NOTIFY_SOCKET": str(Path(notify.address).parent / "missing.sock")})
    assert gone.send("READY=1") is False  # logged once, never raised
    gone.close()
    n.close()


def test_heartbeats_name_the_loops_past_their_due_time() -> None:
    from agent.service.supervisor import Heartbeats

    now = [100.0]
    beats = Heartbeats(clock=lambda: now[0])
    assert beats.overdue(["jobs"], 5) == ["jobs"]  # never seen
    beats.beat("jobs")
    beats.busy("assembly", 60)  # e.g. a job within its budget
    now[0] = 110.0
    assert beats.overdue(["jobs", "assembly"], 5) == ["jobs"]
    beats.ended("assembly")
    assert beats.overdue(["assembly"], 5) == ["assembly"]
