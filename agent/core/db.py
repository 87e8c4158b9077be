"""SQLite connection helper shared by the stages that keep durable state.

Each stage owns its own tables in the one state database (``CREATE TABLE IF NOT EXISTS`` in its
own module); this module only opens connections the same way everywhere: WAL journal so readers
never block the writer, ``synchronous=FULL`` so a committed row survives power loss, and a busy
timeout so the listener, assembler and outbox can share the file across threads and processes.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from agent.core.util import PRIVATE_FILE, tighten

#: how long a statement waits for another writer's lock (``supervision.db_busy_timeout_s``)
BUSY_TIMEOUT_S = 30.0

#: SQLite's companions of the database file (WAL mode), created with the database file's mode
COMPANIONS = ("-wal", "-shm", "-journal")


def connect(path: Path | str, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open the state database with the project's durability settings.

    The connection is in autocommit mode (``isolation_level=None``); use ``with transaction(conn)``
    for multi-statement writes. ``busy_timeout_s``: past it, a statement blocked by another writer
    fails with ``sqlite3.OperationalError`` (database is locked); the service's loops survive that
    (agent/service/supervisor.py).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created 0600 before SQLite opens it: SQLite gives -wal and -shm the database file's mode
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    tighten_files(path)
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.row_factory = sqlite3.Row
    return conn


def tighten_files(path: Path) -> list[str]:
    """chmod 0600 the database file and its -wal/-shm where group or others can read them (files
    an older version made under umask 022); returns the names it tightened."""
    return [p.name for p in (path, *(path.with_name(path.name + s) for s in COMPANIONS))
            if tighten(p, PRIVATE_FILE)]


class transaction:
    """``with transaction(conn):`` runs the block in BEGIN IMMEDIATE ... COMMIT (or ROLLBACK)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                # a failed COMMIT (busy, disk full, I/O) leaves the transaction open: end it, so the
                # connection's next BEGIN works once the fault clears
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:  # nothing left to undo; the caller's error is the one to report
                pass
