"""The telemetry snapshot: one interval's device health and pipeline figures, typed.

``agent.telemetry.build_snapshot`` makes one ``TelemetrySnapshot`` per ``telemetry.interval_s``;
the same object becomes the MQTT message (``agent.mqtt.payloads.telemetry_payload``, schema
``edge-agent/telemetry/1``) and the Prometheus ``/metrics`` text (``agent.telemetry.prometheus``),
so the two can never disagree. ``to_json()`` returns the wire form (the message minus ``schema``
and ``device_id``, which the payload builder adds); a field whose value the host does not expose
(a GPU's power on a Jetson, the worker's RSS before it started) is left out, never sent as null,
except ``shadow_agreement`` and ``last_error``, which are null by meaning ("not measured yet",
"no error").

Values are rounded when the snapshot is built (seconds to microseconds, percentages to 0.1), so
the JSON and the Prometheus text carry the very same numbers. Nothing here holds a UID or a
patient attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.core.util import iso_utc

GpuSource = Literal["nvml", "jetson"]


def _put(doc: dict[str, object], key: str, value: object) -> None:
    """Set ``doc[key]`` unless ``value`` is None (absent figures are left out of the message)."""
    if value is not None:
        doc[key] = value


@dataclass(frozen=True)
class GpuSample:
    """One GPU now. ``source``: where the figures came from (NVML, or a Jetson's sysfs); every
    figure is optional because drivers differ (a Jetson shares system memory and has no power
    counter in sysfs)."""

    index: int
    name: str
    source: GpuSource
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"index": self.index, "name": self.name, "source": self.source}
        for key in ("utilization_percent", "memory_used_bytes", "memory_total_bytes", "temperature_c", "power_w"):
            _put(doc, key, getattr(self, key))
        return doc


@dataclass(frozen=True)
class HostSample:
    """The host now: CPU (percent since the previous sample, all cores), load averages (1, 5, 15
    min), memory, temperatures by sensor (``"{chip}/{label}"`` -> °C, empty where the kernel exposes
    none), free bytes of the filesystem holding the state directory, bytes under ``spool/`` and
    ``quarantine/``, resident memory of the agent and of the inference worker (None: no worker)."""

    cpu_percent: float
    load_avg: tuple[float, float, float]
    memory_total_bytes: int
    memory_available_bytes: int
    temperatures_c: Mapping[str, float]
    state_dir_free_bytes: int
    spool_bytes: int
    quarantine_bytes: int
    agent_rss_bytes: int
    worker_rss_bytes: int | None = None
    gpus: tuple[GpuSample, ...] = ()

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "cpu_percent": self.cpu_percent, "load_avg": list(self.load_avg),
            "memory_total_bytes": self.memory_total_bytes, "memory_available_bytes": self.memory_available_bytes,
            "temperatures_c": dict(self.temperatures_c), "state_dir_free_bytes": self.state_dir_free_bytes,
            "spool_bytes": self.spool_bytes, "quarantine_bytes": self.quarantine_bytes,
            "agent_rss_bytes": self.agent_rss_bytes,
        }
        _put(doc, "worker_rss_bytes", self.worker_rss_bytes)
        return doc


@dataclass(frozen=True)
class LatencySummary:
    """One stage's latency: ``count`` observations in the window and their quantiles (None when
    the window had none), and since the agent started ``count_total`` and ``sum_total_s`` (what a
    Prometheus summary's ``_count`` and ``_sum`` are)."""

    count: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    count_total: int
    sum_total_s: float

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"count": self.count}
        for key in ("p50_s", "p95_s", "p99_s"):
            _put(doc, key, getattr(self, key))
        doc["count_total"] = self.count_total
        doc["sum_total_s"] = self.sum_total_s
        return doc


@dataclass(frozen=True)
class CounterValue:
    """A counter: ``total`` since the agent started, ``window`` in this snapshot's window."""

    total: int
    window: int

    def to_json(self) -> dict[str, object]:
        return {"total": self.total, "window": self.window}


