"""Publish stage: durable outbox, MQTT publisher, message payloads (see docs/mqtt.md).

Takes results and events from the pipeline, writes them to the ``outbox`` table (durable before
``put`` returns) and sends them to the broker in order, deleting each row only on its PUBACK.
"""

from __future__ import annotations

from agent.publish.mqtt import MqttPublisher, result_dedup_key
from agent.publish.outbox import Outbox, OutboxMessage
from agent.publish.payloads import (
    EVENT_SCHEMA,
    RESULT_SCHEMA,
    STATUS_SCHEMA,
    event_payload,
    parse_event,
    parse_result,
    parse_status,
    restamp_status,
    result_id,
    result_payload,
    status_payload,
)
from agent.publish.topics import Topics

__all__ = [
    "EVENT_SCHEMA",
    "RESULT_SCHEMA",
    "STATUS_SCHEMA",
    "MqttPublisher",
    "Outbox",
    "OutboxMessage",
    "Topics",
    "event_payload",
    "parse_event",
    "parse_result",
    "parse_status",
    "restamp_status",
    "result_dedup_key",
    "result_id",
    "result_payload",
    "status_payload",
]
