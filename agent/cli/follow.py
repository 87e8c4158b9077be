"""Backend of ``edge-agent results --follow``: subscribe to result messages and print them.

Each valid result becomes one short block (model, shortened series UID, organ volumes in mL or
label and confidence); ``raw`` prints each message's JSON as received instead. Patient
identifiers, when a device is configured to include them, are never shown in the pretty form
(only the fact that they are present).
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.core.errors import PublishError
from agent.core.topics import Topics
from agent.mqtt.payloads import parse_event, parse_result

_CONNECT_TIMEOUT_S = 10.0


def short_uid(uid: str, keep: int = 8) -> str:
    """``1.2.826.0.1.3680043.8.498.1234...5678`` style: head and tail of a long UID."""
    if len(uid) <= 2 * keep + 3:
        return uid
    return f"{uid[:keep]}...{uid[-keep:]}"


def format_result(doc: dict[str, Any]) -> str:
    """One human-readable block for a validated result message (see ``parse_result``)."""
    m = doc["model"]
    lines = [
        f"result {doc['result_id'][:8]}  rev {doc['revision']}  device {doc['device_id']}  {doc['created_at']}",
        f"  model   {m['name']} {m['version']} ({m['variant']}, {m['backend']}/{m['precision']})",
        f"  series  {short_uid(doc['series_uid'])}  study {short_uid(doc['study_uid'])}",
    ]
    out = doc["outputs"]
    if doc["task"] == "segmentation":
        labels = out["labels"]
        if not labels:
            lines.append("  (no labels)")
        else:
            width = max(12, *(len(name) for name in labels))
            lines.append(f"  {'label':<{width}} {'volume mL':>10} {'voxels':>10}")
            for name, info in labels.items():
                lines.append(f"  {name:<{width}} {info['volume_ml']:>10.1f} {info['voxels']:>10d}")
    else:
        lines.append(f"  label   {out['label']}  (confidence {out['confidence']:.3f})")
        probs = sorted(out["probabilities"].items(), key=lambda kv: -kv[1])
        if probs:
            lines.append("  probs   " + "  ".join(f"{k} {v:.3f}" for k, v in probs))
    timings = doc.get("timings_ms") or {}
    if timings:
        lines.append("  timing  " + ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items()))
    if "patient" in doc:
        lines.append("  patient identifiers included (not shown; use --raw)")
    return "\n".join(lines)


def format_event(doc: dict[str, Any]) -> str:
    """One line for a validated event message."""
    fields = " ".join(f"{k}={v}" for k, v in doc.get("fields", {}).items())
    return f"event [{doc['severity']}] {doc['kind']} device {doc['device_id']}: {doc['message']}" + (
        f"  ({fields})" if fields else ""
    )


def follow_results(
    host: str,
    port: int,
    topic_prefix: str,
    device_id: str = "+",
    *,
    protocol: str = "5",
    count: int | None = None,
    timeout: float | None = None,
    out: TextIO | None = None,
    raw: bool = False,
    events: bool = False,
    username: str | None = None,
    password: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Subscribe to ``{topic_prefix}/{device_id}/results`` and print each message to ``out``.

    ``device_id`` ``"+"`` follows every device; ``events`` also follows ``.../events``. Returns
    the number of messages printed, after ``count`` messages or ``timeout`` seconds (whichever
    comes first; neither: until interrupted). ``on_ready`` is called once the subscription is
    acknowledged (results are not retained: only messages published after that are seen).
    Raises PublishError when the broker cannot be reached or refuses the connection.
    """
    out = sys.stdout if out is None else out
    topics = Topics(topic_prefix, device_id)
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"edge-agent-follow-{os.urandom(4).hex()}",
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        clean_session=None if protocol == "5" else True,
    )
    if username is not None:
        client.username_pw_set(username, password)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            inbox.put(("refused", str(rc)))
            return
        subs = [(topics.results, 1)] + ([(topics.events, 1)] if events else [])
        c.subscribe(subs)
        inbox.put(("connected", None))

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, props: Any) -> None:
        inbox.put(("subscribed", None))

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        inbox.put(("message", (msg.topic, bytes(msg.payload))))

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise PublishError(f"cannot reach the MQTT broker at {host}:{port}: {exc}") from exc

    printed = 0
    client.loop_start()
    try:
        kind, value = inbox.get(timeout=_CONNECT_TIMEOUT_S)
        if kind == "refused":
            raise PublishError(f"MQTT broker at {host}:{port} refused the connection: {value}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while count is None or printed < count:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                kind, value = inbox.get(timeout=wait)
            except queue.Empty:
                break
            if kind == "subscribed" and on_ready is not None:
                on_ready()
            if kind != "message":
                continue
            topic, payload = value
            out.write(_render(topic, payload, raw) + "\n")
            out.flush()
            printed += 1
    except queue.Empty as exc:
        raise PublishError(f"no CONNACK from the MQTT broker at {host}:{port}") from exc
    finally:
        client.disconnect()
        client.loop_stop()
    return printed


def _render(topic: str, payload: bytes, raw: bool) -> str:
    if raw:
        return payload.decode("utf-8", errors="replace")
    is_event = topic.endswith("/events")
    try:
        doc = parse_event(payload) if is_event else parse_result(payload)
    except PublishError as exc:
        # Never echo an invalid payload: it may be anything, including identifiers.
        first = str(exc).splitlines()[0]
        return f"invalid message on {topic} ({len(payload)} bytes): {first}"
    return format_event(doc) if is_event else format_result(doc)