@dataclass(frozen=True)
class PipelineSample:
    """The pipeline over the window: per-stage latency (every stage of ``agent.core.metrics.STAGES``),
    completed series and inferred jobs per hour, jobs pending now (``queue_depth``), the outbox
    backlog now and the telemetry/drift messages it dropped since the database was created (by
    kind), and every counter of ``agent.core.metrics.COUNTERS``."""

    latency: Mapping[str, LatencySummary]
    series_per_hour: float
    jobs_per_hour: float
    queue_depth: int
    outbox_pending: int
    outbox_oldest_age_s: float
    outbox_dropped: Mapping[str, int]
    counters: Mapping[str, CounterValue]

    def to_json(self) -> dict[str, object]:
        return {
            "latency": {k: v.to_json() for k, v in self.latency.items()},
            "series_per_hour": self.series_per_hour, "jobs_per_hour": self.jobs_per_hour,
            "queue_depth": self.queue_depth, "outbox_pending": self.outbox_pending,
            "outbox_oldest_age_s": self.outbox_oldest_age_s, "outbox_dropped": dict(self.outbox_dropped),
            "counters": {k: v.to_json() for k, v in self.counters.items()},
        }


@dataclass(frozen=True)
class ModelSample:
    """A model as it runs now; ``shadow_agreement``: the share of shadow runs that agreed with FP32
    (None before the first comparison, or when the model runs FP32)."""

    name: str
    version: str
    variant: str
    backend: str
    shadow_agreement: float | None = None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "variant": self.variant, "backend": self.backend,
                "shadow_agreement": self.shadow_agreement}


@dataclass(frozen=True)
class MqttSample:
    """The MQTT connection now (``agent.core.status.PublisherHealth`` less the outbox figures, which
    are in ``PipelineSample``)."""

    connected: bool
    status_seq: int
    inflight: int
    last_error: str | None

    def to_json(self) -> dict[str, object]:
        return {"connected": self.connected, "status_seq": self.status_seq, "inflight": self.inflight,
                "last_error": self.last_error}


@dataclass(frozen=True)
class ExportQueueSample:
    """One ``[[export]]`` destination's queue now (agent/export/queue.py): objects waiting (queued,
    retries included) and the age of the oldest in seconds; dead letters, refusals and deliveries
    in the state database (ever)."""

    destination: str
    queued: int
    oldest_age_s: float
    delivered: int
    dead_lettered: int
    refused: int

    def to_json(self) -> dict[str, object]:
        return {"destination": self.destination, "queued": self.queued, "oldest_age_s": self.oldest_age_s,
                "delivered": self.delivered, "dead_lettered": self.dead_lettered, "refused": self.refused}


@dataclass(frozen=True)
class TelemetrySnapshot:
    """One telemetry message. ``seq`` increases by one per message and is kept in the state
    database, so a consumer sees a gap when messages were dropped (outage beyond
    ``telemetry.max_queued``) or lost; ``created_at`` is epoch seconds; ``interval_s`` the
    configured interval; ``window_s`` the time the window really covered (the first one after a
    start is shorter); ``uptime_s`` since the agent started."""

    seq: int
    created_at: float
    interval_s: float
    window_s: float
    uptime_s: float
    host: HostSample
    pipeline: PipelineSample
    models: tuple[ModelSample, ...] = ()
    mqtt: MqttSample | None = None
    export: tuple[ExportQueueSample, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The wire form (``edge-agent/telemetry/1`` less ``schema`` and ``device_id``)."""
        doc: dict[str, object] = {
            "seq": self.seq, "created_at": iso_utc(self.created_at), "interval_s": self.interval_s,
            "window_s": self.window_s, "uptime_s": self.uptime_s, "host": self.host.to_json(),
            "gpus": [g.to_json() for g in self.host.gpus], "pipeline": self.pipeline.to_json(),
            "models": [m.to_json() for m in self.models], "export": [e.to_json() for e in self.export],
        }
        if self.mqtt is not None:
            doc["mqtt"] = self.mqtt.to_json()
        return doc
