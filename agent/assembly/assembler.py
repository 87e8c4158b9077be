"""Series assembly: which series are complete, and which models want them.

A series is complete when no instance arrived for ``stable_age_s``. The timer lives in the
``series`` table (``last_instance_at``), so a restart resumes it instead of forgetting it. A late
instance re-opens a completed series with ``revision + 1``; its new jobs supersede the old ones
and its result is re-published under the same ``result_id`` with the higher revision.

Takes: ``Instance`` notifications (from the listener, via the service) and model specs.
Returns: ``Series`` objects that are due, each with the model names that want it.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.core.db import transaction
from agent.core.log import log_event
from agent.core.modelspec import ModelSpec
from agent.core.types import Instance, SpooledSeries

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    body_part TEXT NOT NULL DEFAULT '',
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_instance_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    completed_at REAL,
    models TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_instance_at);
"""


class SeriesState(str, enum.Enum):
    OPEN = "open"  # instances still arriving (or not quiet for stable_age_s yet)
    COMPLETE = "complete"  # quiet; jobs created for the models that want it
    UNROUTED = "unrouted"  # quiet; no model wants it (aged out of the spool later)


@dataclass(frozen=True)
class DueSeries:
    """A series that just became complete, with the models routing picked for it."""

    study_uid: str
    series_uid: str
    modality: str
    revision: int
    n_instances: int
    models: tuple[str, ...]
    last_instance_at: float = 0.0  # clock seconds of its last instance (the quiet period began)


