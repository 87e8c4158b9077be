"""Who may command this device: signed operator commands (agent/core/envelope.py).

``CommandAuth.admit`` turns one ``cmd/#`` message into a ``Command`` or refuses it with a code:
the signature must verify with one of ``[control] operator_keys`` (Ed25519, the registry's key
format), the envelope must name this topic's command and this device (or ``"*"``), and its
``issued_at`` must be within ``max_age_s`` (and at most ``max_clock_skew_s`` ahead). The nonce is
checked and remembered by the dispatcher (``seen`` / ``remember``, durable in ``NonceStore``), so
a refused-as-busy command does not use its nonce up. With no operator keys configured, every
command is refused (``not_configured``) unless ``allow_unsigned`` (labs) lets the unsigned form in.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from agent.control.message import (
    Command,
    CommandRejected,
    check_model,
    command_name,
    decode_payload,
    parse_command,
    valid_cid,
)
from agent.control.nonces import NonceStore
from agent.core.config import ControlConfig
from agent.core.envelope import EnvelopeError, parse_envelope, peek_correlation_id, split_signed
from agent.core.errors import ConfigError, EdgeAgentError
from agent.core.log import log_event
from agent.core.signing import SignatureError, key_id, read_public_keys, verify_signature
from agent.core.topics import Topics

logger = logging.getLogger(__name__)

_ARGS = {"model"}


class CommandAuth:
    """Verifies commands for ``device_id`` against the PEM ``keys``; remembers nonces in ``nonces``."""

    def __init__(self, cfg: ControlConfig, device_id: str, keys: Sequence[bytes], nonces: NonceStore) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.keys: dict[str, bytes] = {key_id(k): k for k in keys}
        self.nonces = nonces

    @classmethod
    def from_config(cls, cfg: ControlConfig, device_id: str, conn: sqlite3.Connection) -> CommandAuth:
        """Read ``cfg.operator_keys`` now (ConfigError when one is unreadable or not Ed25519)."""
        try:
            keys = read_public_keys(cfg.operator_keys, "operator key")
        except SignatureError as exc:
            raise ConfigError(f"control.operator_keys: {exc}") from exc
        if not keys:
            log_event(logger, "control.no_operator_keys", logging.WARNING,
                      effect="unsigned commands accepted (lab)" if cfg.allow_unsigned else "every command refused")
        elif cfg.allow_unsigned:
            log_event(logger, "control.unsigned_allowed", logging.WARNING)
        return cls(cfg, device_id, keys, NonceStore(conn, margin_s=cfg.max_clock_skew_s))

    # ---------------------------------------------------------------------------------- checks

    def admit(self, topics: Topics, topic: str, payload: bytes, known: frozenset[str]) -> Command:
        """The Command in ``payload`` on ``topic``, or CommandRejected (with its code)."""
        doc = decode_payload(payload)
        if isinstance(doc, dict) and "signed" in doc:
            return self._signed(command_name(topics, topic), doc, known)
        if self.cfg.allow_unsigned:
            return parse_command(topics, topic, payload, known)
        cid = valid_cid(doc.get("correlation_id")) if isinstance(doc, dict) else None
        name = command_name(topics, topic)
        if name not in known:
            raise CommandRejected(f"unknown command {name!r} (known: {', '.join(sorted(known))})", cid,
                                  "unknown_command")
        raise CommandRejected("unsigned command refused: commands must be signed by an operator key "
                              "([control] operator_keys; edge-deploy command send)", cid, "unsigned")

    def _signed(self, name: str, doc: Mapping[str, Any], known: frozenset[str]) -> Command:
        try:
            msg = split_signed(doc)
        except EnvelopeError as exc:
            raise CommandRejected(str(exc), valid_cid(doc.get("correlation_id"))) from exc
        cid = valid_cid(peek_correlation_id(msg.signed))  # unverified: only to address the answer
        if name not in known:
            raise CommandRejected(f"unknown command {name!r} (known: {', '.join(sorted(known))})", cid,
                                  "unknown_command")
        if not self.keys:
            raise CommandRejected("no operator keys configured ([control] operator_keys): commands are disabled",
                                  cid, "not_configured")
        keys = list(self.keys.values())
        if msg.key_id is not None:
            if msg.key_id not in self.keys:
                raise CommandRejected(f"signed with key {msg.key_id}, which this device does not trust", cid,
                                      "unknown_key")
            keys = [self.keys[msg.key_id]]
        try:
            signer = verify_signature(msg.signed, msg.signature, keys)
        except SignatureError as exc:
            raise CommandRejected(f"bad signature: {exc}", cid, "bad_signature") from exc
        try:
            env = parse_envelope(msg.signed)
        except EnvelopeError as exc:
            raise CommandRejected(str(exc), cid) from exc
        cid = valid_cid(env.correlation_id)
        if cid is None:
            raise CommandRejected("correlation_id missing or not 1-128 printable ASCII characters without spaces")
        if env.command != name:
            raise CommandRejected(f"signed for cmd/{env.command}, received on cmd/{name}", cid, "not_for_device")
        if env.target not in (self.device_id, "*"):
            raise CommandRejected(f"addressed to device {env.target!r}, not this one", cid, "not_for_device")
        now = time.time()
        if env.issued_at < now - self.cfg.max_age_s:
            raise CommandRejected(f"stale: issued {now - env.issued_at:.0f} s ago, more than control.max_age_s "
                                  f"({self.cfg.max_age_s:g} s)", cid, "stale")
        if env.issued_at > now + self.cfg.max_clock_skew_s:
            raise CommandRejected(f"stale: issued {env.issued_at - now:.0f} s in the future, more than "
                                  f"control.max_clock_skew_s ({self.cfg.max_clock_skew_s:g} s)", cid, "stale")
        extra = sorted(set(env.args) - _ARGS)
        if extra:
            raise CommandRejected(f"unknown arg(s) {', '.join(extra)} (allowed: model)", cid)
        model = check_model(env.args.get("model"), cid)
        return Command(name, cid, model, now, env.nonce, signer, env.issued_at + self.cfg.max_age_s)

    # ----------------------------------------------------------------------------- replay

    def seen(self, cmd: Command) -> bool:
        """True when ``cmd``'s nonce was accepted before (a replay); unsigned commands have none."""
        return cmd.nonce is not None and self.nonces.seen(cmd.nonce)

    def remember(self, cmd: Command) -> None:
        """Record ``cmd``'s nonce durably before it is queued; CommandRejected (busy) if the database
        cannot take it (the command is not run, and may be sent again)."""
        if cmd.nonce is None:
            return
        try:
            self.nonces.remember(cmd.nonce, cmd.key_id or "", cmd.expires_at)
        except (sqlite3.Error, EdgeAgentError) as exc:
            raise CommandRejected(f"busy: cannot record the command's nonce ({exc}); try again later",
                                  cmd.correlation_id, "busy") from exc
