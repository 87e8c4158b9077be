"""What the variant manager remembers across restarts, in the state database.

    engine_trials     one row per (choice key, variant): self-test verdict and timing on this device
    engine_choices    one row per choice key: the variant chosen and why
    engine_demotions  variants taken out of service for one installed version (until the next update)
    engine_versions   per installed version: jobs that succeeded / failed on it (rollback probation)

The *choice key* is a digest of everything a measurement depends on: model, version, the SHA-256
of the signed manifest, the versions of the inference libraries and a fingerprint of the hardware
(see ``choice_key``). Same key: the stored trials and choice are reused without measuring again.
A new library version, another CPU or a re-published manifest gives a new key, so a new measurement.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.core import db
from agent.core.util import sha256_bytes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS engine_trials (
    key TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, variant TEXT NOT NULL,
    backend TEXT NOT NULL, precision TEXT NOT NULL, passed INTEGER NOT NULL, error TEXT NOT NULL,
    max_abs_err REAL, latency_ms REAL, load_ms REAL, tried INTEGER NOT NULL, measured_at REAL NOT NULL,
    proof TEXT NOT NULL DEFAULT '', PRIMARY KEY (key, variant));
CREATE TABLE IF NOT EXISTS engine_choices (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, variant TEXT NOT NULL,
    reason TEXT NOT NULL, key_doc TEXT NOT NULL, chosen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS engine_demotions (
    model TEXT NOT NULL, version TEXT NOT NULL, variant TEXT NOT NULL, reason TEXT NOT NULL,
    demoted_at REAL NOT NULL, PRIMARY KEY (model, version, variant));
CREATE TABLE IF NOT EXISTS engine_versions (
    model TEXT NOT NULL, version TEXT NOT NULL, ok_jobs INTEGER NOT NULL DEFAULT 0,
    failed_jobs INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (model, version));
"""


@dataclass(frozen=True)
class VariantTrial:
    """One variant's self-test and micro-benchmark on this device.

    ``passed``: self-test within tolerance; ``error``: why not ("" when passed, or the reason it was
    not tried, e.g. "CPU lacks avx512_vnni"); ``tried``: False for variants skipped before running.
    ``max_abs_err``: largest deviation from the expected output; ``latency_ms``: fastest run time of
    the self-test input's first sample, batch 1 as jobs run (None when not timed). ``proof``: how its accuracy on this device's
    instruction-set family is known (the publisher's verdict, or the device gate's figures).
    """

    id: str
    backend: str
    precision: str
    passed: bool
    error: str = ""
    max_abs_err: float | None = None
    latency_ms: float | None = None
    load_ms: float | None = None
    tried: bool = True
    proof: str = ""


def choice_key(model: str, version: str, manifest_sha256: str, backends: Mapping[str, str | None],
               hardware: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key a measurement is stored under, and the document it digests (kept for ``describe``)."""
    doc = {"model": model, "version": version, "manifest_sha256": manifest_sha256,
           "backends": dict(sorted(backends.items())), "hardware": dict(hardware)}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return sha256_bytes(raw), doc


@dataclass(frozen=True)
class StoredChoice:
    variant: str
    reason: str
    chosen_at: float
    trials: tuple[VariantTrial, ...]


class ChoiceStore:
    """The engine tables of the state database (own connection; one statement group at a time, so
    the job thread, the updater and command handlers may share it)."""

    def __init__(self, db_path: Any) -> None:
        self.conn: sqlite3.Connection = db.connect(db_path)
        self.conn.executescript(_SCHEMA)
        columns = {r["name"] for r in self.conn.execute("PRAGMA table_info(engine_trials)")}
        if "proof" not in columns:  # a database from before the device gate
            self.conn.execute("ALTER TABLE engine_trials ADD COLUMN proof TEXT NOT NULL DEFAULT ''")
        self._lock = threading.RLock()

    def close(self) -> None:
        self.conn.close()

    # ---- choices and trials ------------------------------------------------------------------
    def load(self, key: str) -> StoredChoice | None:
        """The stored choice and trials for ``key``, or None when this key was never measured."""
        with self._lock:
            row = self.conn.execute("SELECT variant, reason, chosen_at FROM engine_choices WHERE key = ?",
                                    (key,)).fetchone()
            if row is None:
                return None
            rows = self.conn.execute("SELECT * FROM engine_trials WHERE key = ? ORDER BY rowid", (key,)).fetchall()
            trials = tuple(VariantTrial(r["variant"], r["backend"], r["precision"], bool(r["passed"]), r["error"],
                                        r["max_abs_err"], r["latency_ms"], r["load_ms"], bool(r["tried"]), r["proof"])
                           for r in rows)
            return StoredChoice(row["variant"], row["reason"], row["chosen_at"], trials)

    def save(self, key: str, key_doc: Mapping[str, Any], model: str, version: str, variant: str, reason: str,
             trials: Sequence[VariantTrial]) -> None:
        """Store a measurement (replacing any for the same key) in one transaction."""
        with self._lock:
            now = time.time()
            with db.transaction(self.conn):
                self.conn.execute("DELETE FROM engine_trials WHERE key = ?", (key,))
                for t in trials:
                    self.conn.execute(
                        "INSERT INTO engine_trials (key, model, version, variant, backend, precision, passed, error, "
                        "max_abs_err, latency_ms, load_ms, tried, measured_at, proof) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (key, model, version, t.id, t.backend, t.precision, int(t.passed), t.error, t.max_abs_err,
                         t.latency_ms, t.load_ms, int(t.tried), now, t.proof))
                self.conn.execute("INSERT OR REPLACE INTO engine_choices VALUES (?,?,?,?,?,?,?)",
                                  (key, model, version, variant, reason, json.dumps(key_doc, sort_keys=True), now))

    # ---- demotions -----------------------------------------------------------------------------
    def demote(self, model: str, version: str, variant: str, reason: str) -> None:
        with self._lock:
            self.conn.execute("INSERT OR REPLACE INTO engine_demotions VALUES (?,?,?,?,?)",
                              (model, version, variant, reason, time.time()))

    def demotions(self, model: str, version: str) -> dict[str, str]:
        """Demoted variant id -> reason, for one installed version."""
        with self._lock:
            rows = self.conn.execute("SELECT variant, reason FROM engine_demotions WHERE model = ? AND version = ?",
                                     (model, version)).fetchall()
            return {r["variant"]: r["reason"] for r in rows}

    # ---- rollback probation --------------------------------------------------------------------
    def count_job(self, model: str, version: str, ok: bool) -> tuple[int, int]:
        """Count one job that succeeded (``ok``) or failed on ``version``; returns (ok_jobs, failed_jobs)."""
        with self._lock:
            column = "ok_jobs" if ok else "failed_jobs"
            with db.transaction(self.conn):
                self.conn.execute("INSERT OR IGNORE INTO engine_versions (model, version) VALUES (?, ?)",
                                  (model, version))
                self.conn.execute(f"UPDATE engine_versions SET {column} = {column} + 1 WHERE model = ? AND version = ?",
                                  (model, version))
            return self.job_counts(model, version)

    def job_counts(self, model: str, version: str) -> tuple[int, int]:
        with self._lock:
            row = self.conn.execute("SELECT ok_jobs, failed_jobs FROM engine_versions WHERE model = ? AND version = ?",
                                    (model, version)).fetchone()
            return (int(row["ok_jobs"]), int(row["failed_jobs"])) if row else (0, 0)
