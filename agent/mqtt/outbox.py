"""The durable outbox: every MQTT message we must not lose is a row here until its PUBACK.

Producers ``put`` a message (a committed SQLite row, durable before ``put`` returns); the MQTT
publisher reads ``pending`` rows in ``seq`` order, publishes them with QoS 1 and calls ``ack``
from the PUBACK callback, which deletes the row. A crash at any point leaves the row in place, so
it is published again after restart: delivery is at least once, in ``seq`` order of first
arrival, and consumers de-duplicate on ``(result_id, revision)``.

Tables owned here: ``outbox`` (the messages) and ``outbox_meta`` (the status ``seq`` counter,
kept across restarts so fleet monitoring sees it only ever increase).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Literal

from agent.core.errors import StorageError

Kind = Literal["result", "event"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    qos        INTEGER NOT NULL DEFAULT 1,
    retain     INTEGER NOT NULL DEFAULT 0,
    kind       TEXT    NOT NULL CHECK (kind IN ('result', 'event')),
    dedup_key  TEXT    UNIQUE,
    created_at REAL    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class OutboxMessage:
    """One pending row of the outbox."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    dedup_key: str | None
    created_at: float  # epoch seconds
    attempts: int  # times handed to the MQTT client so far


class Outbox:
    """SQLite-backed FIFO of MQTT messages (table ``outbox`` in the state database).

    Takes a connection from ``agent.core.db.connect`` (autocommit mode). Every method holds one lock
    around its statements because the publisher uses the outbox from two threads (its drain
    thread and paho's network thread). Give the publisher its own connection: a connection that
    is inside a caller's ``transaction()`` must not be shared with the drain thread, or its acks
    would join (and roll back with) the caller's transaction.

    ``put`` is one INSERT, so a caller may run it inside ``with transaction(conn):`` on its own
    connection together with its job-state update, making "enqueued" and "job published-pending"
    one atomic step.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._lock = threading.RLock()
        try:
            with self._lock:
                if conn.in_transaction:
                    self._create_in_tx()
                else:
                    self.conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create the outbox table: {exc}") from exc

    def _create_in_tx(self) -> None:
        # executescript() would COMMIT the caller's open transaction; run the statements singly.
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                self.conn.execute(stmt)

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        kind: Kind = "result",
        dedup_key: str | None = None,
        in_transaction: bool = False,
    ) -> int:
        """Enqueue one message; returns its ``seq``.

        With a ``dedup_key`` (for results ``f"{result_id}:{revision}"``) a second put of the same
        key while the first is still pending is a no-op that returns the first row's ``seq``, so
        re-enqueuing after a crash does not publish twice. (Once the row was acknowledged and
        deleted, the same key enqueues again: consumers still de-duplicate.) The row is committed
        when this returns, unless the caller holds an open transaction on this connection.
        ``in_transaction=True`` states that the caller does (``with transaction(conn):`` around
        the put and its job-state update); it is checked, because committing the row on its own
        would silently break the caller's atomicity.
        """
        if in_transaction and not self.conn.in_transaction:
            raise StorageError("outbox put with in_transaction=True outside a transaction")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos {qos!r}: 0, 1 or 2")
        if kind not in ("result", "event"):
            raise ValueError(f"kind {kind!r}: 'result' or 'event'")
        try:
            with self._lock:
                cur = self.conn.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain, kind, dedup_key, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedup_key) DO NOTHING",
                    (topic, bytes(payload), qos, int(retain), kind, dedup_key, time.time()),
                )
                if cur.rowcount == 1 and cur.lastrowid is not None:
                    return int(cur.lastrowid)
                row = self.conn.execute(
                    "SELECT seq FROM outbox WHERE dedup_key = ?", (dedup_key,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write to the outbox: {exc}") from exc
        if row is None:  # pragma: no cover - the conflict row cannot vanish under our lock
            raise StorageError(f"outbox conflict on {dedup_key!r} but no such row")
        return int(row[0])

    def has(self, dedup_key: str) -> bool:
        """True while a row with ``dedup_key`` waits for its PUBACK."""
        try:
            with self._lock:
                row = self.conn.execute("SELECT 1 FROM outbox WHERE dedup_key = ?", (dedup_key,)).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc
        return row is not None

    def pending(self, limit: int = 100, *, after: int = 0) -> list[OutboxMessage]:
        """Up to ``limit`` rows with ``seq > after``, oldest (lowest ``seq``) first."""
        try:
            with self._lock:
                rows = self.conn.execute(
                    "SELECT seq, topic, payload, qos, retain, kind, dedup_key, created_at, attempts"
                    " FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, max(0, int(limit))),
                ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc
        return [
            OutboxMessage(
                seq=int(r[0]), topic=str(r[1]), payload=bytes(r[2]), qos=int(r[3]), retain=bool(r[4]),
                kind=str(r[5]), dedup_key=r[6], created_at=float(r[7]), attempts=int(r[8]),
            )
            for r in rows
        ]

    def ack(self, seq: int) -> bool:
        """Delete row ``seq`` (its PUBACK arrived); returns False when it was already gone."""
        try:
            with self._lock:
                cur = self.conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot delete outbox row {seq}: {exc}") from exc
        return cur.rowcount == 1

    def mark_attempt(self, seq: int) -> None:
        """Count one more hand-over of row ``seq`` to the MQTT client (visible to operators)."""
        try:
            with self._lock:
                self.conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", (seq,))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot update outbox row {seq}: {exc}") from exc

    def count(self) -> int:
        """Number of rows waiting for their PUBACK."""
        try:
            with self._lock:
                return int(self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc

    def oldest_age_s(self) -> float:
        """Age in seconds of the oldest pending row; 0.0 when the outbox is empty."""
        try:
            with self._lock:
                row = self.conn.execute("SELECT MIN(created_at) FROM outbox").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc
        if row is None or row[0] is None:
            return 0.0
        return max(0.0, time.time() - float(row[0]))

    def next_status_seq(self) -> int:
        """Increment and return the persistent status ``seq`` (1 on a fresh database).

        Kept in the database so the ``seq`` of status messages increases across restarts too:
        a consumer that sees it jump knows it missed a (re)connect of the device.
        """
        try:
            with self._lock:
                cur = self.conn.execute(
                    "INSERT INTO outbox_meta (key, value) VALUES ('status_seq', 1)"
                    " ON CONFLICT (key) DO UPDATE SET value = value + 1 RETURNING value"
                )
                row = cur.fetchone()
                cur.close()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot update the status seq: {exc}") from exc
        return int(row[0])
