"""The spool's SQLite journal: the ``instances`` and ``quarantine`` tables and their queries.

Takes a connection from ``agent.core.db.connect`` (the spool's own: see ``Journal``); stores and
returns ``Instance`` records, per-series summaries (``SpooledSeries``) and quarantine rows.

Durability is split by what can be rebuilt. The files are the source of truth for ``instances``:
a row lost with the unsynced WAL tail after a power cut is re-journaled by ``reconcile()``, so
those commits run with ``synchronous=NORMAL`` (a WAL commit without a device flush). Retention
deletes and quarantine rows cannot be rebuilt from any file and commit with ``synchronous=FULL``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from agent.core.db import transaction
from agent.core.types import Instance, SpooledSeries

__all__ = ["Journal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid   TEXT PRIMARY KEY,
    sop_class_uid      TEXT NOT NULL,
    study_uid          TEXT NOT NULL,
    series_uid         TEXT NOT NULL,
    modality           TEXT NOT NULL DEFAULT '',
    transfer_syntax    TEXT NOT NULL,
    path               TEXT NOT NULL,
    size               INTEGER NOT NULL,
    received_at        REAL NOT NULL,
    calling_ae         TEXT NOT NULL DEFAULT '',
    series_description TEXT NOT NULL DEFAULT '',
    body_part          TEXT NOT NULL DEFAULT '',
    instance_number    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS quarantine (
    id          TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    calling_ae  TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL
);
"""

_INSERT = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, modality,"
    " transfer_syntax, path, size, received_at, calling_ae, series_description, body_part,"
    " instance_number) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

_SERIES_SUMMARY = (
    "SELECT series_uid, MIN(study_uid) AS study_uid, MIN(modality) AS modality,"
    " MIN(series_description) AS d, MIN(body_part) AS b, COUNT(*) AS n,"
    " MAX(received_at) AS last FROM instances GROUP BY series_uid"
)


class Journal:
    """The spool's tables on one connection, serialised by ``lock``.

    sqlite3 connections are not safe for interleaved use across threads, and the listener's
    association threads, the parse helpers and the assembler all use this one: every method holds
    ``lock`` (re-entrant) while it touches the connection. The spool also holds ``lock`` across
    directory create/rename/delete, so retention cannot rmdir a series directory between a store's
    mkdir and its rename. Give the journal a connection of its own: other code using it outside
    this lock could interleave with its statements, and the journal sets ``synchronous=NORMAL``.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.RLock()
        with self.lock:
            self.conn.executescript(_SCHEMA)
            # the files are the source of truth (module docstring): a row lost with the unsynced
            # WAL tail is rebuilt by reconcile(), so commits need not flush the device
            self.conn.execute("PRAGMA synchronous=NORMAL")

    # ------------------------------------------------------------------ instances

    def get(self, sop_instance_uid: str) -> Instance | None:
        """The journaled instance with this SOP Instance UID, or None."""
        with self.lock:
            row = self.conn.execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return None if row is None else _row_to_instance(row)

    def insert(self, i: Instance) -> None:
        """Journal a stored instance (raises ``sqlite3.Error``, e.g. for a UID already there)."""
        with self.lock:
            self.conn.execute(
                _INSERT,
                (
                    i.sop_instance_uid, i.sop_class_uid, i.study_uid, i.series_uid, i.modality,
                    i.transfer_syntax, str(i.path), i.size, i.received_at, i.calling_ae,
                    i.series_description, i.body_part, i.instance_number,
                ),
            )

    def instances_for_series(self, series_uid: str) -> list[Instance]:
        """All journaled instances of a series, by instance number then arrival."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT * FROM instances WHERE series_uid = ? ORDER BY instance_number, received_at",
                (series_uid,),
            ).fetchall()
        return [_row_to_instance(r) for r in rows]

    def count(self) -> int:
        """Number of journaled instances."""
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def series_summary(self) -> list[SpooledSeries]:
        """One summary per journaled series (order unspecified)."""
        with self.lock:
            rows = self.conn.execute(_SERIES_SUMMARY).fetchall()
        return [
            SpooledSeries(
                series_uid=r["series_uid"],
                study_uid=r["study_uid"],
                modality=r["modality"],
                description=r["d"] or "",
                body_part=r["b"] or "",
                instances=int(r["n"]),
                last_received_at=float(r["last"]),
            )
            for r in rows
        ]

    def known_paths(self) -> set[str]:
        """The path of every journaled instance, as stored."""
        with self.lock:
            return {r["path"] for r in self.conn.execute("SELECT path FROM instances")}

    def delete_series(self, series_uid: str, received_at_or_before: float | None = None) -> list[Path]:
        """Delete a series' rows (only those received at or before ``received_at_or_before`` when
        given), committed with a device flush; returns the files of the rows deleted."""
        cond = "series_uid = ?"
        args: list[object] = [series_uid]
        if received_at_or_before is not None:
            cond += " AND received_at <= ?"
            args.append(received_at_or_before)
        with self.lock, self._full_sync(), transaction(self.conn) as c:
            rows = c.execute(f"SELECT path FROM instances WHERE {cond}", args).fetchall()
            c.execute(f"DELETE FROM instances WHERE {cond}", args)
        return [Path(row["path"]) for row in rows]

    def last_received_at(self, series_uid: str) -> float | None:
        """When the series' newest journaled instance arrived (None: no instance)."""
        with self.lock:
            row = self.conn.execute("SELECT MAX(received_at) FROM instances WHERE series_uid = ?",
                                    (series_uid,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # ------------------------------------------------------------------ quarantine

    def quarantined(self) -> list[tuple[str, str, float]]:
        """Every quarantine row as (id, path, received_at), oldest first."""
        with self.lock:
            rows = self.conn.execute("SELECT id, path, received_at FROM quarantine ORDER BY received_at").fetchall()
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def delete_quarantine(self, qids: list[str]) -> None:
        """Forget quarantine rows (their files are being deleted: bounds and age)."""
        with self.lock:
            self.conn.executemany("DELETE FROM quarantine WHERE id = ?", [(q,) for q in qids])

    def add_quarantine(self, qid: str, path: Path, reason: str, calling_ae: str, received_at: float) -> None:
        """Record a quarantined file, committed with a device flush (no file can rebuild it)."""
        with self.lock, self._full_sync():
            self.conn.execute(
                "INSERT INTO quarantine (id, path, reason, calling_ae, received_at) VALUES (?,?,?,?,?)",
                (qid, str(path), reason, calling_ae, received_at),
            )

    @contextlib.contextmanager
    def _full_sync(self) -> Iterator[None]:
        """Commit with ``synchronous=FULL`` inside the block: for rows no file can rebuild.

        Caller holds ``lock``. In WAL mode the flush also persists earlier NORMAL commits.
        """
        self.conn.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self.conn.execute("PRAGMA synchronous=NORMAL")


def _row_to_instance(row: sqlite3.Row) -> Instance:
    return Instance(
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        path=Path(row["path"]),
        transfer_syntax=row["transfer_syntax"],
        modality=row["modality"],
        received_at=row["received_at"],
        size=row["size"],
        calling_ae=row["calling_ae"],
        series_description=row["series_description"],
        body_part=row["body_part"],
        instance_number=row["instance_number"],
    )
