"""Fleet-monitoring messages: device telemetry and per-model drift (docs/mqtt.md).

``telemetry_payload(snapshot, device_id)`` takes an ``agent.core.telemetry.TelemetrySnapshot``
and returns the ``edge-agent/telemetry/1`` message (compact UTF-8 JSON) for
``{prefix}/{device_id}/telemetry``; ``drift_payload(report, device_id, seq)`` takes an
``agent.core.drift.DriftReport`` and returns the ``edge-agent/drift/1`` message for
``{prefix}/{device_id}/drift``. ``parse_telemetry`` / ``parse_drift`` validate received bytes
against the pydantic models below (the contract as code) and return the message as a dict.

Both go through the outbox as the bounded kinds ``telemetry`` and ``drift`` (QoS 1, not retained):
during a long outage the oldest are dropped, and their ``seq`` (one counter per kind, kept in the
state database) shows consumers the gap. Neither carries a UID or a patient attribute.
Re-exported by ``agent.mqtt.payloads``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.core.drift import DriftReport
from agent.core.telemetry import TelemetrySnapshot
from agent.core.util import iso_utc
from agent.mqtt.wire import dumps, finite, jsonable, parse

TELEMETRY_SCHEMA = "edge-agent/telemetry/1"
DRIFT_SCHEMA = "edge-agent/drift/1"


class _Strict(BaseModel):
    # as in payloads: nested objects refuse unknown keys (catches a builder's typo in the tests),
    # the top-level messages allow them (a newer minor revision may add fields)
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------ telemetry


class TelemetryHost(_Strict):
    cpu_percent: float = Field(ge=0, le=100)
    load_avg: list[float] = Field(min_length=3, max_length=3, description="1, 5 and 15 minute load averages")
    memory_total_bytes: int = Field(ge=0)
    memory_available_bytes: int = Field(ge=0)
    temperatures_c: dict[str, float] = Field(description="'{chip}/{label}' -> degrees Celsius; {} when none")
    state_dir_free_bytes: int = Field(ge=0)
    spool_bytes: int = Field(ge=0)
    quarantine_bytes: int = Field(ge=0)
    agent_rss_bytes: int = Field(ge=0)
    worker_rss_bytes: int | None = Field(None, ge=0, description="absent while no inference worker runs")


class TelemetryGpu(_Strict):
    index: int = Field(ge=0)
    name: str
    source: Literal["nvml", "jetson"]
    utilization_percent: float | None = Field(None, ge=0, le=100)
    memory_used_bytes: int | None = Field(None, ge=0)
    memory_total_bytes: int | None = Field(None, ge=0)
    temperature_c: float | None = None
    power_w: float | None = Field(None, ge=0)


class TelemetryLatency(_Strict):
    count: int = Field(ge=0, description="observations in the window")
    p50_s: float | None = Field(None, ge=0)
    p95_s: float | None = Field(None, ge=0)
    p99_s: float | None = Field(None, ge=0)
    count_total: int = Field(ge=0, description="observations since the agent started")
    sum_total_s: float = Field(ge=0)


class TelemetryCounter(_Strict):
    total: int = Field(ge=0, description="since the agent started")
    window: int = Field(ge=0, description="in this message's window")


class TelemetryPipeline(_Strict):
    latency: dict[str, TelemetryLatency]
    series_per_hour: float = Field(ge=0)
    jobs_per_hour: float = Field(ge=0)
    queue_depth: int = Field(ge=0, description="jobs waiting or running")
    outbox_pending: int = Field(ge=0)
    outbox_oldest_age_s: float = Field(ge=0)
    outbox_dropped: dict[str, int] = Field(description="telemetry/drift rows dropped beyond their cap, ever")
    counters: dict[str, TelemetryCounter]


class TelemetryModel(_Strict):
    name: str
    version: str
    variant: str
    backend: str
    shadow_agreement: float | None = Field(ge=0, le=1)


class TelemetryMqtt(_Strict):
    connected: bool
    status_seq: int = Field(ge=0)
    inflight: int = Field(ge=0)
    last_error: str | None


class TelemetryExport(_Strict):
    destination: str
    queued: int = Field(ge=0, description="objects waiting, retries included")
    oldest_age_s: float = Field(ge=0)
    delivered: int = Field(ge=0)
    dead_lettered: int = Field(ge=0)
    refused: int = Field(ge=0)


class TelemetryMessage(BaseModel):
    """``edge-agent/telemetry/1``: one interval of device health and pipeline figures."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_: Literal["edge-agent/telemetry/1"] = Field(alias="schema")
    device_id: str
    seq: int = Field(ge=1)
    created_at: str
    interval_s: float = Field(gt=0)
    window_s: float = Field(ge=0)
    uptime_s: float = Field(ge=0)
    host: TelemetryHost
    gpus: list[TelemetryGpu]
    pipeline: TelemetryPipeline
    models: list[TelemetryModel]
    mqtt: TelemetryMqtt | None = None
    export: list[TelemetryExport] = Field(default_factory=list)


