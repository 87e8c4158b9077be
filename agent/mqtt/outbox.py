"""The durable outbox: every MQTT message we must not lose is a row here until its PUBACK.

Producers ``put`` a message (a committed SQLite row, durable before ``put`` returns); the MQTT
publisher reads ``pending`` rows in ``seq`` order, publishes them with QoS 1 and calls ``ack``
from the PUBACK callback, which deletes the row. A crash at any point leaves the row in place, so
it is published again after restart: delivery is at least once, in ``seq`` order of first
arrival, and consumers de-duplicate on ``(result_id, revision)``.

Kinds: ``result`` and ``event`` rows are never dropped. ``telemetry``, ``drift`` and ``refusal``
rows (events about refused peer traffic, on the events topic: ``agent.core.events.REFUSAL_KINDS``
and their ``events.suppressed`` summaries) get a bounded share (``BOUNDED_KINDS``): the put that takes a kind over its cap deletes that kind's
oldest rows in the same transaction, so a long broker outage costs at most ``max_queued`` rows of
each and the newest figures survive. What was dropped is counted in ``outbox_meta``
(``dropped()``), and the messages' own ``seq`` (``next_seq``) shows the gap to consumers.

Tables owned here: ``outbox`` (the messages) and ``outbox_meta`` (the persistent ``seq`` counters
of status, telemetry and drift messages, kept across restarts so fleet monitoring sees them only
ever increase, and the dropped-row counters). A database written by an older agent (whose
``outbox.kind`` CHECK lacks a kind of today's) is migrated on open, rows and ``seq`` kept.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.core.errors import StorageError
from agent.core.log import log_event

logger = logging.getLogger(__name__)

Kind = Literal["result", "event", "telemetry", "drift", "refusal"]
KINDS: tuple[Kind, ...] = ("result", "event", "telemetry", "drift", "refusal")
#: kinds whose oldest rows are dropped beyond a cap; results and events never are
BOUNDED_KINDS: tuple[Kind, ...] = ("telemetry", "drift", "refusal")
#: caps when the caller configures none (the defaults of [telemetry], [drift] max_queued and
#: [events] max_queued_refusals)
DEFAULT_CAPS: Mapping[str, int] = {"telemetry": 120, "drift": 200, "refusal": 500}
#: persistent message counters (``next_seq``); "status" is the status messages' (birth, Will)
SeqName = Literal["status", "telemetry", "drift"]

_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    qos        INTEGER NOT NULL DEFAULT 1,
    retain     INTEGER NOT NULL DEFAULT 0,
    kind       TEXT    NOT NULL CHECK (kind IN ('result', 'event', 'telemetry', 'drift', 'refusal')),
    dedup_key  TEXT    UNIQUE,
    created_at REAL    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0
)"""
_META = "CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
# the trim of a bounded kind walks that kind's rows newest first
_INDEX = "CREATE INDEX IF NOT EXISTS outbox_kind_seq ON outbox (kind, seq)"
_COLUMNS = "seq, topic, payload, qos, retain, kind, dedup_key, created_at, attempts"


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

    Takes a connection from ``agent.core.db.connect`` (autocommit mode) and optionally ``caps``:
    kind -> most rows of that kind kept (``telemetry``/``drift`` only; ``DEFAULT_CAPS`` for a kind
    not given). Every method holds one lock around its statements because the publisher uses the
    outbox from two threads (its drain thread and paho's network thread). Give the publisher its
    own connection: a connection that is inside a caller's ``transaction()`` must not be shared
    with the drain thread, or its acks would join (and roll back with) the caller's transaction.

    ``put`` of a result or event is one INSERT, so a caller may run it inside ``with
    transaction(conn):`` on its own connection together with its job-state update, making
    "enqueued" and "job published-pending" one atomic step. ``put`` of a bounded kind is the
    INSERT and the trim in one transaction (the caller's, or its own).
    """

    def __init__(self, conn: sqlite3.Connection, *, caps: Mapping[str, int] | None = None) -> None:
        self.conn = conn
        self._lock = threading.RLock()
        self._caps = dict(DEFAULT_CAPS)
        for kind, cap in (caps or {}).items():
            self._caps[kind] = self._checked_cap(kind, cap)
        try:
            with self._lock, self._tx():
                self._create()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create the outbox table: {exc}") from exc

    # -------------------------------------------------------------------------------- schema

    def _tx(self) -> _Tx:
        """The caller's open transaction, or BEGIN IMMEDIATE ... COMMIT of our own."""
        return _Tx(self.conn)

    def _create(self) -> None:
        # Statements one by one, never executescript(): that would COMMIT a caller's transaction.
        self.conn.execute(_TABLE.format(name="outbox"))
        self.conn.execute(_META)
        row = self.conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone()
        if row is not None and "'refusal'" not in str(row[0]):
            self._migrate()
        self.conn.execute(_INDEX)

    def _migrate(self) -> None:
        """Rebuild an older agent's ``outbox`` (its CHECK lacks a kind of today's; SQLite cannot
        alter a CHECK) with every row and the AUTOINCREMENT counter kept, so no new row ever
        takes the ``seq`` of an acknowledged one."""
        high = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        n = self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self.conn.execute("DROP TABLE IF EXISTS outbox_migrating")
        self.conn.execute(_TABLE.format(name="outbox_migrating"))
        self.conn.execute(f"INSERT INTO outbox_migrating ({_COLUMNS}) SELECT {_COLUMNS} FROM outbox")
        self.conn.execute("DROP TABLE outbox")
        self.conn.execute("ALTER TABLE outbox_migrating RENAME TO outbox")
        if high is not None:
            self.conn.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            self.conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (int(high[0]),))
        log_event(logger, "outbox.migrated", rows=int(n), seq=int(high[0]) if high is not None else 0)

    @staticmethod
    def _checked_cap(kind: str, cap: int) -> int:
        if kind not in BOUNDED_KINDS:
            raise ValueError(f"kind {kind!r} has no cap: only {', '.join(BOUNDED_KINDS)} are ever dropped")
        if int(cap) < 1:
            raise ValueError(f"cap of {kind!r} must be at least 1, not {cap!r}")
        return int(cap)

    # ---------------------------------------------------------------------------------- rows

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
        max_queued: int | None = None,
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

        A ``telemetry`` or ``drift`` put then deletes that kind's oldest rows beyond ``max_queued``
        (default: the outbox's cap for the kind), in the same transaction; a row already handed to
        the broker may be among them (its late PUBACK finds nothing to delete, which is harmless).
        ``max_queued`` with a result or event is a ValueError: those are never dropped.
        """
        if in_transaction and not self.conn.in_transaction:
            raise StorageError("outbox put with in_transaction=True outside a transaction")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos {qos!r}: 0, 1 or 2")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
        cap: int | None = None
        if max_queued is not None:
            cap = self._checked_cap(kind, max_queued)
        elif kind in BOUNDED_KINDS:
            cap = self._caps[kind]
        try:
            with self._lock:
                if cap is None:  # results and events: one INSERT, atomic on its own
                    return self._insert(topic, payload, qos, retain, kind, dedup_key)
                with self._tx():
                    seq = self._insert(topic, payload, qos, retain, kind, dedup_key)
                    self._trim(kind, cap)
                    return seq
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write to the outbox: {exc}") from exc

    def _insert(self, topic: str, payload: bytes, qos: int, retain: bool, kind: str, dedup_key: str | None) -> int:
        cur = self.conn.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, kind, dedup_key, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedup_key) DO NOTHING",
            (topic, bytes(payload), qos, int(retain), kind, dedup_key, time.time()),
        )
        if cur.rowcount == 1 and cur.lastrowid is not None:
            return int(cur.lastrowid)
        row = self.conn.execute("SELECT seq FROM outbox WHERE dedup_key = ?", (dedup_key,)).fetchone()
        if row is None:  # pragma: no cover - the conflict row cannot vanish under our lock
            raise StorageError(f"outbox conflict on {dedup_key!r} but no such row")
        return int(row[0])

    def _trim(self, kind: str, cap: int) -> int:
        """Delete ``kind``'s rows older than its ``cap`` newest; count them in ``outbox_meta``."""
        cur = self.conn.execute(
            "DELETE FROM outbox WHERE kind = ? AND seq <= "
            "(SELECT seq FROM outbox WHERE kind = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (kind, kind, cap),
        )
        dropped = max(0, cur.rowcount)
        if dropped:
            self.conn.execute(
                "INSERT INTO outbox_meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                (f"dropped_{kind}", dropped),
            )
            # debug only: during an outage this happens on every put, the count is in dropped()
            logger.debug("outbox.dropped", extra={"ea_fields": {"kind": kind, "rows": dropped, "cap": cap}})
        return dropped

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

    def count(self, kind: Kind | None = None) -> int:
        """Number of rows (of ``kind``, or all) waiting for their PUBACK."""
        try:
            with self._lock:
                if kind is None:
                    return int(self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
                return int(self.conn.execute("SELECT COUNT(*) FROM outbox WHERE kind = ?", (kind,)).fetchone()[0])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc

    def dropped(self) -> dict[str, int]:
        """Rows of each bounded kind dropped beyond its cap since the database was created."""
        try:
            with self._lock:
                rows = self.conn.execute(
                    "SELECT key, value FROM outbox_meta WHERE key LIKE 'dropped_%'"
                ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox: {exc}") from exc
        got = {str(r[0]).removeprefix("dropped_"): int(r[1]) for r in rows}
        return {kind: got.get(kind, 0) for kind in BOUNDED_KINDS}

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

    def next_seq(self, name: SeqName) -> int:
        """Increment and return the persistent ``seq`` of ``name``'s messages (1 on a fresh database).

        Kept in the database so a message kind's ``seq`` increases across restarts too: a consumer
        that sees it jump knows it missed messages (a reconnect of the device for status; rows
        dropped during an outage, or lost, for telemetry and drift).
        """
        if name not in ("status", "telemetry", "drift"):
            raise ValueError(f"no seq counter {name!r}")
        try:
            with self._lock:
                cur = self.conn.execute(
                    "INSERT INTO outbox_meta (key, value) VALUES (?, 1)"
                    " ON CONFLICT (key) DO UPDATE SET value = value + 1 RETURNING value",
                    (f"{name}_seq",),
                )
                row = cur.fetchone()
                cur.close()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot update the {name} seq: {exc}") from exc
        return int(row[0])

    def next_status_seq(self) -> int:
        """``next_seq("status")``: the seq of the status messages of the next (re)connect."""
        return self.next_seq("status")


class _Tx:
    """Runs a block in the connection's open transaction when there is one (the caller commits
    or rolls back), else in BEGIN IMMEDIATE ... COMMIT / ROLLBACK of its own."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.own = False

    def __enter__(self) -> None:
        self.own = not self.conn.in_transaction
        if self.own:
            self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.own:
            return
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                # a failed COMMIT (busy, disk full) leaves the transaction open: end it, then raise
                self.conn.execute("ROLLBACK")
                raise
        self.conn.execute("ROLLBACK")
