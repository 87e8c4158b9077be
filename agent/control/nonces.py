"""Nonces of accepted signed commands, remembered in the state database for as long as the
command could still pass the freshness check, so a replay is refused even after a restart.

Table ``command_nonces`` (owned here): ``nonce`` (primary key), ``key_id`` (which operator key
signed it), ``expires_at`` (epoch seconds: issued_at + max_age_s; rows are purged a clock-skew
margin after that, when a replay would be refused as stale anyway). Every write commits with
``synchronous=FULL`` (agent.core.db), so a nonce a device acted on is on disk before the command
is queued.
"""

from __future__ import annotations

import sqlite3
import time

from agent.core.db import transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS command_nonces (
    nonce TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    expires_at REAL NOT NULL
)
"""


class NonceStore:
    """``seen`` / ``remember`` on the dispatcher's own connection (used from one thread at a time)."""

    def __init__(self, conn: sqlite3.Connection, *, margin_s: float = 0.0) -> None:
        self.conn = conn
        self.margin_s = margin_s
        conn.execute(_SCHEMA)

    def seen(self, nonce: str) -> bool:
        return self.conn.execute("SELECT 1 FROM command_nonces WHERE nonce = ?", (nonce,)).fetchone() is not None

    def remember(self, nonce: str, key_id: str, expires_at: float) -> None:
        """Record ``nonce`` (durably) and forget the ones past their window."""
        with transaction(self.conn):
            self.conn.execute("DELETE FROM command_nonces WHERE expires_at < ?", (time.time() - self.margin_s,))
            self.conn.execute("INSERT OR IGNORE INTO command_nonces (nonce, key_id, expires_at) VALUES (?, ?, ?)",
                              (nonce, key_id, expires_at))

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM command_nonces").fetchone()[0])
