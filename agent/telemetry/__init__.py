"""Telemetry stage: device health and pipeline figures (docs/mqtt.md "telemetry", docs/fleet.md).

Collects what the stages measure (``agent.core.metrics.Metrics``) and what the host reports
(psutil, NVML, Jetson sysfs) into one ``TelemetrySnapshot`` per interval; the same snapshot is the
MQTT ``telemetry`` message and, when ``[metrics] listen`` is set, the Prometheus ``/metrics`` text.
"""
