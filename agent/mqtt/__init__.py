"""MQTT stage: durable outbox, MQTT publisher, message payloads (see docs/mqtt.md).

Takes results, events, telemetry snapshots and drift reports from the pipeline, writes them to the
``outbox`` table (durable before ``put`` returns; telemetry and drift with a bounded share) and
sends them to the broker in order, deleting each row only on its PUBACK.
"""

from __future__ import annotations

from agent.core.topics import Topics
from agent.mqtt.outbox import BOUNDED_KINDS, Outbox, OutboxMessage
from agent.mqtt.payloads import (
    DRIFT_SCHEMA,
    EVENT_SCHEMA,
    RESULT_SCHEMA,
    STATUS_SCHEMA,
    TELEMETRY_SCHEMA,
    drift_payload,
    event_payload,
    parse_drift,
    parse_event,
    parse_result,
    parse_status,
    parse_telemetry,
    restamp_status,
    result_id,
    result_payload,
    status_payload,
    telemetry_payload,
)
from agent.mqtt.publisher import MqttPublisher, result_dedup_key

__all__ = [
    "BOUNDED_KINDS",
    "DRIFT_SCHEMA",
    "EVENT_SCHEMA",
    "RESULT_SCHEMA",
    "STATUS_SCHEMA",
    "TELEMETRY_SCHEMA",
    "MqttPublisher",
    "Outbox",
    "OutboxMessage",
    "Topics",
    "drift_payload",
    "event_payload",
    "parse_drift",
    "parse_event",
    "parse_result",
    "parse_status",
    "parse_telemetry",
    "restamp_status",
    "result_dedup_key",
    "result_id",
    "result_payload",
    "status_payload",
    "telemetry_payload",
]
