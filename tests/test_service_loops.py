"""The service's loops, in-process with real stages (spool, series and job tables, outbox):
instances -> series -> jobs or an unrouted event -> retention. No threads: each tick is called.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_ingest import ct_series

from agent.assembly import JobStore, SeriesAssembler
from agent.assembly import jobs as J
from agent.core import db
from agent.core.config import Config, PipelineConfig, StorageConfig
from agent.core.errors import EdgeAgentError
from agent.core.modelspec import load_spec
from agent.core.topics import Topics
from agent.ingest.spool import Spool
from agent.mqtt.outbox import Outbox
from agent.mqtt.payloads import parse_event
from agent.service import Service, build_stages
from agent.service.assembly_loop import AssemblyLoop, PrefetchOffers
from agent.service.event_sink import EventSink
from agent.service.janitor import Janitor

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.t = 2_000_000.0

    def __call__(self) -> float:
        return self.t


def _rig(tmp_path: Path, specs: list[Any], clock: Clock, **storage: Any) -> dict[str, Any]:
    conn = db.connect(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool", tmp_path / "q", db.connect(tmp_path / "state.db"), 0)
    asm = SeriesAssembler(conn, specs, stable_age_s=1, clock=clock)
    jobs = JobStore(conn)
    outbox = Outbox(db.connect(tmp_path / "state.db"))
    sink = EventSink(Topics("edge", "dev-1").events, "dev-1")
    janitor = Janitor(StorageConfig(dir=tmp_path, **storage), spool, asm, jobs, clock=clock)
    ready = threading.Event()
    loop = AssemblyLoop(PipelineConfig(stable_age_s=1, prefetch=True), asm, jobs, outbox, sink, janitor,
                        PrefetchOffers(), ready)
    return {"spool": spool, "asm": asm, "jobs": jobs, "outbox": outbox, "sink": sink, "loop": loop,
            "janitor": janitor, "ready": ready}


def _store(r: dict[str, Any], tmp_path: Path, n: int = 3) -> str:
    insts = [r["spool"].store_bytes(p.read_bytes())[0] for p in ct_series(tmp_path / "in", n=n)]
    for inst in insts:
        r["loop"].instances.put(inst)
    return str(insts[0].series_uid)


def test_an_unrouted_series_is_announced_then_aged_out(tmp_path: Path) -> None:
    clock = Clock()
    r = _rig(tmp_path, [], clock, unrouted_retention_h=1, janitor_interval_s=60)
    series = _store(r, tmp_path)
    r["loop"].tick()
    assert r["asm"].state(series) is not None and r["outbox"].count() == 0  # still quiet-waiting
    clock.t += 2
    r["loop"].tick()
    (msg,) = r["outbox"].pending()
    doc = parse_event(msg.payload)
    assert doc["kind"] == "series.unrouted" and doc["fields"] == {"series_uid": series, "modality": "CT",
                                                                  "instances": 3}
    assert r["jobs"].counts() == {}
    clock.t += 3600 + 61  # past unrouted_retention_h and the janitor's interval
    r["loop"].tick()
    assert r["spool"].instances_for_series(series) == [] and r["asm"].state(series) is None


def test_a_routed_series_becomes_one_job_and_ages_out_only_once_published(tmp_path: Path) -> None:
    clock = Clock()
    spec = load_spec(REPO / "models" / "ct-abdomen-seg")
    r = _rig(tmp_path, [spec], clock, retention_days=1, janitor_interval_s=0.5)
    # route CT_small to the CT model whatever its body part: the test is about the loop
    r["asm"].route = lambda *a: (spec.name,)
    series = _store(r, tmp_path)
    r["loop"].tick()
    assert not r["ready"].is_set()
    clock.t += 2
    r["loop"].tick()
    assert r["ready"].is_set() and r["jobs"].counts() == {J.PENDING: 1}
    job = r["jobs"].claim_next()
    r["jobs"].mark(job.job_id, J.INFERRED, result_key="k:1")
    clock.t += 86400 + 1
    r["loop"].tick()  # the result row was never in the outbox: the job counts as published
    assert r["jobs"].counts() == {J.PUBLISHED: 1}
    clock.t += 1
    r["loop"].tick()
    assert r["spool"].instances_for_series(series) == [] and r["asm"].state(series) is None


def test_events_reported_from_any_thread_reach_the_outbox_in_order(tmp_path: Path) -> None:
    from agent.core.events import JobFailed

    r = _rig(tmp_path, [], Clock())
    woken = threading.Event()
    r["sink"].on_written(woken.set)
    threads = [threading.Thread(target=lambda i=i: r["sink"].put(
        JobFailed(series_uid=f"s{i}", model="m", kind="timeout", attempts=3, error="x").to_event()))
        for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert r["sink"].drain(r["outbox"]) == 5 and woken.is_set()
    docs = [parse_event(m.payload) for m in r["outbox"].pending()]
    assert sorted(d["fields"]["series_uid"] for d in docs) == [f"s{i}" for i in range(5)]
    assert all(d["created_at"] for d in docs)  # stamped when reported


def test_the_service_runs_stages_a_test_built(tmp_path: Path, mosquitto: Any) -> None:
    """Service(cfg, stages=..., events=...) wires what it is given: the caller's stages answer DICOM."""
    from agent.ingest.scu import send_files

    cfg = Config.model_validate({
        "device_id": "dev-1",
        "dicom": {"port": 0, "bind": "127.0.0.1"},
        "mqtt": {"port": mosquitto.port},
        "storage": {"dir": str(tmp_path / "svc"), "min_free_mb": 0},
        "pipeline": {"threads": 1},
        "models": {"dir": str(REPO / "models")},
    })
    events = EventSink(Topics(cfg.mqtt.topic_prefix, cfg.device_id).events, cfg.device_id)
    stages = build_stages(cfg, events.put)
    service = Service(cfg, stages=stages, events=events)
    service.start()
    try:
        assert service.stages is stages
        files = ct_series(tmp_path / "send", n=2)
        report = send_files(files, "127.0.0.1", service.dicom_port)
        assert report.sent == 2, report
        assert {s.instances for s in stages.spool.series_summary()} == {2}
    finally:
        service.stop()