class SeriesAssembler:
    """Tracks series in SQLite and decides when each one is complete and for which models."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        specs: Sequence[ModelSpec],
        stable_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conn = conn
        self.specs = list(specs)
        self.stable_age_s = stable_age_s
        self.clock = clock
        conn.executescript(SCHEMA)

    def note_instance(self, inst: Instance) -> bool:
        """Record a newly stored instance; returns True when it re-opened a completed series.

        The quiet period counts from the instance's arrival (``received_at``, when set), not from
        when this thread got to it: the service drains arrivals in ticks, and a series must not
        wait a tick longer than ``stable_age_s``.
        """
        now = self.clock()
        if 0 < inst.received_at < now:
            now = inst.received_at
        with transaction(self.conn) as c:
            row = c.execute(
                "SELECT state, revision FROM series WHERE series_uid = ?", (inst.series_uid,)
            ).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, description, body_part,"
                    " n_instances, first_instance_at, last_instance_at, state, revision)"
                    " VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, 1)",
                    (inst.series_uid, inst.study_uid, inst.modality, inst.series_description,
                     inst.body_part, now, now, SeriesState.OPEN.value),
                )
                return False
            reopened = row["state"] != SeriesState.OPEN.value
            c.execute(
                "UPDATE series SET n_instances = n_instances + 1, last_instance_at = ?,"
                " state = ?, revision = revision + ? WHERE series_uid = ?",
                (now, SeriesState.OPEN.value, 1 if reopened else 0, inst.series_uid),
            )
        if reopened:
            log_event(log, "series.reopened", series_uid=inst.series_uid, revision=row["revision"] + 1)
        return bool(reopened)

    def reconcile(self, spooled: Iterable[SpooledSeries]) -> int:
        """Bring the table in line with the spool after a crash.

        ``spooled``: every series as the spool sees it (``Spool.series_summary()``). A series the
        spool has but the table lacks (a
        crash between the spool's commit and ours), or with more instances than recorded, is
        (re-)opened so it gets inferred. Returns the number of series fixed.
        """
        fixed = 0
        for sp in spooled:
            series_uid, n, last = sp.series_uid, sp.instances, sp.last_received_at
            with transaction(self.conn) as c:
                row = c.execute(
                    "SELECT n_instances, state FROM series WHERE series_uid = ?", (series_uid,)
                ).fetchone()
                if row is None:
                    c.execute(
                        "INSERT INTO series (series_uid, study_uid, modality, description, body_part,"
                        " n_instances, first_instance_at, last_instance_at, state, revision)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                        (series_uid, sp.study_uid, sp.modality, sp.description, sp.body_part, n, last, last,
                         SeriesState.OPEN.value),
                    )
                    fixed += 1
                elif row["n_instances"] < n:
                    reopen = row["state"] != SeriesState.OPEN.value
                    c.execute(
                        "UPDATE series SET n_instances = ?, last_instance_at = MAX(last_instance_at, ?),"
                        " state = ?, revision = revision + ? WHERE series_uid = ?",
                        (n, last, SeriesState.OPEN.value, 1 if reopen else 0, series_uid),
                    )
                    fixed += 1
        if fixed:
            log_event(log, "series.reconciled", count=fixed)
        return fixed

    def route(self, modality: str, body_part: str, description: str, n: int) -> tuple[str, ...]:
        """Names of the models whose routing rules accept a series with these attributes."""
        return tuple(s.name for s in self.specs if s.accepts(modality, body_part, description, n))

    def quiet_series(self, quiet_s: float) -> list[tuple[str, int]]:
        """Open series some model wants that have been quiet for ``quiet_s`` (not yet due), newest
        first, as (series_uid, n_instances): candidates for decoding ahead of their job."""
        rows = self.conn.execute(
            "SELECT series_uid, modality, body_part, description, n_instances FROM series"
            " WHERE state = ? AND last_instance_at <= ? ORDER BY last_instance_at DESC",
            (SeriesState.OPEN.value, self.clock() - quiet_s),
        ).fetchall()
        return [(r["series_uid"], int(r["n_instances"])) for r in rows
                if self.route(r["modality"], r["body_part"], r["description"], r["n_instances"])]

    def next_due_at(self) -> float | None:
        """When the earliest open series becomes due (clock seconds), or None when none is open."""
        row = self.conn.execute(
            "SELECT MIN(last_instance_at) AS t FROM series WHERE state = ?", (SeriesState.OPEN.value,)
        ).fetchone()
        return None if row is None or row["t"] is None else float(row["t"]) + self.stable_age_s

    def pop_due(self) -> list[DueSeries]:
        """Mark every series quiet for ``stable_age_s`` as complete (or unrouted) and return it."""
        cutoff = self.clock() - self.stable_age_s
        due: list[DueSeries] = []
        rows = self.conn.execute(
            "SELECT * FROM series WHERE state = ? AND last_instance_at <= ? ORDER BY last_instance_at",
            (SeriesState.OPEN.value, cutoff),
        ).fetchall()
        for row in rows:
            models = self.route(row["modality"], row["body_part"], row["description"], row["n_instances"])
            state = SeriesState.COMPLETE if models else SeriesState.UNROUTED
            with transaction(self.conn) as c:
                # guarded by the old timestamp: an instance that arrived meanwhile keeps it open
                cur = c.execute(
                    "UPDATE series SET state = ?, completed_at = ?, models = ?"
                    " WHERE series_uid = ? AND state = ? AND last_instance_at = ?",
                    (state.value, self.clock(), ",".join(models), row["series_uid"],
                     SeriesState.OPEN.value, row["last_instance_at"]),
                )
            if cur.rowcount != 1:
                continue
            log_event(log, "series.complete" if models else "series.unrouted",
                      series_uid=row["series_uid"], instances=row["n_instances"],
                      revision=row["revision"], models=",".join(models) or "-")
            due.append(DueSeries(row["study_uid"], row["series_uid"], row["modality"],
                                 row["revision"], row["n_instances"], models, float(row["last_instance_at"])))
        return due

    def state(self, series_uid: str) -> SeriesState | None:
        row = self.conn.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return None if row is None else SeriesState(row["state"])

    def series_row(self, series_uid: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return row

    def expired_unrouted(self, older_than_s: float) -> list[str]:
        """Unrouted series completed more than ``older_than_s`` ago (for the spool janitor)."""
        rows = self.conn.execute(
            "SELECT series_uid FROM series WHERE state = ? AND completed_at <= ?",
            (SeriesState.UNROUTED.value, self.clock() - older_than_s),
        ).fetchall()
        return [r["series_uid"] for r in rows]

    def completed_before(self, cutoff: float) -> list[str]:
        """Series completed (routed and handed to jobs) at or before ``cutoff`` (clock seconds):
        candidates for the retention janitor once their jobs are done."""
        rows = self.conn.execute(
            "SELECT series_uid FROM series WHERE state = ? AND completed_at <= ?",
            (SeriesState.COMPLETE.value, cutoff),
        ).fetchall()
        return [r["series_uid"] for r in rows]

    def forget(self, series_uid: str) -> None:
        self.conn.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
