"""The drift stage's tables in the state database: each model's window and state survive a restart.

Takes the shared sqlite3 connection (``agent.core.db.connect``: autocommit, WAL); creates

``drift_state``   one row per model: the model version and reference digest the window belongs
                  to, the state (ok / warn / alert), when it was entered, the consecutive series
                  evaluated below it (hysteresis) and the next window sequence number
``drift_window``  the model's last ``drift.window`` series: ``SeriesSummary.to_json()`` (aggregates
                  of one series; never published as such), the agreement rate given with it

and gives :class:`DriftStore` (read a model's state and window, append a series, reset a model).
Every multi-statement write is one ``agent.core.db.transaction``, so a crash leaves either the old
window and state or the new ones.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from agent.core.db import transaction
from agent.core.drift import DRIFT_STATES, DriftState, SeriesSummary

SCHEMA = """
CREATE TABLE IF NOT EXISTS drift_state (
    model        TEXT PRIMARY KEY,
    version      TEXT NOT NULL,
    reference    TEXT NOT NULL,
    state        TEXT NOT NULL,
    since        REAL NOT NULL,
    lower_streak INTEGER NOT NULL,
    next_seq     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS drift_window (
    model     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    summary   TEXT NOT NULL,
    agreement REAL,
    added_at  REAL NOT NULL,
    PRIMARY KEY (model, seq)
);
"""


@dataclass
class ModelState:
    """A ``drift_state`` row; ``reference`` is the SHA-256 of the reference profile."""

    model: str
    version: str
    reference: str
    state: DriftState
    since: float
    lower_streak: int = 0
    next_seq: int = 0


class DriftStore:
    """Reads and writes the two tables (module docstring); not thread-safe on its own (the
    monitor serialises its calls)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        with transaction(conn):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def state(self, model: str) -> ModelState | None:
        row = self.conn.execute(
            "SELECT version, reference, state, since, lower_streak, next_seq FROM drift_state WHERE model = ?",
            (model,)).fetchone()
        if row is None:
            return None
        state = str(row[2])
        return ModelState(model, str(row[0]), str(row[1]), _state(state), float(row[3]), int(row[4]), int(row[5]))

    def models(self) -> list[str]:
        return [str(r[0]) for r in self.conn.execute("SELECT model FROM drift_state ORDER BY model")]

    def window(self, model: str, limit: int) -> list[tuple[SeriesSummary, float | None]]:
        """The model's last ``limit`` series, oldest first."""
        rows = self.conn.execute(
            "SELECT summary, agreement FROM drift_window WHERE model = ? ORDER BY seq DESC LIMIT ?",
            (model, limit)).fetchall()
        return [(SeriesSummary.from_json(json.loads(r[0])), None if r[1] is None else float(r[1]))
                for r in reversed(rows)]

    def reset(self, st: ModelState) -> None:
        """A fresh window for ``st`` (new version or reference): the old series go, the state is ``st``."""
        with transaction(self.conn) as c:
            c.execute("DELETE FROM drift_window WHERE model = ?", (st.model,))
            self._put(c, st)

    def append(self, st: ModelState, summary: SeriesSummary, agreement: float | None, keep: int,
               now: float) -> None:
        """Add a series as number ``st.next_seq - 1``, drop all but the last ``keep``, write ``st``."""
        seq = st.next_seq - 1
        with transaction(self.conn) as c:
            c.execute("INSERT INTO drift_window (model, seq, summary, agreement, added_at) VALUES (?, ?, ?, ?, ?)",
                      (st.model, seq, json.dumps(summary.to_json(), separators=(",", ":")), agreement, now))
            c.execute("DELETE FROM drift_window WHERE model = ? AND seq <= ?", (st.model, seq - keep))
            self._put(c, st)

    def forget(self, model: str) -> None:
        with transaction(self.conn) as c:
            c.execute("DELETE FROM drift_window WHERE model = ?", (model,))
            c.execute("DELETE FROM drift_state WHERE model = ?", (model,))

    @staticmethod
    def _put(c: sqlite3.Connection, st: ModelState) -> None:
        c.execute("INSERT OR REPLACE INTO drift_state (model, version, reference, state, since, lower_streak, "
                  "next_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (st.model, st.version, st.reference, st.state, st.since, st.lower_streak, st.next_seq))


def _state(value: str) -> DriftState:
    for s in DRIFT_STATES:
        if s == value:
            return s
    return "ok"  # a row from a newer schema: start over rather than fail the stage
