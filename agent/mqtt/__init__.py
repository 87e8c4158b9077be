"""MQTT stage: durable outbox, MQTT publisher, message payloads (see docs/mqtt.md).

Takes results and events from the pipeline, writes them to the ``outbox`` table (durable before
``put`` returns) and sends them to the broker in order, deleting each row only on its PUBACK.
"""

from __future__ import annotations

from agent.core.topics import Topics
from agent.mqtt.outbox import Outbox, OutboxMessage
from agent.mqtt.payloads import (
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
from agent.mqtt.publisher import MqttPublisher, result_dedup_key

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
