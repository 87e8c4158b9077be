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
    REFUSED = "refused"  # quiet; over series_limits.max_instances (aged out like unrouted)


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
    refused: str = ""  # why the series is refused as too large ("" when it is not)


#: creates what follows a due series (its jobs) inside the transaction that completes it
Successor = Callable[[sqlite3.Connection, DueSeries], None]


class SeriesAssembler:
    """Tracks series in SQLite and decides when each one is complete and for which models."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        specs: Sequence[ModelSpec],
        stable_age_s: float,
        clock: Callable[[], float] = time.time,
        max_instances: int = 0,
    ) -> None:
        """``max_instances``: a larger series is refused when it falls due (0: no limit)."""
        self.conn = conn
        self.specs = list(specs)
        self.stable_age_s = stable_age_s
        self.clock = clock
        self.max_instances = max_instances
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
                    " VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                    (inst.series_uid, inst.study_uid, inst.modality, inst.series_description,
                     inst.body_part, now, now, SeriesState.OPEN.value, _first_revision(c, inst.series_uid)),
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
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (series_uid, sp.study_uid, sp.modality, sp.description, sp.body_part, n, last, last,
                         SeriesState.OPEN.value, _first_revision(c, series_uid)),
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

    def pop_due(self, successor: Successor | None = None) -> list[DueSeries]:
        """Mark every series quiet for ``stable_age_s`` as complete (or unrouted, or refused) and
        return it.

        ``successor(conn, due)`` is called inside the same transaction as the state change, on this
        assembler's connection: the caller creates the series' jobs there, so a series is never
        marked complete without its jobs (a failure rolls both back and the series stays open, due
        again at the next call). A series over ``max_instances`` is marked refused (``due.refused``
        says why) and gets no jobs.
        """
        cutoff = self.clock() - self.stable_age_s
        due: list[DueSeries] = []
        rows = self.conn.execute(
            "SELECT * FROM series WHERE state = ? AND last_instance_at <= ? ORDER BY last_instance_at",
            (SeriesState.OPEN.value, cutoff),
        ).fetchall()
        for row in rows:
            refused = ""
            if self.max_instances and row["n_instances"] > self.max_instances:
                refused = f"{row['n_instances']} instances, over the limit of {self.max_instances}"
            models = () if refused else self.route(row["modality"], row["body_part"], row["description"],
                                                   row["n_instances"])
            state = SeriesState.REFUSED if refused else SeriesState.COMPLETE if models else SeriesState.UNROUTED
            item = DueSeries(row["study_uid"], row["series_uid"], row["modality"], row["revision"],
                             row["n_instances"], models, float(row["last_instance_at"]), refused)
            with transaction(self.conn) as c:
                # guarded by the old timestamp: an instance that arrived meanwhile keeps it open
                cur = c.execute(
                    "UPDATE series SET state = ?, completed_at = ?, models = ?"
                    " WHERE series_uid = ? AND state = ? AND last_instance_at = ?",
                    (state.value, self.clock(), ",".join(models), row["series_uid"],
                     SeriesState.OPEN.value, row["last_instance_at"]),
                )
                if cur.rowcount == 1 and successor is not None:
                    successor(c, item)
            if cur.rowcount != 1:
                continue
            log_event(log, f"series.{state.value}", series_uid=row["series_uid"], instances=row["n_instances"],
                      revision=row["revision"], models=",".join(models) or "-")
            due.append(item)
        return due

    def state(self, series_uid: str) -> SeriesState | None:
        row = self.conn.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return None if row is None else SeriesState(row["state"])

    def series_row(self, series_uid: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return row

    def expired_unrouted(self, older_than_s: float) -> list[str]:
        """Unrouted (or refused) series completed more than ``older_than_s`` ago (for the janitor)."""
        rows = self.conn.execute(
            "SELECT series_uid FROM series WHERE state IN (?, ?) AND completed_at <= ?",
            (SeriesState.UNROUTED.value, SeriesState.REFUSED.value, self.clock() - older_than_s),
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

    def forget(self, series_uid: str, *, completed_before: float | None = None) -> bool:
        """Delete the series' row; True when it was deleted.

        With ``completed_before`` (the janitor), in one statement and only while the series is still
        closed (complete, unrouted or refused) since at or before that time and none of its jobs is
        open (pending, running, or inferred but not yet confirmed sent): an instance recorded or a
        job created since the janitor chose it keeps the series, so its files stay too."""
        if completed_before is None:
            cur = self.conn.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
            return cur.rowcount == 1
        open_jobs = ""
        if _has_jobs_table(self.conn):
            open_jobs = (" AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.series_uid = series.series_uid"
                         " AND jobs.state IN ('pending', 'running', 'inferred'))")
        cur = self.conn.execute(
            "DELETE FROM series WHERE series_uid = ? AND state IN (?, ?, ?) AND completed_at <= ?" + open_jobs,
            (series_uid, SeriesState.COMPLETE.value, SeriesState.UNROUTED.value, SeriesState.REFUSED.value,
             completed_before),
        )
        return cur.rowcount == 1


def _has_jobs_table(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is not None


def _first_revision(conn: sqlite3.Connection, series_uid: str) -> int:
    """The revision of a series the table does not hold: 1, or one past the newest revision its jobs
    ever had. A series re-sent after retention swept it (row and files gone, its jobs kept) is a new
    revision: a new job (its id names the revision) and a result that supersedes the old one."""
    if not _has_jobs_table(conn):
        return 1
    row = conn.execute("SELECT MAX(revision) AS r FROM jobs WHERE series_uid = ?", (series_uid,)).fetchone()
    return int(row["r"] or 0) + 1