def telemetry_payload(snapshot: TelemetrySnapshot, device_id: str) -> bytes:
    """Build the ``edge-agent/telemetry/1`` message of ``snapshot`` (its ``to_json()`` plus
    ``schema`` and ``device_id``). Raises PublishError for a value JSON cannot carry."""
    return dumps({"schema": TELEMETRY_SCHEMA, "device_id": device_id, **snapshot.to_json()})


def parse_telemetry(data: bytes | str) -> dict[str, Any]:
    """Validate a telemetry message; returns it as a dict, raises PublishError when it is invalid."""
    return parse(TelemetryMessage, data)


# ---------------------------------------------------------------------------------------- drift


class DriftSignalModel(_Strict):
    name: str
    state: Literal["ok", "warn", "alert"]
    statistic: str
    value: float
    warn: float | None = Field(description="threshold in force for this window size; null: the signal has none")
    alert: float | None
    detail: dict[str, Any] | None = None


class DriftWindow(_Strict):
    size: int = Field(ge=1, description="drift.window: series the signals are computed on when full")
    series: int = Field(ge=0, description="series in the window now")


class DriftMessage(BaseModel):
    """``edge-agent/drift/1``: one model's live traffic against its reference profile."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_: Literal["edge-agent/drift/1"] = Field(alias="schema")
    device_id: str
    model: str
    version: str
    state: Literal["ok", "warn", "alert"]
    phase: Literal["collecting", "monitoring", "no_reference"]
    window: DriftWindow
    min_series: int = Field(ge=1)
    since: str
    responsible: list[str]
    signals: list[DriftSignalModel]
    created_at: str
    seq: int = Field(ge=1)


def _signal(doc: dict[str, object]) -> dict[str, object]:
    out = dict(doc)
    out["value"] = finite(float(str(doc["value"])), f"drift signal {doc['name']}")
    for key in ("warn", "alert"):
        # an infinite threshold means "this level is never reached": JSON has no Infinity
        v = float(str(doc[key]))
        out[key] = v if math.isfinite(v) else None
    if "detail" in out:
        out["detail"] = jsonable(out["detail"])
    return out


def drift_payload(report: DriftReport, device_id: str, seq: int, *, created_at: float | None = None) -> bytes:
    """Build the ``edge-agent/drift/1`` message of ``report``.

    ``seq``: the next drift ``seq`` (``Outbox.next_seq("drift")``); ``created_at``: epoch seconds
    (now when None). ``responsible`` names the signals at the model's state (empty when ok).
    Raises PublishError when a signal's value is not a finite number.
    """
    doc: dict[str, Any] = {
        "schema": DRIFT_SCHEMA,
        "device_id": device_id,
        "model": report.model,
        "version": report.version,
        "state": report.state,
        "phase": report.phase,
        "window": {"size": int(report.window_size), "series": int(report.series_in_window)},
        "min_series": int(report.min_series),
        "since": iso_utc(report.since),
        "responsible": list(report.responsible()),
        "signals": [_signal(s.to_json()) for s in report.signals],
        "created_at": iso_utc(created_at),
        "seq": int(seq),
    }
    return dumps(doc)


def parse_drift(data: bytes | str) -> dict[str, Any]:
    """Validate a drift message; returns it as a dict, raises PublishError when it is invalid."""
    return parse(DriftMessage, data)
