"""The service: wires the stages together and runs them.

    listener threads --Instance--> [instance queue] --> assembly thread --(jobs table)--> job thread
         |                                                                                   |
         +--Event--> [event queue] ----------------------------------------------------------+
                                                                                             v
                 MQTT publisher thread <------------------- outbox (SQLite) <-- Result / Event

Each stage owns its state (spool + instances, series + jobs, outbox) in the one SQLite file;
each thread has its own connection. Start order: database, outbox, inference worker + engine
activation (agent/engines), publisher, assembler, listener (last, so nothing is acknowledged
before it can be processed);
stop in reverse. On start-up, unfinished work is resumed: running jobs return to pending,
series the spool holds but the table lacks are re-opened, unsent messages stay in the outbox.
"""

from __future__ import annotations

import datetime as _dt
import logging
import queue
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from agent import __version__, db
from agent.assembly import JobStore, SeriesAssembler
from agent.assembly.jobs import FAILED, INFERRED
from agent.config import Config
from agent.engines import EngineManager
from agent.errors import EdgeAgentError, RegistryError
from agent.inference.runner import InferenceRunner
from agent.ingest import DEFAULT_STORAGE_SOP_CLASSES, DicomListener
from agent.ingest.spool import Spool
from agent.log import log_event
from agent.modelspec import ModelSpec
from agent.publish import payloads
from agent.publish.commands import Command, CommandDispatcher
from agent.publish.mqtt import MqttPublisher
from agent.publish.outbox import Outbox
from agent.publish.topics import Topics
from agent.registry.store import ModelStore
from agent.registry.updater import ModelUpdater, updater_from_config
from agent.types import Event, Instance, ModelRef, Result, Series

log = logging.getLogger(__name__)

# Enhanced objects come from modern scanners; accept them whenever the plain class is wanted.
_ENHANCED = {
    "1.2.840.10008.5.1.4.1.1.2": "1.2.840.10008.5.1.4.1.1.2.1",  # CT -> Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4": "1.2.840.10008.5.1.4.1.1.4.1",  # MR -> Enhanced MR
}


def sop_classes_for(specs: list[ModelSpec]) -> list[str]:
    wanted: list[str] = []
    for spec in specs:
        for uid in spec.input.sop_classes:
            for u in (uid, _ENHANCED.get(uid)):
                if u and u not in wanted:
                    wanted.append(u)
    return wanted or list(DEFAULT_STORAGE_SOP_CLASSES)


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")


