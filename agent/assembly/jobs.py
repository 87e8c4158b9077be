"""The job table: one row per (series, model, revision), driven through its states.

States: ``pending`` -> ``running`` -> ``inferred`` (result durably in the outbox) -> ``published``
(PUBACK received); or ``failed`` after ``max_attempts`` (or at once when refused as too large); or
``superseded`` when a late instance re-opened the series before the job ran. A restart turns
``running`` back into ``pending`` (the attempt counts), so an interrupted job is never lost and never
loops forever.

Fairness: ``claim_next`` takes the job with the fewest attempts first (then the oldest), and a failed
attempt waits ``backoff_s`` (``not_before``) before it may run again: a retry goes behind newer work,
so one slow or failing series delays another by at most one attempt.

The job id names (series, model, revision); a series re-sent after retention comes back as a new
revision (agent/assembly/assembler.py ``_first_revision``), so its id is new too.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.core.db import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    model_name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    result_key TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
"""

PENDING, RUNNING, INFERRED, PUBLISHED, FAILED, SUPERSEDED = (
    "pending", "running", "inferred", "published", "failed", "superseded",
)


@dataclass(frozen=True)
class Job:
    job_id: str
    series_uid: str
    study_uid: str
    model_name: str
    revision: int
    state: str
    attempts: int
    error: str


def _job(row: sqlite3.Row) -> Job:
    return Job(row["job_id"], row["series_uid"], row["study_uid"], row["model_name"],
               row["revision"], row["state"], row["attempts"], row["error"])


class JobStore:
    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self.conn = conn
        self.clock = clock
        conn.executescript(SCHEMA)
        columns = {r["name"] for r in conn.execute("PRAGMA table_info(jobs)").fetchall()}
        if "not_before" not in columns:  # a database from before the column existed
            conn.execute("ALTER TABLE jobs ADD COLUMN not_before REAL NOT NULL DEFAULT 0")

    def create(self, series_uid: str, study_uid: str, model_name: str, revision: int,
               conn: sqlite3.Connection | None = None) -> Job:
        """Create the job for this revision (idempotent) and return it; older revisions' open
        jobs are superseded. Pass ``conn`` (inside a transaction) to take part in the caller's
        transaction: the assembler completes a series and creates its jobs in one."""
        job_id = f"{series_uid}|{model_name}|{revision}"
        if conn is not None:
            self._create(conn, job_id, series_uid, study_uid, model_name, revision)
        else:
            with transaction(self.conn) as c:
                self._create(c, job_id, series_uid, study_uid, model_name, revision)
        return self.get(job_id, conn)

    def _create(self, c: sqlite3.Connection, job_id: str, series_uid: str, study_uid: str, model_name: str,
                revision: int) -> None:
        now = self.clock()
        c.execute(
            "UPDATE jobs SET state = ?, updated_at = ? WHERE series_uid = ? AND model_name = ?"
            " AND revision < ? AND state IN (?, ?)",
            (SUPERSEDED, now, series_uid, model_name, revision, PENDING, RUNNING),
        )
        c.execute(
            "INSERT OR IGNORE INTO jobs (job_id, series_uid, study_uid, model_name, revision,"
            " state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, series_uid, study_uid, model_name, revision, PENDING, now, now),
        )

    def get(self, job_id: str, conn: sqlite3.Connection | None = None) -> Job:
        row = (conn or self.conn).execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def claim_next(self) -> Job | None:
        """The pending job with the fewest attempts (then the oldest) whose backoff has passed,
        moved to ``running`` with its attempt counted."""
        with transaction(self.conn) as c:
            row = c.execute(
                "SELECT * FROM jobs WHERE state = ? AND not_before <= ?"
                " ORDER BY attempts, created_at, job_id LIMIT 1", (PENDING, self.clock()),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE job_id = ?",
                (RUNNING, self.clock(), row["job_id"]),
            )
        return self.get(row["job_id"])

    def mark(self, job_id: str, state: str, *, error: str = "", result_key: str = "",
             conn: sqlite3.Connection | None = None) -> None:
        """Set a job's state; pass ``conn`` to take part in the caller's transaction."""
        (conn or self.conn).execute(
            "UPDATE jobs SET state = ?, error = ?, result_key = CASE WHEN ? = '' THEN result_key"
            " ELSE ? END, updated_at = ? WHERE job_id = ?",
            (state, error, result_key, result_key, self.clock(), job_id),
        )

    def retry_or_fail(self, job_id: str, error: str, max_attempts: int, backoff_s: float = 0.0) -> str:
        """After a failed attempt: back to pending (not before ``backoff_s`` doubled per earlier
        attempt), or failed when attempts are used up."""
        job = self.get(job_id)
        state = FAILED if job.attempts >= max_attempts else PENDING
        not_before = self.clock() + backoff_s * 2 ** max(0, job.attempts - 1) if state == PENDING else 0.0
        self.conn.execute(
            "UPDATE jobs SET state = ?, error = ?, not_before = ?, updated_at = ? WHERE job_id = ?",
            (state, error, not_before, self.clock(), job_id),
        )
        return state

    def release(self, job_id: str) -> None:
        """Give a claimed job back untried (shutdown interrupted it): pending, attempt not counted."""
        self.conn.execute(
            "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), updated_at = ? WHERE job_id = ?",
            (PENDING, self.clock(), job_id),
        )

    def recover(self) -> int:
        """At start-up: jobs left ``running`` by a crash go back to ``pending``."""
        cur = self.conn.execute(
            "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?", (PENDING, self.clock(), RUNNING)
        )
        return cur.rowcount

    def mark_published(self, result_key: str) -> None:
        self.conn.execute(
            "UPDATE jobs SET state = ?, updated_at = ? WHERE result_key = ? AND state = ?",
            (PUBLISHED, self.clock(), result_key, INFERRED),
        )

    def inferred_keys(self) -> list[str]:
        """Result keys of jobs whose result is in the outbox but not yet confirmed sent."""
        rows = self.conn.execute("SELECT result_key FROM jobs WHERE state = ?", (INFERRED,)).fetchall()
        return [r["result_key"] for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    def series_done(self, series_uid: str) -> bool:
        """True when no job of the series is still open (all published, failed or superseded)."""
        row = self.conn.execute(
            "SELECT COUNT(*) AS n FROM jobs WHERE series_uid = ? AND state IN (?, ?, ?)",
            (series_uid, PENDING, RUNNING, INFERRED),
        ).fetchone()
        return int(row["n"]) == 0
