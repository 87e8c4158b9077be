"""How stages report measurements without knowing who collects them.

A stage takes a ``Metrics`` (default ``NO_METRICS``) and calls ``observe(stage, seconds)`` for a
latency or ``count(name)`` for something that happened. ``agent.telemetry`` implements it and turns
what it collected into the telemetry snapshot (MQTT ``telemetry`` and Prometheus ``/metrics``).
Observing never changes the flow: an implementation must not raise and must be cheap (a lock and
an append), because the DICOM listener and the job thread call it on their hot paths.
"""

from __future__ import annotations

from typing import Literal, Protocol

#: pipeline stages whose latency is observed (docs/mqtt.md "telemetry")
Stage = Literal["receive", "assemble", "load", "preprocess", "inference", "postprocess", "publish"]
STAGES: tuple[Stage, ...] = ("receive", "assemble", "load", "preprocess", "inference", "postprocess", "publish")

#: things counted (monotonic counters, ``_total`` in Prometheus)
Counter = Literal[
    "associations_accepted",
    "associations_rejected",
    "instances_received",
    "instances_quarantined",
    "instances_refused",
    "series_completed",
    "jobs_inferred",
    "jobs_failed",
    "fallbacks",
    "demotions",
    "messages_published",
]
COUNTERS: tuple[Counter, ...] = (
    "associations_accepted", "associations_rejected", "instances_received", "instances_quarantined",
    "instances_refused", "series_completed", "jobs_inferred", "jobs_failed", "fallbacks", "demotions",
    "messages_published",
)


class Metrics(Protocol):
    def observe(self, stage: Stage, seconds: float) -> None: ...

    def count(self, name: Counter, n: int = 1) -> None: ...


class _NoMetrics:
    """Measures nothing (tests, tools, an agent with telemetry off)."""

    def observe(self, stage: Stage, seconds: float) -> None:
        return None

    def count(self, name: Counter, n: int = 1) -> None:
        return None


NO_METRICS: Metrics = _NoMetrics()
