"""The service: builds the agent from its stages, starts them in order and stops them in reverse.

    listener threads --Instance--> [instance queue] --> assembly thread --(jobs table)--> job thread
         |                                                                                   |
         +--Event--> [event sink] -----------------------------------------------------------+
                                                                                             v
                 MQTT publisher thread <------------------- outbox (SQLite) <-- Result / Event

Each stage owns its state (spool + instances, series + jobs, outbox) in the one SQLite file; each
thread has its own connection. Everything is constructed in ``__init__`` (``stages.build_stages``),
so ``stop()`` needs no guards. Start order: recovery (spool, jobs, series), inference worker +
variant activation (agent/variants), publisher, command handlers, loops, listener (last, so nothing
is acknowledged before it can be processed); stop in reverse. On start-up, unfinished work is
resumed: running jobs return to pending, series the spool holds but the table lacks are re-opened,
unsent messages stay in the outbox.

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
from typing import Any

from agent import __version__
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
from agent.ingest import DEFAULT_STORAGE_SOP_CLASSES, DicomListener
from agent.mqtt import payloads
from agent.mqtt.publisher import MqttPublisher
from agent.service.assembly_loop import AssemblyLoop, PrefetchOffers
from agent.service.drift_feed import DriftFeed
from agent.service.event_sink import EventSink
from agent.service.export_loop import ExportLoop
from agent.service.janitor import Janitor
from agent.service.job_loop import JobLoop
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
                 events: EventSink | None = None) -> None:
        self.cfg = cfg
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
        # before the publisher, so the birth message names the variants that will run: stored
        # choices are reused (milliseconds); a version new to this device is self-tested and timed
        s.variants.start()
        self.publisher.start()
        if self.drift is not None:
            self.drift.start(list(self.models))  # references loaded, a first drift message each
        if self.exporter is not None:
            self.exporter.start()  # /metrics on loopback ([metrics] listen)
        self.commands.start()
        if self.updater is not None:
            self.updater.start_polling()  # registry.poll_interval_s; 0: only on cmd/update
        sup = self.supervisor
        sup.spawn("assembly", self.assembly.step, self._stop)
        sup.spawn("jobs", self.job_loop.step, self._stop)
        sup.spawn("telemetry", self.telemetry.step, self._stop, critical=False, finally_=self.telemetry.close)
        if self.export_loop is not None:  # not critical: exports wait in state.db, the data path goes on
            sup.spawn("export", self.export_loop.step, self._stop, critical=False)
        port = self.listener.start()
        log_event(log, "service.started", version=__version__, device_id=self.cfg.device_id,
                  dicom_port=port, models=",".join(self.models) or "-")

    def stop(self) -> None:
        self._stop.set()
        self._jobs_ready.set()
        if self.export_loop is not None:
            self.export_loop.wake.set()
        self.listener.stop()
        self.supervisor.join(timeout=30)
        if self.updater is not None:
            self.updater.stop()  # an update in progress finishes (it self-tests in the runner)
        self.commands.stop()
        self.stages.runner.stop()
        self.stages.variants.close()
        if self.exporter is not None:
            self.exporter.stop()
        self.publisher.stop(timeout=5)
        self.stages.spool.close()
        log_event(log, "service.stopped")

    def run_forever(self) -> int:
        done = threading.Event()

        def _signal(signum: int, _frame: Any) -> None:
            log_event(log, "service.signal", signal=signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        fatal = self.supervisor.fatal
        try:
            while not done.wait(0.5) and not fatal.is_set():
                pass
        finally:
            if fatal.is_set():
                log_event(log, "service.exiting", logging.CRITICAL, reason=self.supervisor.failure,
                          exit_code=EXIT_LOOP_FAILED)
                self._flush_events()
            self.stop()
        return EXIT_LOOP_FAILED if fatal.is_set() else 0

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