def test_an_event_whose_write_fails_is_written_by_the_next_drain(tmp_path: Path) -> None:
    """The assembly loop drains events each tick; a drain that fails (here: a trigger refusing every
    outbox insert, as a full disk would) must keep the event it took off the queue."""
    import sqlite3

    from agent.core.events import JobFailed

    r = _rig(tmp_path, [], Clock())
    blocker = db.connect(tmp_path / "state.db")
    blocker.execute("CREATE TRIGGER no_rows BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    for i in range(3):
        r["sink"].put(JobFailed(series_uid=f"s{i}", model="m", kind="timeout", attempts=3, error="x").to_event())
    with pytest.raises((sqlite3.Error, EdgeAgentError)):
        r["sink"].drain(r["outbox"])
    assert r["sink"].pending() == 3 and r["outbox"].pending() == []
    blocker.execute("DROP TRIGGER no_rows")
    assert r["sink"].drain(r["outbox"]) == 3 and r["sink"].pending() == 0
    docs = [parse_event(m.payload) for m in r["outbox"].pending()]
    assert [d["fields"]["series_uid"] for d in docs] == ["s0", "s1", "s2"]


def test_the_janitor_ages_out_the_quarantine_even_when_nothing_new_arrives(tmp_path: Path) -> None:
    import time

    from test_ingest import _broken_file

    from agent.ingest.spool import QuarantineLimits
    from agent.ingest.spool.quarantine import QuarantinedError

    spool = Spool(tmp_path / "spool", tmp_path / "q", db.connect(tmp_path / "state.db"), 0,
                  quarantine_limits=QuarantineLimits(max_age_s=0.5))
    asm = SeriesAssembler(db.connect(tmp_path / "state.db"), [], stable_age_s=1)
    janitor = Janitor(StorageConfig(dir=tmp_path), spool, asm, JobStore(db.connect(tmp_path / "state.db")))
    bad = _broken_file(tmp_path / "noseries.dcm", drop=["SeriesInstanceUID"])
    with pytest.raises(QuarantinedError):
        spool.store_bytes(bad.read_bytes())
    assert len(list(spool.quarantine_dir.glob("*.dcm"))) == 1
    janitor.sweep()  # young: kept
    assert len(list(spool.quarantine_dir.glob("*.dcm"))) == 1
    time.sleep(0.6)
    janitor.sweep()
    assert list(spool.quarantine_dir.glob("*.dcm")) == []
