"""The service: builds the agent from its stages, starts them in order and stops them in reverse.

    listener threads --Instance--> [instance queue] --> assembly thread --(jobs table)--> job thread
         |                                                                                   |
         +--Event--> [event sink] -----------------------------------------------------------+
                                                                                             v
                 MQTT publisher thread <------------------- outbox (SQLite) <-- Result / Event

Each stage owns its state (spool + instances, series + jobs, outbox) in the one SQLite file; each
thread has its own connection. Everything is constructed in ``__init__`` (``stages.build_stages``),
so ``stop()`` needs no guards. Start order: recovery (spool, jobs, series), inference worker,
publisher, command handlers, loops, listener; then ``READY=1`` (sd_notify, agent/service/notify.py):
the database is open and the DICOM listener receives into the durable spool. Model activation
(agent/variants: self-tests and timing, minutes on a first start) runs after READY on its own thread
(``STATUS=`` says so); the job thread claims no job until it is done, so jobs wait, neither failing
nor blamed on a model. On start-up, unfinished work is resumed: running jobs return to pending,
series the spool holds but the table lacks are re-opened, unsent messages stay in the outbox.

``run_forever`` (docs/lifecycle.md): SIGTERM/SIGINT stop gracefully (``shutdown``: new associations
rejected, open ones may finish, the running job may finish or is returned to pending untried, the
outbox is flushed while the broker answers, status offline, exit 0, all within
``service.stop_timeout_s``); SIGHUP reloads the configuration file (agent/service/reload.py,
``RELOADING=1`` ... ``READY=1``). With ``WATCHDOG_USEC`` set, ``WATCHDOG=1`` is sent only while the
receiver and the loops make progress (agent/service/lifecycle.py).

The assembly, job and telemetry loops run under one ``Supervisor`` (supervisor.py): a failing step
is logged, published (``loop.stalled`` / ``loop.recovered``) and retried with backoff; a loop that
cannot recover within ``supervision.give_up_after_s`` (or dies) makes ``run_forever`` return
``EXIT_LOOP_FAILED``, so the process exits non-zero and the service manager restarts it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.assembly import JobStore
from agent.assembly import jobs as job_states
from agent.control.auth import CommandAuth
from agent.control.commands import Command, CommandDispatcher
from agent.core import db
from agent.core.config import Config
from agent.core.errors import RegistryError
from agent.core.events import CommandResult
from agent.core.log import log_event
from agent.core.modelspec import ModelSpec
from agent.core.topics import Topics
from agent.core.util import iso_utc
from agent.inference.faults import file_fault
from agent.ingest import DEFAULT_STORAGE_SOP_CLASSES, DicomListener
from agent.mqtt import payloads
from agent.mqtt.outbox import Outbox
from agent.mqtt.publisher import MqttPublisher
from agent.service.assembly_loop import AssemblyLoop, PrefetchOffers
from agent.service.drift_feed import DriftFeed
from agent.service.event_sink import EventSink
from agent.service.export_loop import ExportLoop
from agent.service.janitor import Janitor
from agent.service.job_loop import JobLoop
from agent.service.lifecycle import StatusLine, Watchdog, WatchedParts, models_text
from agent.service.notify import Notifier
from agent.service.reload import ConfigReloader, ReloadTargets
from agent.service.stages import Stages, build_stages
from agent.service.supervisor import EXIT_LOOP_FAILED, Supervisor
from agent.service.telemetry_loop import TelemetryLoop
from agent.telemetry import PrometheusExporter, TelemetryCollector
from agent.updates.updater import ModelUpdater, updater_from_config

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


class Service:
    """The running agent. ``start()`` returns once it accepts DICOM; ``stop()`` shuts down.

    ``stages``: built from ``cfg`` when not given; a test that builds them itself passes the
    ``events`` sink whose ``put`` it gave ``build_stages``."""

    def __init__(self, cfg: Config, *, fault_injection: bool = False, stages: Stages | None = None,
                 events: EventSink | None = None, config_path: Path | str | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path is not None else None
        self.fault_injection = fault_injection  # test-only: EDGE_AGENT_FAULT(_FILE) honoured
        self.notifier = notifier or Notifier()
        self.phase = "starting"  # the STATUS= line's first words
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.started_at = time.time()
        self._birth_seq = 0
        self._stop = threading.Event()
        # what every stage measures, turned into telemetry (MQTT and /metrics) by its own thread
        self.metrics = TelemetryCollector()
        # before the stages, so the variant manager can report events from its first activation on
        self.events = events or EventSink(self.topics.events, cfg.device_id, self.metrics, cfg.events)
        self.stages = stages or build_stages(cfg, self.events.put, fault_injection=fault_injection)
        s = self.stages
        self.models: dict[str, ModelSpec] = s.variants.specs()
        self.specs = list(self.models.values())
        self.updater: ModelUpdater | None = (
            updater_from_config(cfg, s.variants.activate, self.events.put, probe=s.variants.probe)
            if cfg.registry.enabled() else None)
        self.commands = self._command_dispatcher()
        self.publisher = MqttPublisher(cfg.mqtt, cfg.device_id, s.outbox, birth=self._birth,
                                       on_command=self.commands,
                                       reconnect_delay_s=(1.0, max(1.0, cfg.mqtt.reconnect_max_s)),
                                       metrics=self.metrics)
        self.events.on_written(self.publisher.wake)
        self.supervisor = Supervisor(cfg.supervision, self.events.put)
        jobs_ready = threading.Event()
        prefetch = PrefetchOffers()
        janitor = Janitor(cfg.storage, s.spool, s.assembler, s.jobs)
        self.assembly = AssemblyLoop(cfg.pipeline, s.assembler, s.jobs, s.outbox, self.events, janitor,
                                     prefetch, jobs_ready, self.metrics)
        self.drift = (DriftFeed(cfg.drift, s.drift, s.variants, self.publisher, self.events.put)
                      if s.drift is not None else None)
        self.job_loop = JobLoop(cfg, self.topics, s.job, s.spool, s.runner, s.variants, self.events,
                                prefetch, jobs_ready, self.metrics, self.drift)
        self.exporter = PrometheusExporter(cfg.metrics.listen) if cfg.metrics.listen else None
        self.telemetry = TelemetryLoop(cfg, self.metrics, s.telemetry_jobs, self.publisher, s.variants,
                                       s.runner, self.exporter)
        self.job_loop.on_result = self.publisher.wake
        # ---- export (issue 15, docs/export.md): DICOM SEG/SR to [[export]], after the result's commit
        self.export_loop = ExportLoop(cfg, s.exports, self.events.put) if s.exports is not None else None
        if self.export_loop is not None:
            self.job_loop.on_export = self.export_loop.wake.set
            if s.telemetry_exports is not None:
                names, queue = [d.name for d in cfg.export], s.telemetry_exports
                self.telemetry.export_samples = lambda: queue.samples(names)
        # ---- end export
        self._jobs_ready = jobs_ready
        self.listener = DicomListener(cfg.dicom, s.spool, sop_classes_for(self.specs),
                                      on_instance=self.assembly.instances.put, on_event=self.events.put,
                                      metrics=self.metrics)
        beats = self.supervisor.heartbeats
        self.job_loop.on_busy = lambda seconds: beats.busy("jobs", seconds)
        self.job_loop.claiming.clear()  # until the models are activated (start())
        self.watchdog = Watchdog(self.notifier, WatchedParts(
            accepting=lambda: self.listener.accepting, spool_dir=cfg.spool_dir / ".tmp", heartbeats=beats,
            drain_beat=lambda: self.publisher.last_beat, clock=time.monotonic,
            worker_busy_until=lambda: s.runner.busy_until), cfg.service.watchdog_stall_s)
        self.status = StatusLine(self.notifier, self.status_text, cfg.service.status_interval_s)
        self.reloader = ConfigReloader(cfg, self.config_path, ReloadTargets(
            self.listener, s.assembler, s.drift, dict(self.models)), self.events.put)
        self._activation: threading.Thread | None = None
        self._status_db: tuple[JobStore, Outbox] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        s = self.stages
        respooled = s.spool.reconcile()
        recovered = s.jobs.recover()
        reconciled = s.assembler.reconcile(s.spool.series_summary())
        log_event(log, "service.recovered", instances_reindexed=respooled, jobs_requeued=recovered,
                  series_reopened=reconciled, outbox_pending=s.outbox.count())
        s.runner.start()
        s.variants.attach_runner(s.runner)
        self.publisher.start()
        if self.exporter is not None:
            self.exporter.start()  # /metrics on loopback ([metrics] listen)
        self.commands.start()
        sup = self.supervisor
        sup.spawn("assembly", self.assembly.step, self._stop)
        sup.spawn("jobs", self._job_step, self._stop)
        sup.spawn("telemetry", self.telemetry.step, self._stop, critical=False, finally_=self.telemetry.close)
        if self.export_loop is not None:  # not critical: exports wait in state.db, the data path goes on
            sup.spawn("export", self.export_loop.step, self._stop, critical=False)
        port = self.listener.start()
        self.phase = "receiving; activating models"
        self.notifier.ready(self.status_text())  # the listener answers; the spool takes what it receives
        self.watchdog.start()
        self.status.start()
        self._activation = threading.Thread(target=self._activate, name="edge-activation", daemon=True)
        self._activation.start()
        log_event(log, "service.started", version=__version__, device_id=self.cfg.device_id,
                  dicom_port=port, models=",".join(self.models) or "-")

    def _activate(self) -> None:
        """After READY: activate every installed model (stored choices are reused in milliseconds; a
        version new to this device is self-tested and timed), load the drift references, then let
        the job thread claim jobs. A failure is logged per model (engine.start_failed) and the jobs
        of that model try again when they run (agent/variants/jobs.py)."""
        t0 = time.monotonic()
        try:
            while self.fault_injection and file_fault() == "slow-activation" and not self._stop.wait(0.2):
                pass  # test-only: an activation that takes as long as the test wants
            if not self._stop.is_set():
                self.stages.variants.start()
            if self.drift is not None and not self._stop.is_set():
                self.drift.start(list(self.models))  # references loaded, a first drift message each
            if self.updater is not None and not self._stop.is_set():
                self.updater.start_polling()  # registry.poll_interval_s; 0: only on cmd/update
        except Exception:  # noqa: BLE001 - jobs still run; each activates its model when it runs
            log.exception("service.activation_failed")
        finally:
            if not self._stop.is_set():
                self.phase = "ready"
                self.job_loop.claiming.set()
                self.status.refresh()
                self._announce_models()
            log_event(log, "service.models_activated", models=",".join(self.models) or "-",
                      seconds=round(time.monotonic() - t0, 3))

    def _announce_models(self) -> None:
        """The retained status again, now naming the variants that run (the birth sent while they
        were activating did not): through the outbox, in order, with the connection's ``seq``."""
        try:
            status = payloads.restamp_status(self._birth(), seq=self.publisher.status_seq, state="online")
            self.publisher.outbox.put(self.topics.status, status, qos=1, retain=True, kind="event")
            self.publisher.wake()
        except Exception:  # noqa: BLE001 - the next connect's birth says the same
            log.exception("service.status_refresh_failed")

    def _job_step(self) -> float:
        """The job thread's step; with fault injection, ``wedge-jobs`` blocks it (no heartbeat)."""
        while self.fault_injection and file_fault() == "wedge-jobs" and not self._stop.is_set():
            time.sleep(0.1)
        return self.job_loop.step()

    def stop(self) -> None:
        """Stop now (tests, a fatal loop): loops, worker and listener end; nothing is waited for
        beyond the bounds below. ``shutdown`` is the graceful stop of a SIGTERM."""
        self._stop.set()
        self._jobs_ready.set()
        if self.export_loop is not None:
            self.export_loop.wake.set()
        self.watchdog.stop()
        self.listener.stop()
        self.supervisor.join(timeout=30)
        self._stop_rest(publisher_timeout_s=5)

    def _stop_rest(self, *, publisher_timeout_s: float) -> None:
        if self.updater is not None:
            self.updater.stop()  # an update in progress finishes (it self-tests in the runner)
        self.commands.stop()
        self.stages.runner.stop()
        self.stages.variants.close()
        if self.exporter is not None:
            self.exporter.stop()
        self.publisher.stop(timeout=publisher_timeout_s)  # retained status: offline
        self.status.stop()
        self.stages.spool.close()
        log_event(log, "service.stopped")

    def shutdown(self) -> None:
        """The graceful stop (SIGTERM), within ``service.stop_timeout_s`` in all (docs/lifecycle.md):

        1. STOPPING=1; new associations are rejected (A-ASSOCIATE-RJ, transient), open ones may
           finish for ``stop_associations_s``, then the listener closes (aborting what is left: an
           instance not yet acknowledged is the peer's to send again);
        2. no new job is claimed; the running one may finish for ``stop_job_s``, then the worker is
           stopped and the job goes back to pending without counting as an attempt;
        3. the loops end, events still queued are written to the outbox, and the outbox is sent for
           ``stop_flush_s`` while the broker answers; the retained status goes offline.

        Whatever is left is durable (spool, jobs, outbox) and resumed by the next start."""
        svc = self.cfg.service
        t0 = time.monotonic()
        deadline = t0 + svc.stop_timeout_s

        def left(share: float) -> float:
            return max(0.0, min(share, deadline - time.monotonic() - 2.0))  # 2 s kept for the last steps

        self.phase = "stopping"
        self.watchdog.stop()
        self.notifier.stopping(self.status_text())
        log_event(log, "service.stopping", budget_s=svc.stop_timeout_s)
        still_open = self.listener.drain(left(svc.stop_associations_s))
        self.listener.stop()
        self.job_loop.claiming.clear()
        job_done = self.job_loop.parked.wait(left(svc.stop_job_s))
        self._stop.set()
        self._jobs_ready.set()
        if self.export_loop is not None:
            self.export_loop.wake.set()  # an export in flight is left queued, sent by the next start
        self.stages.runner.stop()  # a job still running is cancelled: released, not an attempt
        loops_ended = self.supervisor.join(timeout=left(svc.stop_timeout_s))
        if loops_ended:  # the assembly thread's connection is free: write what it had not
            self._flush_events()
        unsent = self._flush_outbox(left(svc.stop_flush_s)) if loops_ended else -1
        self._stop_rest(publisher_timeout_s=max(0.5, min(5.0, deadline - time.monotonic() - 0.5)))
        log_event(log, "service.shutdown", seconds=round(time.monotonic() - t0, 3),
                  associations_aborted=still_open, job_interrupted=not job_done, loops_ended=loops_ended,
                  outbox_unsent=unsent)

    def _flush_outbox(self, timeout_s: float) -> int:
        """Let the publisher send the outbox for at most ``timeout_s`` while connected; the rows
        left (the next start sends them)."""
        deadline = time.monotonic() + timeout_s
        outbox = self.stages.outbox  # the assembly thread's connection: that thread has ended
        while (n := outbox.count()) and self.publisher.connected and time.monotonic() < deadline:
            self.publisher.wake()
            time.sleep(0.05)
        return n

    def run_forever(self) -> int:
        """Start, serve until SIGTERM/SIGINT (graceful stop, 0) or a loop gave up (3); SIGHUP reloads."""
        wake = threading.Event()
        asked: set[str] = set()

        def _signal(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            asked.add("reload" if signum == signal.SIGHUP else "stop")
            wake.set()
            log_event(log, "service.signal", signal=name)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _signal)
        self.start()
        fatal = self.supervisor.fatal
        try:
            while "stop" not in asked and not fatal.is_set():
                wake.wait(0.5)
                wake.clear()
                if "reload" in asked and "stop" not in asked:
                    asked.discard("reload")
                    self.reload()
        finally:
            if fatal.is_set():
                log_event(log, "service.exiting", logging.CRITICAL, reason=self.supervisor.failure,
                          exit_code=EXIT_LOOP_FAILED)
                self._flush_events()
                self.stop()
            else:
                self.shutdown()
        return EXIT_LOOP_FAILED if fatal.is_set() else 0

    def reload(self) -> bool:
        """SIGHUP: RELOADING=1, the file read again and applied (reload.py), READY=1. True when it
        was valid (an invalid one changes nothing and is reported as config.reload_failed)."""
        phase, self.phase = self.phase, "reloading"
        self.notifier.reloading()
        try:
            outcome = self.reloader.reload()
        finally:
            self.phase = phase
            self.notifier.ready(self.status_text())
        return outcome.KIND == "config.reloaded"

    def status_text(self) -> str:
        """The STATUS= line: phase, models with their variant, queue depth, outbox backlog, broker,
        drift states."""
        if self._status_db is None:
            conn = db.connect(self.cfg.db_path, busy_timeout_s=1.0)
            self._status_db = (JobStore(conn), Outbox(conn))
        jobs, outbox = self._status_db
        try:
            counts = jobs.counts()
            queue = str(counts.get(job_states.PENDING, 0) + counts.get(job_states.RUNNING, 0))
            backlog = str(outbox.count())
        except Exception:  # noqa: BLE001 - a busy database: the line says so, the service goes on
            queue = backlog = "?"
        broker = "connected" if self.publisher.connected else "disconnected"
        drift = "off" if self.drift is None else (
            ", ".join(f"{m} {st}" for m, st in sorted(self.drift.states.items())) or "no reference yet")
        return (f"{self.phase}; models: {models_text(self.stages.variants.summary())}; queue {queue}; "
                f"outbox {backlog}; broker {broker}; drift: {drift}")

    def _flush_events(self) -> None:
        """Before a fatal exit: write what the event sink still holds (``loop.failed``) when the
        database takes it, so it goes out with the publisher's last drain or after the restart."""
        try:
            self.events.drain(self.stages.outbox)
        except Exception as exc:  # noqa: BLE001 - the database may be what failed; we exit anyway
            log_event(log, "service.events_unwritten", logging.ERROR, error=str(exc))

    @property
    def dicom_port(self) -> int:
        return self.listener.port

    # ---- status ----------------------------------------------------------------------------
    def _birth(self) -> bytes:
        self._birth_seq += 1
        variants = self.stages.variants
        device = variants.probe.summary()
        return payloads.status_payload(
            device_id=self.cfg.device_id, state="online", version=__version__,
            started_at=iso_utc(self.started_at), seq=self._birth_seq,
            capabilities={"backends": list(device.backends), "dicom_ae_title": self.cfg.dicom.ae_title},
            models=variants.summary(),
            device=device,
        )

    # ---- model updates and commands (docs/mqtt.md "Commands") -----------------------------------
    def _command_dispatcher(self) -> CommandDispatcher:
        """The handlers of ``cmd/update``, ``cmd/rollback`` and ``cmd/selftest``; their events go to
        the outbox."""

        def updater() -> ModelUpdater:
            if self.updater is None:
                raise RegistryError("no registry configured ([registry] url and public_key)")
            return self.updater

        def update(c: Command) -> CommandResult:
            return updater().pull_now([c.model] if c.model else None, correlation_id=c.correlation_id)

        def rollback(c: Command) -> CommandResult:
            return updater().rollback(c.model, correlation_id=c.correlation_id)

        def selftest(c: Command) -> CommandResult:
            return self.stages.variants.selftest(c.model, correlation_id=c.correlation_id)

        def followed() -> set[str]:  # a command may name only these ([registry] models, installed, loaded)
            return set(self.cfg.registry.models) | set(self.models) | set(self.stages.store.models())

        ctl = self.cfg.control
        auth = CommandAuth.from_config(ctl, self.cfg.device_id, db.connect(
            self.cfg.db_path, busy_timeout_s=self.cfg.supervision.db_busy_timeout_s))
        return CommandDispatcher(self.topics, {"update": update, "rollback": rollback, "selftest": selftest},
                                 self.events.put, auth=auth, followed=followed, max_pending=ctl.max_pending,
                                 max_pending_per_command=ctl.max_pending_per_command,
                                 rejections_per_minute=ctl.rejections_per_minute, urgent={"rollback"})
