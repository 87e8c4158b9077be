"""Faults that must not silently stop the pipeline, in-process with real stages and real SQLite
faults injected from another connection (a trigger that aborts, a write lock held elsewhere):
the supervisor, series completion and job creation in one transaction, instance notifications
kept until recorded, a new revision after retention, the janitor's atomic forget, and a fair queue.
The same faults against the real agent process are in tests/test_faults.py."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from test_service_loops import Clock, _rig, _store

from agent.assembly import JobStore, SeriesAssembler, SeriesState
from agent.assembly import jobs as J
from agent.core import db
from agent.core.config import SupervisionConfig
from agent.core.modelspec import load_spec
from agent.core.types import Event
from agent.mqtt.payloads import parse_event
from agent.service.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class NoWait(threading.Event):
    """A stop event whose waits return at once (and advance the fake clock by the wait)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0))
        self.clock.t += float(timeout or 0)
        return self.is_set()


def _supervisor(clock: FakeClock, give_up_after_s: float = 60) -> tuple[Supervisor, list[Event]]:
    events: list[Event] = []
    cfg = SupervisionConfig(retry_initial_s=0.5, retry_max_s=4, give_up_after_s=give_up_after_s)
    return Supervisor(cfg, events.append, clock=clock), events


def test_a_failing_step_is_retried_with_backoff_and_its_stall_and_recovery_published() -> None:
    clock = FakeClock()
    sup, events = _supervisor(clock)
    stop = NoWait(clock)
    calls = {"n": 0}

    def step() -> float:
        calls["n"] += 1
        if calls["n"] <= 5:
            raise sqlite3.OperationalError("database is locked")
        if calls["n"] == 7:
            stop.set()
        return 0.0

    sup.run("jobs", step, stop)
    assert calls["n"] == 7 and not sup.fatal.is_set()
    assert stop.waits[:5] == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling up to retry_max_s
    assert [e.kind for e in events] == ["loop.stalled", "loop.recovered"]  # once per stall, not per retry
    assert events[0].fields == {"loop": "jobs", "error": "OperationalError: database is locked", "retry_in_s": 0.5}
    assert events[1].fields["failures"] == 5 and events[1].fields["stalled_s"] == pytest.approx(11.5)


def test_a_loop_that_cannot_recover_is_fatal_but_a_non_critical_one_never_gives_up() -> None:
    clock = FakeClock()
    sup, events = _supervisor(clock, give_up_after_s=10)
    stop = NoWait(clock)

    def broken() -> float:
        raise OSError("disk I/O error")

    sup.run("assembly", broken, stop)  # returns: it gave up
    assert sup.fatal.is_set() and sup.failure == "assembly: OSError: disk I/O error"
    assert [e.kind for e in events] == ["loop.stalled", "loop.failed"]
    assert events[-1].fields["stalled_s"] >= 10

    sup2, events2 = _supervisor(clock, give_up_after_s=10)
    stop2 = NoWait(clock)
    tries = {"n": 0}

    def broken_then_stop() -> float:
        tries["n"] += 1
        if tries["n"] == 50:
            stop2.set()
        raise OSError("no NVML")

    sup2.run("telemetry", broken_then_stop, stop2, critical=False)
    assert tries["n"] == 50 and not sup2.fatal.is_set()
    assert [e.kind for e in events2] == ["loop.stalled"]


def test_a_loop_thread_that_dies_or_returns_is_fatal() -> None:
    sup, events = _supervisor(FakeClock())
    stop = threading.Event()

    def dies() -> float:
        raise SystemExit("a BaseException escapes every except Exception")

    sup.spawn("jobs", dies, stop).join(5)
    assert sup.fatal.is_set() and [e.kind for e in events] == ["loop.failed"]
    stop.set()


# ---- series completion and job creation: one transaction -----------------------------------------

def _abort_trigger(path: Path, table: str, name: str = "fault", when: str = "") -> sqlite3.Connection:
    """A trigger that aborts every insert into ``table``, created from another connection."""
    other = db.connect(path)
    other.execute(f"CREATE TRIGGER {name} BEFORE INSERT ON {table} {when} BEGIN "
                  f"SELECT RAISE(ABORT, 'injected fault'); END")
    return other


def _ct_rig(tmp_path: Path, clock: Clock, **storage: Any) -> dict[str, Any]:
    spec = load_spec(REPO / "models" / "ct-abdomen-seg")
    r = _rig(tmp_path, [spec], clock, **storage)
    r["asm"].route = lambda *a: (spec.name,)  # CT_small to the CT model whatever its body part
    return r


def test_a_failing_job_creation_leaves_the_series_open_and_due_until_it_succeeds(tmp_path: Path) -> None:
    clock = Clock()
    r = _ct_rig(tmp_path, clock)
    series = _store(r, tmp_path)
    r["loop"].tick()
    other = _abort_trigger(tmp_path / "state.db", "jobs")
    clock.t += 2
    with pytest.raises(sqlite3.IntegrityError, match="injected fault"):
        r["loop"].tick()
    # nothing was marked done before its successor existed
    assert r["asm"].state(series) is SeriesState.OPEN and r["jobs"].counts() == {}
    assert not r["ready"].is_set()
    other.execute("DROP TRIGGER fault")
    r["loop"].tick()
    assert r["asm"].state(series) is SeriesState.COMPLETE and r["jobs"].counts() == {J.PENDING: 1}
    assert r["ready"].is_set()


