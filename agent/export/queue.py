"""The durable export queue in ``state.db``: one row per (result revision, destination, object).

    export_results   result_key ("{result_id}:{revision}") -> the ExportRequest (JSON)
    export_items     one object for one destination: state, attempts, when to try next, last error

The job thread calls ``enqueue`` inside the transaction that writes the result's outbox row
(``in_transaction``), so a result exists with its exports or not at all. States:

    queued      waiting for its next try (``next_at``); a failure puts it back with a later ``next_at``
    delivered   the destination stored it (a success or storage-warning status)
    dead        ``max_attempts`` tries failed (``export.dead_lettered``); never tried again
    refused     it could not be built (``export.refused``); never tried again
    superseded  a newer revision of the same result for the same destination and object was
                queued before it was delivered: only the newest is sent (so an old revision never
                overwrites a new one in the PACS)

Retries back off exponentially with jitter: the n-th failure waits ``retry_initial_s * 2**(n-1)``
(at most ``retry_max_s``) times a random factor in [0.5, 1.0].
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.core.db import transaction
from agent.core.telemetry import ExportQueueSample
from agent.export.request import ExportRequest

QUEUED, DELIVERED, DEAD, REFUSED, SUPERSEDED = "queued", "delivered", "dead", "refused", "superseded"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS export_results (
    result_key TEXT PRIMARY KEY,
    result_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS export_items (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,
    result_key TEXT NOT NULL,
    result_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    destination TEXT NOT NULL,
    object TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    status INTEGER,
    UNIQUE (result_key, destination, object)
);
CREATE INDEX IF NOT EXISTS export_items_due ON export_items (state, next_at);
CREATE INDEX IF NOT EXISTS export_items_result ON export_items (result_id, destination, object);
"""


@dataclass(frozen=True)
class ExportItem:
    item_id: int
    result_key: str
    result_id: str
    revision: int
    destination: str
    object: str
    attempts: int
    created_at: float


def result_key(result_id: str, revision: int) -> str:
    return f"{result_id}:{revision}"


