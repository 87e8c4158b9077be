"""Telemetry stage: device health and pipeline figures (docs/mqtt.md "telemetry", docs/fleet.md).

Collects what the stages measure (``agent.core.metrics.Metrics``) and what the host reports
(psutil, NVML, Jetson sysfs) into one ``TelemetrySnapshot`` per interval; the same snapshot is the
MQTT ``telemetry`` message and, when ``[metrics] listen`` is set, the Prometheus ``/metrics`` text.

``collector``   TelemetryCollector (the Metrics every stage is given), count_event
``host``        HostSampler: psutil, temperatures, NVML / Jetson GPUs, spool and quarantine sizes
``snapshot``    build_snapshot(collector, sampler, ...) -> TelemetrySnapshot; model_sample
``prometheus``  PrometheusExporter: the latest snapshot as Prometheus text on a loopback address
"""

from __future__ import annotations

from agent.telemetry.collector import EVENT_COUNTERS, TelemetryCollector, Window, count_event
from agent.telemetry.host import HostSampler
from agent.telemetry.prometheus import PrometheusExporter, metric_families
from agent.telemetry.snapshot import build_snapshot, model_sample

__all__ = [
    "EVENT_COUNTERS",
    "HostSampler",
    "PrometheusExporter",
    "TelemetryCollector",
    "Window",
    "build_snapshot",
    "count_event",
    "metric_families",
    "model_sample",
]