def test_an_instance_notification_is_kept_until_it_is_recorded(tmp_path: Path) -> None:
    clock = Clock()
    r = _ct_rig(tmp_path, clock)
    other = _abort_trigger(tmp_path / "state.db", "series")
    series = _store(r, tmp_path, n=3)
    with pytest.raises(sqlite3.IntegrityError):
        r["loop"].tick()
    assert r["asm"].state(series) is None
    other.execute("DROP TRIGGER fault")
    r["loop"].tick()
    row = r["asm"].series_row(series)
    assert row is not None and row["n_instances"] == 3  # none lost, none counted twice


def test_a_write_lock_held_elsewhere_fails_the_tick_and_loses_nothing(tmp_path: Path) -> None:
    clock = Clock()
    r = _ct_rig(tmp_path, clock)
    for conn in (r["asm"].conn, r["outbox"].conn):
        conn.execute("PRAGMA busy_timeout=200")
    series = _store(r, tmp_path)
    r["sink"].put(Event("loop.stalled", "warning", "m", {"loop": "jobs", "error": "x", "retry_in_s": 1.0}))
    holder = db.connect(tmp_path / "state.db")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            r["loop"].tick()
    finally:
        holder.execute("ROLLBACK")
    r["loop"].tick()  # records the instances it kept
    clock.t += 2
    r["loop"].tick()
    assert r["jobs"].counts() == {J.PENDING: 1} and r["asm"].state(series) is SeriesState.COMPLETE
    # the queued event was not handed over while the database refused writes
    assert [parse_event(m.payload)["kind"] for m in r["outbox"].pending()] == ["loop.stalled"]


# ---- retention -----------------------------------------------------------------------------------

def test_a_series_resent_after_retention_is_a_new_revision_with_a_new_job(tmp_path: Path) -> None:
    from test_ingest import ct_series

    clock = Clock()
    r = _ct_rig(tmp_path, clock, retention_days=1, janitor_interval_s=0.5)
    files = [p.read_bytes() for p in ct_series(tmp_path / "in", n=3)]

    def send() -> str:
        insts = [r["spool"].store_bytes(b)[0] for b in files]
        for inst in insts:
            r["loop"].instances.put(inst)
        r["loop"].tick()
        clock.t += 2
        r["loop"].tick()
        return str(insts[0].series_uid)

    series = send()
    job = r["jobs"].claim_next()
    assert job is not None and job.revision == 1
    r["jobs"].mark(job.job_id, J.INFERRED, result_key="k:1")
    clock.t += 86400 + 1
    r["loop"].tick()
    r["loop"].tick()
    assert r["asm"].state(series) is None and r["spool"].instances_for_series(series) == []
    assert send() == series  # the same files again (same UIDs), after retention swept them
    assert r["asm"].series_row(series)["revision"] == 2
    new = r["jobs"].claim_next()
    assert new is not None and new.job_id != job.job_id and new.revision == 2


def test_the_janitor_keeps_a_series_that_changed_after_it_was_chosen(tmp_path: Path) -> None:
    clock = Clock()
    conn = db.connect(tmp_path / "s.db")
    asm = SeriesAssembler(conn, [load_spec(REPO / "models" / "ct-abdomen-seg")], stable_age_s=1, clock=clock)
    jobs = JobStore(conn)
    from agent.core.types import SpooledSeries

    asm.reconcile([SpooledSeries("7", "1.2.3", "CT", "ABD", "ABDOMEN", 40, clock.t)])
    clock.t += 2
    asm.pop_due(lambda c, due: jobs.create(due.series_uid, due.study_uid, "ct-abdomen-seg", due.revision, conn=c))
    cutoff = clock.t
    assert asm.completed_before(cutoff) == ["7"]
    assert not asm.forget("7", completed_before=cutoff)  # its job is still open
    job = jobs.claim_next()
    jobs.mark(job.job_id, J.PUBLISHED)
    asm.reconcile([SpooledSeries("7", "1.2.3", "CT", "ABD", "ABDOMEN", 41, clock.t)])  # a new instance
    assert not asm.forget("7", completed_before=cutoff)  # re-opened since it was chosen: kept
    clock.t += 2
    asm.pop_due()
    assert asm.forget("7", completed_before=clock.t)


# ---- fairness --------------------------------------------------------------------------------------

def test_a_retry_goes_behind_newer_work_and_waits_its_backoff(tmp_path: Path) -> None:
    clock = Clock()
    jobs = JobStore(db.connect(tmp_path / "s.db"), clock=clock)
    huge = jobs.create("huge", "st", "m", 1)
    clock.t += 1
    small = jobs.create("small", "st", "m", 1)
    first = jobs.claim_next()
    assert first is not None and first.job_id == huge.job_id
    assert jobs.retry_or_fail(huge.job_id, "timeout", max_attempts=3, backoff_s=10) == J.PENDING
    nxt = jobs.claim_next()
    assert nxt is not None and nxt.job_id == small.job_id  # the retry does not keep its place
    jobs.mark(small.job_id, J.INFERRED)
    assert jobs.claim_next() is None  # backing off
    clock.t += 10
    again = jobs.claim_next()
    assert again is not None and again.job_id == huge.job_id and again.attempts == 2
    assert jobs.retry_or_fail(huge.job_id, "timeout", max_attempts=3, backoff_s=10) == J.PENDING
    clock.t += 19
    assert jobs.claim_next() is None  # doubled
    clock.t += 1
    assert jobs.claim_next() is not None


def test_a_database_from_before_the_backoff_column_is_migrated(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "old.db")
    conn.executescript(J.SCHEMA.replace(",\n    not_before REAL NOT NULL DEFAULT 0", ""))
    conn.execute("INSERT INTO jobs (job_id, series_uid, study_uid, model_name, revision, state, created_at,"
                 " updated_at) VALUES ('a', 's', 'st', 'm', 1, 'pending', 1, 1)")
    jobs = JobStore(conn)
    claimed = jobs.claim_next()
    assert claimed is not None and claimed.job_id == "a"
