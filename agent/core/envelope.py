"""The signed envelope of an operator command (MQTT ``{prefix}/{device_id}/cmd/{name}``).

Shared by the device, which verifies (agent/control/), and the operator's tool, which signs
(``edge-deploy command``). The message on the wire is a JSON object::

    {"signed": "<the envelope: compact JSON text>", "signature": "<base64 Ed25519 over its UTF-8 bytes>",
     "key_id": "<optional: which operator key signed, a hint only>"}

and the envelope, the only part the signature covers, is::

    {"v": 1, "command": "rollback", "target": "dev-7" | "*", "args": {"model": "ct-abdomen-seg"},
     "issued_at": "2026-05-01T10:00:00.000Z", "nonce": "<32 hex digits>", "correlation_id": "op-42"}

The device verifies the signature over the exact UTF-8 bytes of ``signed`` (never re-serialising),
then parses it; ``target`` must be its device id (or ``"*"``: every device that trusts the key),
``command`` must be the topic's last level, ``issued_at`` must be fresh and ``nonce`` unseen.
Keys and signatures are those of the model registry (agent.core.signing, ``edge-deploy keygen``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.errors import EdgeAgentError
from agent.core.util import iso_utc

__all__ = ["ENVELOPE_VERSION", "CommandEnvelope", "EnvelopeError", "SignedMessage", "encode_signed", "peek_correlation_id",
           "new_envelope", "parse_envelope", "split_signed"]

ENVELOPE_VERSION = 1
_ENVELOPE_FIELDS = {"v", "command", "target", "args", "issued_at", "nonce", "correlation_id"}
_OUTER_FIELDS = {"signed", "signature", "key_id"}


class EnvelopeError(EdgeAgentError):
    """A signed command message whose form is wrong (not a verification failure)."""


@dataclass(frozen=True)
class CommandEnvelope:
    """What an operator signs: ``command`` for ``target`` with ``args`` at ``issued_at`` (epoch s)."""

    command: str
    target: str
    correlation_id: str
    issued_at: float
    nonce: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The envelope's JSON text (sorted keys, compact), the bytes the signature covers."""
        doc = {"v": ENVELOPE_VERSION, "command": self.command, "target": self.target, "args": dict(self.args),
               "issued_at": iso_utc(self.issued_at), "nonce": self.nonce, "correlation_id": self.correlation_id}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()


@dataclass(frozen=True)
class SignedMessage:
    """A message in the signed form: the exact ``signed`` bytes, the signature, the key id hint."""

    signed: bytes
    signature: bytes
    key_id: str | None


def new_envelope(command: str, target: str, correlation_id: str, args: Mapping[str, Any] | None = None,
                 *, issued_at: float | None = None, nonce: str | None = None) -> CommandEnvelope:
    """An envelope issued now with a fresh random nonce (both overridable, for tests)."""
    return CommandEnvelope(command, target, correlation_id, time.time() if issued_at is None else issued_at,
                           nonce or secrets.token_hex(16), dict(args or {}))


def encode_signed(envelope: CommandEnvelope, sign: Any, key_id: str | None = None) -> bytes:
    """The wire message for ``envelope``; ``sign(data) -> 64 bytes`` (an Ed25519 private key's sign)."""
    data = envelope.to_bytes()
    doc = {"signed": data.decode(), "signature": base64.b64encode(sign(data)).decode()}
    if key_id:
        doc["key_id"] = key_id
    return json.dumps(doc).encode()


def split_signed(doc: Mapping[str, Any]) -> SignedMessage:
    """The signed form of a decoded message object; EnvelopeError when it is not well formed."""
    extra = sorted(set(doc) - _OUTER_FIELDS)
    if extra:
        raise EnvelopeError(f"unknown field(s) {', '.join(extra)} beside a signed envelope "
                            "(allowed: signed, signature, key_id)")
    signed, sig, kid = doc.get("signed"), doc.get("signature"), doc.get("key_id")
    if not isinstance(signed, str) or not isinstance(sig, str):
        raise EnvelopeError("signed and signature must both be strings")
    if kid is not None and not isinstance(kid, str):
        raise EnvelopeError("key_id must be a string")
    try:
        raw_sig = base64.b64decode(sig, validate=True)
        data = signed.encode("utf-8")
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise EnvelopeError(f"signature is not base64 or signed is not text: {exc}") from exc
    return SignedMessage(data, raw_sig, kid)


def parse_envelope(data: bytes) -> CommandEnvelope:
    """Parse the (already verified) envelope bytes; EnvelopeError naming what is wrong."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"signed envelope is not UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise EnvelopeError("signed envelope must be a JSON object")
    if doc.get("v") != ENVELOPE_VERSION:
        raise EnvelopeError(f"envelope version {doc.get('v')!r} is not {ENVELOPE_VERSION}")
    missing = sorted(_ENVELOPE_FIELDS - set(doc))
    extra = sorted(set(doc) - _ENVELOPE_FIELDS)
    if missing or extra:
        raise EnvelopeError(f"envelope fields: missing {', '.join(missing) or '-'}, unknown {', '.join(extra) or '-'}")
    for name in ("command", "target", "issued_at", "nonce", "correlation_id"):
        if not isinstance(doc[name], str):
            raise EnvelopeError(f"envelope {name} must be a string")
    if not isinstance(doc["args"], dict):
        raise EnvelopeError("envelope args must be a JSON object")
    nonce = doc["nonce"]
    if not 16 <= len(nonce) <= 128 or not nonce.isascii() or not nonce.isalnum():
        raise EnvelopeError("nonce must be 16-128 ASCII letters or digits")
    return CommandEnvelope(doc["command"], doc["target"], doc["correlation_id"], _parse_time(doc["issued_at"]),
                           nonce, doc["args"])


def peek_correlation_id(data: bytes) -> str | None:
    """The correlation id an unverified envelope claims (only to address a refusal to its sender)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    cid = doc.get("correlation_id") if isinstance(doc, dict) else None
    return cid if isinstance(cid, str) else None


def _parse_time(value: str) -> float:
    try:
        when = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise EnvelopeError(f"issued_at {value!r} is not an ISO 8601 time") from exc
    if when.tzinfo is None:
        raise EnvelopeError(f"issued_at {value!r} has no time zone (use UTC, ...Z)")
    return when.timestamp()
