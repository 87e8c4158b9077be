"""The telemetry thread: one snapshot per ``telemetry.interval_s``, on MQTT and ``/metrics``.

Each tick closes the collector's window (``agent.telemetry``), samples the host, reads the queue
depth, the publisher's health and the models that run, builds one ``TelemetrySnapshot`` and hands
the same object to the publisher (``telemetry`` topic, a bounded share of the outbox) and to the
Prometheus exporter when ``[metrics] listen`` is set, so both always agree. The first snapshot is
taken right after start so ``/metrics`` never serves nothing. The service runs ``step``
supervised (agent/service/supervisor.py), as a loop whose failure never ends the process: a failing
tick is logged, published (``loop.stalled``) and tried again with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.assembly import JobStore
from agent.assembly import jobs as job_states
from agent.core.config import Config
from agent.core.log import log_event
from agent.core.telemetry import ExportQueueSample
from agent.inference.runner import InferenceRunner
from agent.mqtt.publisher import MqttPublisher
from agent.telemetry import HostSampler, PrometheusExporter, TelemetryCollector, build_snapshot, model_sample
from agent.variants import VariantManager

log = logging.getLogger(__name__)


class TelemetryLoop:
    def __init__(self, cfg: Config, collector: TelemetryCollector, jobs: JobStore, publisher: MqttPublisher,
                 variants: VariantManager, runner: InferenceRunner,
                 exporter: PrometheusExporter | None = None) -> None:
        self.cfg = cfg
        self.collector = collector
        self.jobs = jobs
        self.publisher = publisher
        self.variants = variants
        self.runner = runner
        self.exporter = exporter
        self.sampler: HostSampler | None = None  # built on the thread: NVML is opened there
        self.sent = 0
        #: each [[export]] destination's queue (set by the service when export is configured)
        self.export_samples: Callable[[], tuple[ExportQueueSample, ...]] = tuple

    def step(self) -> float:
        """One snapshot, then the interval (the supervisor's step; the first call opens the host
        sampler on this thread: NVML is opened there)."""
        if self.sampler is None:
            self.sampler = HostSampler(self.cfg.storage.dir, spool_dir=self.cfg.spool_dir,
                                       quarantine_dir=self.cfg.quarantine_dir)
        self.tick()
        return self.cfg.telemetry.interval_s

    def close(self) -> None:
        """Close the host sampler (on the loop's thread, when it ends)."""
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None

    def tick(self) -> None:
        assert self.sampler is not None
        counts = self.jobs.counts()
        depth = counts.get(job_states.PENDING, 0) + counts.get(job_states.RUNNING, 0)
        outbox = self.publisher.outbox
        models = [model_sample(m, shadow_agreement=self.variants.shadow_agreement(m.name))
                  for m in self.variants.summary()]
        snapshot = build_snapshot(self.collector, self.sampler, seq=outbox.next_seq("telemetry"),
                                  interval_s=self.cfg.telemetry.interval_s, queue_depth=depth,
                                  health=self.publisher.health(), models=models,
                                  outbox_dropped=outbox.dropped(), worker_pid=self.runner.worker_pid,
                                  export=self.export_samples())
        self.publisher.publish_telemetry(snapshot, max_queued=self.cfg.telemetry.max_queued)
        if self.exporter is not None:
            self.exporter.update(snapshot)
        self.sent += 1
        if self.sent == 1:
            log_event(log, "telemetry.started", interval_s=self.cfg.telemetry.interval_s,
                      metrics_port=self.exporter.port if self.exporter is not None else "-")
