"""Series assembly: quiescence timer (persisted), routing, late instances, job states."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.assembly import JobStore, SeriesAssembler, SeriesState
from agent.assembly import jobs as J
from agent.core import db
from agent.core.modelspec import load_spec
from agent.core.types import Instance, SpooledSeries

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _inst(series: str, n: int, modality: str = "CT", body: str = "ABDOMEN") -> Instance:
    return Instance(f"1.2.3.{series}.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", series, Path(f"/x/{n}"),
                    "1.2.840.10008.1.2.1", modality, 0.0, 1, "PACS", "ABD", body, n)


def _specs():
    return [load_spec(REPO / "models" / "ct-abdomen-seg"), load_spec(REPO / "models" / "mr-brain-cls")]


def test_series_completes_after_quiet_period_and_routes(tmp_path: Path) -> None:
    clock = Clock()
    asm = SeriesAssembler(db.connect(tmp_path / "s.db"), _specs(), stable_age_s=10, clock=clock)
    for i in range(30):
        asm.note_instance(_inst("9", i))
        clock.t += 0.1
    clock.t += 9.0
    assert asm.pop_due() == []  # 9 s quiet is not 10
    clock.t += 1.1
    due = asm.pop_due()
    assert [(d.series_uid, d.models, d.n_instances, d.revision) for d in due] == [("9", ("ct-abdomen-seg",), 30, 1)]
    assert asm.pop_due() == []  # only once
    assert asm.state("9") is SeriesState.COMPLETE


def test_unwanted_series_is_unrouted_and_ages_out(tmp_path: Path) -> None:
    clock = Clock()
    asm = SeriesAssembler(db.connect(tmp_path / "s.db"), _specs(), stable_age_s=1, clock=clock)
    for i in range(3):  # too few slices for the CT model, wrong modality for the MR model
        asm.note_instance(_inst("7", i))
    asm.note_instance(_inst("8", 0, modality="US", body="HEART"))
    clock.t += 2
    due = {d.series_uid: d.models for d in asm.pop_due()}
    assert due == {"7": (), "8": ()}
    assert asm.state("7") is SeriesState.UNROUTED
    assert asm.expired_unrouted(3600) == []
    clock.t += 3601
    assert sorted(asm.expired_unrouted(3600)) == ["7", "8"]


def test_timer_survives_restart(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "s.db"
    asm = SeriesAssembler(db.connect(path), _specs(), stable_age_s=10, clock=clock)
    for i in range(25):
        asm.note_instance(_inst("5", i))
    clock.t += 5
    asm.conn.close()
    restarted = SeriesAssembler(db.connect(path), _specs(), stable_age_s=10, clock=clock)
    assert restarted.pop_due() == []
    clock.t += 5.5
    assert [d.series_uid for d in restarted.pop_due()] == ["5"]


def test_late_instance_reopens_with_next_revision_and_supersedes_jobs(tmp_path: Path) -> None:
    clock = Clock()
    conn = db.connect(tmp_path / "s.db")
    asm = SeriesAssembler(conn, _specs(), stable_age_s=1, clock=clock)
    jobs = JobStore(conn, clock=clock)
    for i in range(25):
        asm.note_instance(_inst("4", i))
    clock.t += 2
    (due,) = asm.pop_due()
    job1 = jobs.create(due.series_uid, due.study_uid, "ct-abdomen-seg", due.revision)
    assert asm.note_instance(_inst("4", 99)) is True  # re-opened
    clock.t += 2
    (due2,) = asm.pop_due()
    assert due2.revision == 2 and due2.n_instances == 26
    job2 = jobs.create(due2.series_uid, due2.study_uid, "ct-abdomen-seg", due2.revision)
    assert jobs.get(job1.job_id).state == J.SUPERSEDED
    assert jobs.get(job2.job_id).state == J.PENDING
    assert jobs.create(due2.series_uid, due2.study_uid, "ct-abdomen-seg", 2).job_id == job2.job_id  # idempotent


def test_reconcile_reopens_series_the_table_missed(tmp_path: Path) -> None:
    clock = Clock()
    asm = SeriesAssembler(db.connect(tmp_path / "s.db"), _specs(), stable_age_s=1, clock=clock)
    spooled = SpooledSeries("6", "1.2.3", "CT", "ABD", "ABDOMEN", 40, clock.t)
    fixed = asm.reconcile([spooled])
    assert fixed == 1 and asm.state("6") is SeriesState.OPEN
    assert asm.reconcile([spooled]) == 0
    # more instances in the spool than the table counted (a crash between the two commits)
    clock.t += 2
    assert [d.models for d in asm.pop_due()] == [("ct-abdomen-seg",)]
    assert asm.reconcile([SpooledSeries("6", "1.2.3", "CT", "ABD", "ABDOMEN", 41, clock.t)]) == 1
    assert asm.state("6") is SeriesState.OPEN
    clock.t += 2
    assert [d.models for d in asm.pop_due()] == [("ct-abdomen-seg",)]


def test_job_retries_are_bounded_and_running_jobs_recover(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "s.db")
    jobs = JobStore(conn)
    job = jobs.create("s", "st", "m", 1)
    claimed = jobs.claim_next()
    assert claimed is not None and claimed.state == J.RUNNING and claimed.attempts == 1
    assert jobs.claim_next() is None
    assert jobs.recover() == 1  # a crash left it running
    assert jobs.retry_or_fail(jobs.claim_next().job_id, "boom", max_attempts=3) == J.PENDING
    jobs.claim_next()
    assert jobs.retry_or_fail(job.job_id, "boom again", max_attempts=3) == J.FAILED
    assert jobs.get(job.job_id).error == "boom again"
    assert jobs.series_done("s")


def test_quiet_period_counts_from_arrival_and_next_due_is_known(tmp_path: Path) -> None:
    clock = Clock()
    asm = SeriesAssembler(db.connect(tmp_path / "s.db"), _specs(), stable_age_s=10, clock=clock)
    assert asm.next_due_at() is None
    late_drain = dataclasses.replace(_inst("9", 0), received_at=clock.t - 3.0)  # drained 3 s after arrival
    asm.note_instance(late_drain)
    assert asm.next_due_at() == pytest.approx(clock.t + 7.0)
    clock.t += 7.01
    assert [d.series_uid for d in asm.pop_due()] == ["9"]
    assert asm.next_due_at() is None
    asm.note_instance(_inst("10", 0))  # received_at unknown (0): counts from now
    assert asm.next_due_at() == pytest.approx(clock.t + 10.0)


def test_the_queries_the_service_loops_ask_of_the_tables(tmp_path: Path) -> None:
    """Retention candidates come from the series table, unsent results from the job table: each
    query lives with the stage that owns the table (the service holds no SQL)."""
    clock = Clock()
    conn = db.connect(tmp_path / "s.db")
    asm = SeriesAssembler(conn, _specs(), stable_age_s=1, clock=clock)
    jobs = JobStore(conn)
    asm.reconcile([SpooledSeries("7", "1.2.3", "CT", "ABD", "ABDOMEN", 40, clock.t)])
    assert asm.completed_before(clock.t + 100) == []  # still open
    clock.t += 2
    (due,) = asm.pop_due()
    assert due.models == ("ct-abdomen-seg",)
    done_at = clock.t
    assert asm.completed_before(done_at - 1) == [] and asm.completed_before(done_at) == ["7"]
    job = jobs.create(due.series_uid, due.study_uid, "ct-abdomen-seg", due.revision)
    assert jobs.inferred_keys() == [] and not jobs.series_done("7")
    assert jobs.claim_next() is not None
    jobs.mark(job.job_id, J.INFERRED, result_key="r:1")
    assert jobs.inferred_keys() == ["r:1"] and not jobs.series_done("7")
    jobs.mark_published("r:1")
    assert jobs.inferred_keys() == [] and jobs.series_done("7")