class Service:
    """The running agent. ``start()`` returns once it accepts DICOM; ``stop()`` shuts down."""

    TICK_S = 0.25

    def __init__(self, cfg: Config, *, fault_injection: bool = False) -> None:
        self.cfg = cfg
        self.fault_injection = fault_injection
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.started_at = time.time()
        self._instances: queue.Queue[Instance] = queue.Queue()
        self._events: queue.Queue[Event] = queue.Queue()
        # models: the current registry version of each installed model (its manifest's spec), else
        # the FP32 ONNX in models.dir; agent/engines decides which variant runs (docs/engines.md)
        self.store = ModelStore(cfg.storage.dir)
        self.engines = EngineManager(cfg, self.store, cfg.db_path, self._events.put)
        self.models: dict[str, ModelSpec] = self.engines.specs()
        self.specs = list(self.models.values())
        self._stop = threading.Event()
        self._jobs_ready = threading.Event()
        self._prefetch: queue.Queue[str] = queue.Queue()  # series uids offered for decoding ahead
        self._prefetch_offered: dict[str, int] = {}  # series uid -> instance count when offered
        self._threads: list[threading.Thread] = []
        self._birth_seq = 0
        self.listener: DicomListener | None = None
        self.publisher: MqttPublisher | None = None
        self.runner: InferenceRunner | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        for d in (cfg.storage.dir, cfg.spool_dir, cfg.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(cfg.spool_dir, cfg.quarantine_dir, db.connect(cfg.db_path), cfg.storage.min_free_mb)
        self.outbox = Outbox(db.connect(cfg.db_path))
        asm_conn = db.connect(cfg.db_path)
        # per-instance series bookkeeping need not reach the platter before the C-STORE answer:
        # the spool's files are the truth, and start-up re-derives series from them (reconcile)
        asm_conn.execute("PRAGMA synchronous=NORMAL")
        self.assembler = SeriesAssembler(asm_conn, self.specs, cfg.pipeline.stable_age_s)
        self.jobs = JobStore(self.assembler.conn)
        self._job_conn = db.connect(cfg.db_path)
        self._job_outbox = Outbox(self._job_conn)
        self._job_jobs = JobStore(self._job_conn)

        respooled = self.spool.reconcile()
        recovered = self.jobs.recover()
        reconciled = self.assembler.reconcile(self._spool_summary())
        log_event(log, "service.recovered", instances_reindexed=respooled, jobs_requeued=recovered, series_reopened=reconciled,
                  outbox_pending=self.outbox.count())

        self.runner = InferenceRunner(cfg.models.dir, threads=cfg.pipeline.threads,
                                      job_timeout_s=cfg.pipeline.job_timeout_s,
                                      memory_limit_mb=cfg.pipeline.worker_memory_mb,
                                      fault_injection=self.fault_injection)
        self.runner.start()
        self.engines.attach_runner(self.runner)
        # before the publisher, so the birth message names the variants that will run: stored
        # choices are reused (milliseconds); a version new to this device is self-tested and timed
        self.engines.start()
        self.commands = self._command_dispatcher()  # MQTT cmd/# -> updater / engines
        self.publisher = MqttPublisher(cfg.mqtt, cfg.device_id, self.outbox, birth=self._birth,
                                       on_command=self.commands,
                                       reconnect_delay_s=(1.0, max(1.0, cfg.mqtt.reconnect_max_s)))
        self.publisher.start()
        self.commands.start()
        if self.updater is not None:
            self.updater.start_polling()  # registry.poll_interval_s; 0: only on cmd/update
        for target, name in ((self._assembly_loop, "assembly"), (self._job_loop, "jobs")):
            t = threading.Thread(target=target, name=f"edge-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.listener = DicomListener(cfg.dicom, self.spool, sop_classes_for(self.specs),
                                      on_instance=self._instances.put, on_event=self._events.put)
        port = self.listener.start()
        log_event(log, "service.started", version=__version__, device_id=cfg.device_id,
                  dicom_port=port, models=",".join(self.models) or "-")

    def stop(self) -> None:
        self._stop.set()
        self._jobs_ready.set()
        if self.listener is not None:
            self.listener.stop()
        for t in self._threads:
            t.join(timeout=30)
        if getattr(self, "updater", None) is not None:
            self.updater.stop()  # an update in progress finishes (it self-tests in the runner)
        if getattr(self, "commands", None) is not None:
            self.commands.stop()
        if self.runner is not None:
            self.runner.stop()
        self.engines.close()
        if self.publisher is not None:
            self.publisher.stop(timeout=5)
        if hasattr(self, "spool"):
            self.spool.close()
        log_event(log, "service.stopped")

    def run_forever(self) -> int:
        done = threading.Event()

        def _signal(signum: int, _frame: Any) -> None:
            log_event(log, "service.signal", signal=signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
        return 0

    @property
    def dicom_port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    # ---- status ----------------------------------------------------------------------------
    def _birth(self) -> bytes:
        self._birth_seq += 1
        device = self.engines.probe.summary()
        return payloads.status_payload(
            device_id=self.cfg.device_id, state="online", version=__version__,
            started_at=_iso(self.started_at), seq=self._birth_seq,
            capabilities={"backends": device["backends"], "dicom_ae_title": self.cfg.dicom.ae_title},
            models=self.engines.summary(),
            device=device,
        )

    # ---- model updates and commands (docs/mqtt.md "Commands") -----------------------------------
    def _command_dispatcher(self) -> CommandDispatcher:
        """Create the registry updater (when ``[registry]`` is configured) and the handlers of
        ``cmd/update``, ``cmd/rollback`` and ``cmd/selftest``; their events go to the outbox."""
        self.updater: ModelUpdater | None = None
        if self.cfg.registry.enabled():
            self.updater = updater_from_config(self.cfg, self.engines.activate, self._events.put,
                                               probe=self.engines.probe)

        def updater() -> ModelUpdater:
            if self.updater is None:
                raise RegistryError("no registry configured ([registry] url and public_key)")
            return self.updater

        def update(c: Command) -> object:
            return updater().pull_now([c.model] if c.model else None, correlation_id=c.correlation_id)

        def rollback(c: Command) -> object:
            return updater().rollback(c.model, correlation_id=c.correlation_id)

        def selftest(c: Command) -> object:
            return self.engines.selftest(c.model, correlation_id=c.correlation_id)

        return CommandDispatcher(self.topics, {"update": update, "rollback": rollback, "selftest": selftest},
                                 self._events.put)

    # ---- assembly thread -------------------------------------------------------------------
    def _spool_summary(self) -> list[tuple[str, str, str, str, str, int, float]]:
        # read-only view of the spool's journal, on the service's own connection
        rows = self._job_conn.execute(
            "SELECT series_uid, MIN(study_uid) AS study_uid, MIN(modality) AS modality,"
            " MIN(series_description) AS d, MIN(body_part) AS b, COUNT(*) AS n,"
            " MAX(received_at) AS last FROM instances GROUP BY series_uid"
        ).fetchall()
        return [(r["series_uid"], r["study_uid"], r["modality"], r["d"] or "", r["b"] or "",
                 r["n"], r["last"]) for r in rows]

    def _assembly_loop(self) -> None:
        last_janitor = 0.0
        while not self._stop.is_set():
            try:
                self._drain_instances()
                self._drain_events()
                for due in self.assembler.pop_due():
                    if not due.models:
                        self._emit(Event("series.unrouted", "info", "no model wants this series",
                                         {"series_uid": due.series_uid, "modality": due.modality,
                                          "instances": due.n_instances}))
                    for name in due.models:
                        self.jobs.create(due.series_uid, due.study_uid, name, due.revision)
                    if due.models:
                        self._jobs_ready.set()
                self._announce_prefetch()
                self._mark_published()
                if time.time() - last_janitor > self.cfg.storage.janitor_interval_s:
                    last_janitor = time.time()
                    self._janitor()
            except EdgeAgentError as exc:
                log_event(log, "assembly.error", logging.ERROR, error=str(exc))
            except Exception:  # noqa: BLE001 - the loop must survive anything; logged with traceback
                log.exception("assembly.crashed")
            self._stop.wait(self._assembly_wait_s())

    def _announce_prefetch(self) -> None:
        """Offer the job thread series a quarter of the way through their quiet period: decoding
        them while the worker is idle takes the load stage off the path to the result (early
        enough to finish before the series falls due even with a short ``stable_age_s``; a
        prefetch wasted on a series that receives more instances costs idle CPU only)."""
        if not self.cfg.pipeline.prefetch:
            return
        for uid, n in self.assembler.quiet_series(self.cfg.pipeline.stable_age_s / 4):
            if self._prefetch_offered.get(uid) != n:
                self._prefetch_offered[uid] = n
                self._prefetch.put(uid)
                self._jobs_ready.set()  # wakes the job thread, which prefetches when it has no job
        if len(self._prefetch_offered) > 1000:  # bounded: only open series need remembering
            self._prefetch_offered.clear()

    def _assembly_wait_s(self) -> float:
        """Sleep until the next tick, or sooner when a series falls due before it: a series is
        handed to inference when its quiet period ends, not up to a tick later."""
        try:
            due_at = self.assembler.next_due_at()
        except sqlite3.Error:
            return self.TICK_S
        if due_at is None:
            return self.TICK_S
        return min(self.TICK_S, max(0.0, due_at - time.time()))

    def _drain_instances(self) -> None:
        while True:
            try:
                inst = self._instances.get_nowait()
            except queue.Empty:
                return
            self.assembler.note_instance(inst)

    def _drain_events(self) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            self._emit(ev)

    def _emit(self, ev: Event) -> None:
        if not ev.created_at:
            ev = Event(ev.kind, ev.severity, ev.message, ev.fields, time.time())
        self.outbox.put(self.topics.events, payloads.event_payload(ev, self.cfg.device_id),
                        qos=1, kind="event")
        if self.publisher is not None:
            self.publisher.wake()

    def _mark_published(self) -> None:
        rows = self.assembler.conn.execute(
            "SELECT job_id, result_key FROM jobs WHERE state = ?", (INFERRED,)
        ).fetchall()
        for r in rows:
            if not self.outbox.has(r["result_key"]):
                self.jobs.mark_published(r["result_key"])

    def _janitor(self) -> None:
        for uid in self.assembler.expired_unrouted(self.cfg.storage.unrouted_retention_h * 3600):
            self.spool.delete_series(uid)
            self.assembler.forget(uid)
            log_event(log, "spool.aged_out", series_uid=uid, reason="unrouted")
        cutoff = time.time() - self.cfg.storage.retention_days * 86400
        rows = self.assembler.conn.execute(
            "SELECT series_uid FROM series WHERE state = 'complete' AND completed_at <= ?", (cutoff,)
        ).fetchall()
        for r in rows:
            if self.jobs.series_done(r["series_uid"]):
                self.spool.delete_series(r["series_uid"])
                self.assembler.forget(r["series_uid"])
                log_event(log, "spool.aged_out", series_uid=r["series_uid"], reason="retention")

    # ---- job thread ------------------------------------------------------------------------
    def _job_loop(self) -> None:
        while not self._stop.is_set():
            job = self._job_jobs.claim_next()
            if job is None:
                if self._prefetch_next():
                    continue
                self._jobs_ready.wait(1.0)
                self._jobs_ready.clear()
                continue
            try:
                self._run_job(job)
            except EdgeAgentError as exc:
                self._job_failed(job.job_id, job.series_uid, job.model_name, f"{exc}", "error")
            except Exception as exc:  # noqa: BLE001 - a bug in one job must not stop the others
                log.exception("job.crashed")
                self._job_failed(job.job_id, job.series_uid, job.model_name,
                                 f"internal error: {type(exc).__name__}: {exc}", "error")

    def _prefetch_next(self) -> bool:
        """Decode the most recently offered quiet series in the worker; False when none is waiting."""
        latest = None
        while True:  # only the newest offer matters: the worker keeps one prefetched series
            try:
                latest = self._prefetch.get_nowait()
            except queue.Empty:
                break
        if latest is None or self.runner is None:
            return False
        instances = self.spool.instances_for_series(latest)
        if instances:
            self.runner.prefetch([inst.path for inst in instances])
        return True

    def _run_job(self, job: Any) -> None:
        assert self.runner is not None
        instances = tuple(self.spool.instances_for_series(job.series_uid))
        if not instances:
            self._job_jobs.mark(job.job_id, FAILED, error="series no longer in the spool")
            return
        first = instances[0]
        series = Series(first.study_uid, first.series_uid, first.modality, instances, job.revision,
                        first.series_description, first.body_part)
        t0 = time.monotonic()
        # the active variant, with FP32 fallback / shadow validation / rollback (agent/engines);
        # the prediction's model field names what actually produced it
        outcome = self.engines.run_job(job.job_id, series, job.model_name, self.runner.submit)
        if outcome.kind == "cancelled":  # we are shutting down: not the job's fault
            self._job_jobs.release(job.job_id)
            return
        if not outcome.ok or outcome.prediction is None:
            self._job_failed(job.job_id, job.series_uid, job.model_name, outcome.error, outcome.kind)
            return
        pred = outcome.prediction
        timings = dict(pred.timings_ms)
        timings["queue_to_result"] = round((time.monotonic() - t0) * 1000, 1)
        ref: ModelRef = pred.model
        rid = payloads.result_id(series.series_uid, ref.name, ref.version)
        result = Result(rid, job.revision, self.cfg.device_id, series.study_uid, series.series_uid,
                        type(pred)(pred.model, pred.task, pred.outputs, timings),
                        _iso(time.time()))
        patient = self._patient(first.path) if self.cfg.privacy.include_patient_identifiers else None
        payload = payloads.result_payload(
            result, patient=patient,
            include_patient_identifiers=self.cfg.privacy.include_patient_identifiers)
        key = f"{rid}:{job.revision}"
        # the outbox row and the job state change commit together: a crash leaves either both
        # (message will be sent) or neither (job re-runs), never a lost or doubled result
        with db.transaction(self._job_conn):
            self._job_outbox.put(self.topics.results, payload, qos=1, kind="result", dedup_key=key,
                                 in_transaction=True)
            self._job_jobs.mark(job.job_id, INFERRED, result_key=key, conn=self._job_conn)
        log_event(log, "job.inferred", job_id=job.job_id, model=ref.name, variant=ref.variant,
                  revision=job.revision, ms=timings.get("queue_to_result"))
        if self.publisher is not None:
            self.publisher.wake()

    def _job_failed(self, job_id: str, series_uid: str, model: str, error: str, kind: str) -> None:
        state = self._job_jobs.retry_or_fail(job_id, error, self.cfg.pipeline.max_attempts)
        log_event(log, "job.attempt_failed", logging.WARNING, job_id=job_id, kind=kind, error=error,
                  next_state=state)
        if state == FAILED:
            self._events.put(Event("job.failed", "error", f"inference failed: {error}",
                                   {"series_uid": series_uid, "model": model, "kind": kind,
                                    "attempts": self.cfg.pipeline.max_attempts}))
        else:
            self._jobs_ready.set()

    @staticmethod
    def _patient(path: Path) -> dict[str, str]:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PatientName", "PatientID", "PatientBirthDate"])
        return {"name": str(ds.get("PatientName", "")), "id": str(ds.get("PatientID", "")),
                "birth_date": str(ds.get("PatientBirthDate", ""))}