def backoff_s(attempts: int, initial_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """The wait after the ``attempts``-th failed try (see the module docstring)."""
    base = min(max_s, initial_s * (2.0 ** max(0, attempts - 1)))
    return base * (0.5 + 0.5 * rand())


class ExportQueue:
    """The export tables on one connection (each thread its own ``ExportQueue``)."""

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self.conn = conn
        self.clock = clock
        conn.executescript(_SCHEMA)

    # ---- the job thread ------------------------------------------------------------------
    def enqueue(self, req: ExportRequest, targets: Sequence[tuple[str, str]], *, in_transaction: bool = False) -> int:
        """Queue ``req``'s objects for ``targets`` ((destination, object) pairs); older queued
        revisions of the same result, destination and object become ``superseded``. Inside the
        caller's transaction when ``in_transaction``. Returns the rows queued."""
        if not targets:
            return 0
        if in_transaction:
            return self._enqueue(req, targets)
        with transaction(self.conn):
            return self._enqueue(req, targets)

    def _enqueue(self, req: ExportRequest, targets: Sequence[tuple[str, str]]) -> int:
        now, key = self.clock(), result_key(req.result_id, req.revision)
        c = self.conn
        c.execute("INSERT OR REPLACE INTO export_results (result_key, result_id, revision, request, created_at)"
                  " VALUES (?, ?, ?, ?, ?)", (key, req.result_id, req.revision, req.to_json(), now))
        n = 0
        for destination, kind in targets:
            c.execute("UPDATE export_items SET state = ?, updated_at = ? WHERE result_id = ? AND destination = ?"
                      " AND object = ? AND revision < ? AND state = ?",
                      (SUPERSEDED, now, req.result_id, destination, kind, req.revision, QUEUED))
            cur = c.execute("INSERT OR IGNORE INTO export_items (result_key, result_id, revision, destination, object,"
                            " state, next_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (key, req.result_id, req.revision, destination, kind, QUEUED, now, now, now))
            n += cur.rowcount
        return n

    # ---- the export thread ---------------------------------------------------------------
    def next_due(self) -> ExportItem | None:
        row = self.conn.execute(
            "SELECT item_id, result_key, result_id, revision, destination, object, attempts, created_at"
            " FROM export_items WHERE state = ? AND next_at <= ? ORDER BY next_at, item_id LIMIT 1",
            (QUEUED, self.clock())).fetchone()
        return ExportItem(*row) if row is not None else None

    def seconds_to_next(self) -> float | None:
        """Seconds until the next queued item falls due (0 when one is due), None when none is queued."""
        row = self.conn.execute("SELECT MIN(next_at) FROM export_items WHERE state = ?", (QUEUED,)).fetchone()
        return None if row[0] is None else max(0.0, float(row[0]) - self.clock())

    def request(self, key: str) -> ExportRequest | None:
        row = self.conn.execute("SELECT request FROM export_results WHERE result_key = ?", (key,)).fetchone()
        return ExportRequest.from_json(row[0]) if row is not None else None

    def items_of(self, key: str, state: str = QUEUED) -> list[ExportItem]:
        rows = self.conn.execute(
            "SELECT item_id, result_key, result_id, revision, destination, object, attempts, created_at"
            " FROM export_items WHERE result_key = ? AND state = ? ORDER BY item_id", (key, state)).fetchall()
        return [ExportItem(*r) for r in rows]

    def delivered(self, item: ExportItem, status: int) -> None:
        self._set(item, DELIVERED, attempts=item.attempts + 1, status=status, error="")

    def failed(self, item: ExportItem, error: str, *, max_attempts: int, initial_s: float, max_s: float,
               status: int | None = None) -> str:
        """Count a failed try; back to ``queued`` (later) or ``dead`` after ``max_attempts``.
        Returns the new state."""
        attempts = item.attempts + 1
        if attempts >= max_attempts:
            self._set(item, DEAD, attempts=attempts, status=status, error=error)
            return DEAD
        self._set(item, QUEUED, attempts=attempts, status=status, error=error,
                  next_at=self.clock() + backoff_s(attempts, initial_s, max_s))
        return QUEUED

    def refused(self, items: Iterable[ExportItem], reason: str) -> None:
        for item in items:
            self._set(item, REFUSED, attempts=item.attempts, status=None, error=reason)

    def _set(self, item: ExportItem, state: str, *, attempts: int, status: int | None, error: str,
             next_at: float | None = None) -> None:
        now = self.clock()
        with transaction(self.conn) as c:
            c.execute("UPDATE export_items SET state = ?, attempts = ?, status = ?, last_error = ?, updated_at = ?,"
                      " next_at = COALESCE(?, next_at) WHERE item_id = ?",
                      (state, attempts, status, error[:500], now, next_at, item.item_id))

    def open_results(self) -> set[str]:
        """Result keys with an item still queued (their files are still needed)."""
        return {r[0] for r in self.conn.execute("SELECT DISTINCT result_key FROM export_items WHERE state = ?",
                                                (QUEUED,))}

    def label_maps_in_use(self) -> set[str]:
        """The label-map paths of results with an item still queued."""
        out = set()
        for (text,) in self.conn.execute(
                "SELECT request FROM export_results WHERE result_key IN"
                " (SELECT result_key FROM export_items WHERE state = ?)", (QUEUED,)):
            req = ExportRequest.from_json(text)
            if req.label_map:
                out.add(req.label_map)
        return out

    # ---- the telemetry thread ------------------------------------------------------------
    def samples(self, destinations: Sequence[str]) -> tuple[ExportQueueSample, ...]:
        """Per destination: queued items, the age of the oldest, dead letters and deliveries (ever)."""
        now = self.clock()
        counts: dict[tuple[str, str], tuple[int, float | None]] = {}
        for dest, state, n, oldest in self.conn.execute(
                "SELECT destination, state, COUNT(*), MIN(created_at) FROM export_items GROUP BY destination, state"):
            counts[(dest, state)] = (int(n), oldest)
        out = []
        for dest in destinations:
            queued, oldest = counts.get((dest, QUEUED), (0, None))
            out.append(ExportQueueSample(
                destination=dest, queued=queued, oldest_age_s=round(max(0.0, now - oldest), 1) if oldest else 0.0,
                delivered=counts.get((dest, DELIVERED), (0, None))[0], dead_lettered=counts.get((dest, DEAD), (0, None))[0],
                refused=counts.get((dest, REFUSED), (0, None))[0]))
        return tuple(out)
