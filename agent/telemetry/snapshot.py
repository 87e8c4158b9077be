"""One telemetry snapshot from the collector's window, a host sample and what the service knows.

``build_snapshot(collector, sampler, *, seq, interval_s, queue_depth, health, models, ...)``
closes the collector's window (``TelemetryCollector.take_window``), samples the host
(``HostSampler.sample``) and returns an ``agent.core.telemetry.TelemetrySnapshot``: latency
quantiles per stage, series and jobs per hour, counters in the window and since start, the outbox
backlog and MQTT state from ``PublisherHealth``, the models. ``model_sample`` turns the status
records the service already has into the snapshot's model entries.

Numbers are rounded here, once, so the MQTT message and the Prometheus text built from the same
snapshot carry identical values.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from agent.core.metrics import COUNTERS, STAGES
from agent.core.status import ModelSummary, PublisherHealth
from agent.core.telemetry import (
    CounterValue,
    ExportQueueSample,
    LatencySummary,
    ModelSample,
    MqttSample,
    PipelineSample,
    TelemetrySnapshot,
)
from agent.core.types import ModelRef
from agent.telemetry.collector import TelemetryCollector, Window, quantile
from agent.telemetry.host import HostSampler

_SECONDS = 6  # decimals of latencies (microseconds)


def model_sample(model: ModelSummary | ModelRef, shadow_agreement: float | None = None) -> ModelSample:
    """The snapshot's entry for a model the status message lists (``ModelSummary``) or a
    ``ModelRef``; ``shadow_agreement``: the guard's rate for the running variant
    (``GuardStatus.shadow_agreement``), None before the first comparison."""
    rate = None if shadow_agreement is None else round(float(shadow_agreement), 4)
    return ModelSample(model.name, model.version, model.variant, model.backend, rate)


def _latency(win: Window, stage: str) -> LatencySummary:
    values = sorted(win.samples.get(stage, ()))
    qs = [round(quantile(values, q), _SECONDS) if values else None for q in (0.5, 0.95, 0.99)]
    return LatencySummary(count=win.observed.get(stage, 0), p50_s=qs[0], p95_s=qs[1], p99_s=qs[2],
                          count_total=win.observed_total.get(stage, 0),
                          sum_total_s=round(win.seconds_total.get(stage, 0.0), _SECONDS))


def _per_hour(n: int, seconds: float) -> float:
    return round(n * 3600.0 / seconds, 3) if seconds > 0 else 0.0


def pipeline_sample(win: Window, *, queue_depth: int, health: PublisherHealth | None,
                    outbox_dropped: Mapping[str, int] | None = None) -> PipelineSample:
    """The pipeline part of a snapshot from a closed window and the service's figures."""
    return PipelineSample(
        latency={s: _latency(win, s) for s in STAGES},
        series_per_hour=_per_hour(win.counts.get("series_completed", 0), win.seconds),
        jobs_per_hour=_per_hour(win.counts.get("jobs_inferred", 0), win.seconds),
        queue_depth=max(0, int(queue_depth)),
        outbox_pending=health.outbox_pending if health is not None else 0,
        outbox_oldest_age_s=round(health.outbox_oldest_age_s, 1) if health is not None else 0.0,
        outbox_dropped={str(k): int(v) for k, v in (outbox_dropped or {}).items()},
        counters={c: CounterValue(win.counts_total.get(c, 0), win.counts.get(c, 0)) for c in COUNTERS},
    )


def build_snapshot(
    collector: TelemetryCollector,
    sampler: HostSampler,
    *,
    seq: int,
    interval_s: float,
    queue_depth: int,
    health: PublisherHealth | None,
    models: Iterable[ModelSample] = (),
    outbox_dropped: Mapping[str, int] | None = None,
    worker_pid: int | None = None,
    now: float | None = None,
    export: Iterable[ExportQueueSample] = (),
) -> TelemetrySnapshot:
    """Close the collector's window and return the snapshot of it (see the module docstring).

    ``seq``: the next telemetry seq (``Outbox.next_seq("telemetry")``); ``interval_s``: the
    configured interval; ``queue_depth``: jobs pending or running; ``health``:
    ``MqttPublisher.health()`` (None: no publisher, then ``mqtt`` is left out and the outbox figures
    are 0); ``models``: ``model_sample(...)`` per model; ``outbox_dropped``: ``Outbox.dropped()``;
    ``worker_pid``: the inference worker's pid (its RSS); ``now``: epoch seconds (default now);
    ``export``: each export destination's queue (``ExportQueue.samples``).
    """
    win = collector.take_window()
    host = sampler.sample(worker_pid)
    mqtt = None
    if health is not None:
        mqtt = MqttSample(health.connected, health.status_seq, health.inflight, health.last_error)
    return TelemetrySnapshot(
        seq=int(seq),
        created_at=round(time.time() if now is None else now, 3),
        interval_s=float(interval_s),
        window_s=round(win.seconds, 3),
        uptime_s=round(collector.uptime_s(), 1),
        host=host,
        pipeline=pipeline_sample(win, queue_depth=queue_depth, health=health, outbox_dropped=outbox_dropped),
        models=tuple(models),
        mqtt=mqtt,
        export=tuple(export),
    )
