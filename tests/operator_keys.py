"""Operator keys for tests: a real Ed25519 pair made by ``edge-deploy keygen --name operator``, and
signed command messages in the wire form the agent verifies (agent/core/envelope.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from agent.control.auth import CommandAuth
from agent.control.nonces import NonceStore
from agent.core.config import ControlConfig
from agent.core.envelope import encode_signed, new_envelope
from agent.core.signing import key_id
from deploy.sign import keygen, load_private_key


class OperatorKey:
    """``edge-deploy keygen --name operator`` in ``folder``; ``sign`` makes command messages."""

    def __init__(self, folder: Path, name: str = "operator") -> None:
        self.private, self.public = keygen(folder, force=True, name=name)
        self.key = load_private_key(self.private)
        self.key_id = key_id(self.public.read_bytes())

    def sign(self, command: str, cid: str, *, device: str, model: str | None = None,
             args: dict[str, Any] | None = None, issued_at: float | None = None, nonce: str | None = None,
             with_key_id: bool = True) -> bytes:
        env = new_envelope(command, device, cid, args if args is not None else ({"model": model} if model else {}),
                           issued_at=issued_at, nonce=nonce)
        return encode_signed(env, self.key.sign, self.key_id if with_key_id else None)

    def auth(self, device: str, conn: sqlite3.Connection | None = None, **cfg: Any) -> CommandAuth:
        """A CommandAuth trusting this key (nonces in ``conn``, default an in-memory database)."""
        control = ControlConfig(operator_keys=[self.public], **cfg)
        return CommandAuth(control, device, [self.public.read_bytes()],
                           NonceStore(conn or sqlite3.connect(":memory:", check_same_thread=False)))
