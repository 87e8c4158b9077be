"""One command message: what the dispatcher runs (``Command``), why one is refused
(``CommandRejected`` with a ``code``), and the payload checks shared by the signed form
(agent/control/auth.py) and the unsigned lab form (``parse_command``).

Refusal codes (``command.rejected`` ``code``; docs/mqtt.md "Commands"): ``malformed``,
``unknown_command``, ``unsigned``, ``not_configured`` (no operator keys), ``unknown_key``,
``bad_signature``, ``stale``, ``replay``, ``not_for_device``, ``model_not_followed``,
``duplicate`` (a correlation id seen before), ``busy`` (queue full; the id is not used up).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Literal

from agent.core.errors import EdgeAgentError
from agent.core.topics import Topics

MAX_PAYLOAD = 64 * 1024
_CORRELATION_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_FIELDS = {"correlation_id", "model"}

RejectCode = Literal["malformed", "unknown_command", "unsigned", "not_configured", "unknown_key", "bad_signature",
                     "stale", "replay", "not_for_device", "model_not_followed", "duplicate", "busy"]


@dataclasses.dataclass(frozen=True)
class Command:
    """One accepted command: its ``name`` (the topic's last level), the sender's
    ``correlation_id``, the ``model`` it targets (None: the handler's default) and when it arrived.
    A signed command also carries its ``nonce``, the ``key_id`` that signed it and until when its
    nonce must be remembered (``expires_at``)."""

    name: str
    correlation_id: str
    model: str | None
    received_at: float
    nonce: str | None = None
    key_id: str | None = None
    expires_at: float = 0.0


class CommandRejected(EdgeAgentError):
    """A command message that cannot be run; the message is the reason sent back, ``code`` its kind."""

    def __init__(self, reason: str, correlation_id: str | None = None, code: RejectCode = "malformed") -> None:
        super().__init__(reason)
        self.correlation_id = correlation_id
        self.code: RejectCode = code


def command_name(topics: Topics, topic: str) -> str:
    prefix = topics.base + "/cmd/"
    return topic[len(prefix):] if topic.startswith(prefix) else ""


def decode_payload(payload: bytes) -> Any:
    """The payload as JSON (None when empty); CommandRejected when too large or not UTF-8 JSON."""
    if len(payload) > MAX_PAYLOAD:
        raise CommandRejected(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    try:
        return json.loads(payload.decode("utf-8")) if payload.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandRejected(f"payload is not UTF-8 JSON: {exc}") from exc


def valid_cid(value: object) -> str | None:
    return value if isinstance(value, str) and _CORRELATION_ID.match(value) else None


def check_model(model: object, cid: str | None) -> str | None:
    if model is not None and (not isinstance(model, str) or not _MODEL.match(model)):
        raise CommandRejected(f"model {model!r} is not a model name", cid)
    return model


def parse_command(topics: Topics, topic: str, payload: bytes, known: set[str] | frozenset[str]) -> Command:
    """Validate one unsigned message on ``cmd/#`` (``{"correlation_id": ..., "model": ...}``, the
    lab form, see ``[control] allow_unsigned``); returns the Command or raises CommandRejected.

    The correlation id is read first (when the payload is a JSON object), so even a rejection of
    an otherwise broken command can be matched by the sender.
    """
    name = command_name(topics, topic)
    doc = decode_payload(payload)
    cid = valid_cid(doc.get("correlation_id")) if isinstance(doc, dict) else None
    if name not in known:
        raise CommandRejected(f"unknown command {name!r} (known: {', '.join(sorted(known))})", cid,
                              "unknown_command")
    if not isinstance(doc, dict):
        raise CommandRejected('payload must be a JSON object like {"correlation_id": "..."}', cid)
    extra = sorted(set(doc) - _FIELDS)
    if extra:
        raise CommandRejected(f"unknown field(s) {', '.join(extra)} (allowed: correlation_id, model)", cid)
    if cid is None:
        raise CommandRejected("correlation_id missing or not 1-128 printable ASCII characters without spaces")
    return Command(name, cid, check_model(doc.get("model"), cid), time.time())
