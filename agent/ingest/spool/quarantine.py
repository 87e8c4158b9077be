"""Quarantine: where malformed instances go, byte for byte as received, with a JSON sidecar.

Takes the bytes a peer sent (a temp file, or the buffer the listener received) and the reason the
header parser gave; writes ``<quarantine>/<id>.dcm`` and ``<id>.json``, records a ``quarantine``
row, and returns the ``QuarantinedError`` the store raises (the C-STORE handler answers 0xC210).

Unlike the fast store path, quarantine fsyncs its file, the sidecar and the directory, and commits
its row with ``synchronous=FULL``: nothing else could rebuild them. A failure to quarantine is
logged (``quarantine.failed``) but still returns the error: the peer gets a failure status either
way, so it keeps its copy.

The sidecar holds the reason, sizes, a SHA-256 and the file meta UIDs only when they are well-formed
UIDs; no patient field is read, logged or written.

The quarantine is bounded (``QuarantineLimits``, config ``[quarantine]``): after each new entry,
and when the spool opens, the oldest entries are deleted (file, sidecar, row) while there are more
than ``max_files``, more than ``max_bytes`` in all, or entries older than ``max_age_s``. A flood of
malformed instances therefore costs at most that much disk, and never the spool's free space.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

from agent.core import util
from agent.core.errors import MalformedDicomError
from agent.core.log import log_event
from agent.ingest.spool.files import remove_quietly
from agent.ingest.spool.header import file_meta_summary
from agent.ingest.spool.journal import Journal

__all__ = ["Quarantine", "QuarantineLimits", "QuarantinedError"]

logger = logging.getLogger("agent.ingest.spool")


class QuarantinedError(MalformedDicomError):
    """A malformed instance whose bytes were moved to quarantine (status 0xC210).

    ``quarantine_id`` names ``<quarantine>/<id>.dcm`` and its ``.json`` sidecar; ``reason`` says
    what was wrong without quoting any patient field.
    """

    def __init__(self, reason: str, *, quarantine_id: str, path: Path, sop_instance_uid: str = "") -> None:
        super().__init__(f"malformed instance quarantined as {quarantine_id}: {reason}")
        self.reason = reason
        self.quarantine_id = quarantine_id
        self.path = path
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class QuarantineLimits:
    max_files: int = 1000
    max_bytes: int = 1024 * 1024 * 1024
    max_age_s: float = 30 * 86400.0


class Quarantine:
    """The quarantine directory (created by the spool) and its rows in ``journal``."""

    def __init__(self, directory: Path, journal: Journal, clock: Callable[[], float],
                 limits: QuarantineLimits | None = None) -> None:
        self.dir = directory
        self._journal = journal
        self._clock = clock
        self.limits = limits or QuarantineLimits()
        self._lock = threading.Lock()
        # (id, received_at, bytes) oldest first; loaded from the journal by the first prune()
        self._entries: deque[tuple[str, float, int]] | None = None
        self._bytes = 0

    def prune(self) -> int:
        """Delete the oldest entries beyond the limits; returns how many were deleted."""
        with self._lock:
            if self._entries is None:
                self._load()
            assert self._entries is not None
            lim, doomed = self.limits, []
            now = self._clock() if self._entries else 0.0  # (an injected test clock is not consumed)
            while self._entries and (len(self._entries) > lim.max_files or self._bytes > lim.max_bytes
                                     or now - self._entries[0][1] > lim.max_age_s):
                qid, _, size = self._entries.popleft()
                self._bytes -= size
                doomed.append(qid)
        if doomed:
            try:
                self._journal.delete_quarantine(doomed)
            except sqlite3.Error as exc:
                log_event(logger, "quarantine.prune_failed", logging.ERROR, error=repr(exc))
            for qid in doomed:
                for suffix in (".dcm", ".json"):
                    remove_quietly(self.dir / f"{qid}{suffix}")
            log_event(logger, "quarantine.pruned", logging.INFO, deleted=len(doomed), kept=len(self._entries or ()),
                      max_files=lim.max_files, max_mb=lim.max_bytes // (1024 * 1024))
        return len(doomed)

    def _load(self) -> None:
        entries: deque[tuple[str, float, int]] = deque()
        total = 0
        for qid, path, received_at in self._journal.quarantined():
            try:
                size = Path(path).stat().st_size
            except OSError:
                size = 0
            entries.append((qid, received_at, size))
            total += size
        self._entries, self._bytes = entries, total

    def _added(self, qid: str, received_at: float, size: int) -> None:
        with self._lock:
            if self._entries is not None:
                self._entries.append((qid, received_at, size))
                self._bytes += size
        self.prune()

    def take_file(self, tmp: Path, reason: str, *, calling_ae: str) -> QuarantinedError:
        """Move ``tmp`` (the raw bytes as received) to quarantine with a JSON sidecar and a row."""
        qid = uuid4().hex
        dst = self.dir / f"{qid}.dcm"
        received_at = self._clock()
        meta = file_meta_summary(tmp)
        try:
            size = tmp.stat().st_size
            digest = util.sha256_file(tmp)
            try:
                os.replace(tmp, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # quarantine on another filesystem: copy durably, then drop the temp
                shutil.copyfile(tmp, dst)
                util.fsync_file(dst)
                remove_quietly(tmp)
            self._record(qid, dst, reason, calling_ae, received_at, size, digest, meta)
        except (OSError, sqlite3.Error) as exc:
            # the peer still gets a failure status, so it keeps its copy; a temp that could not be
            # moved stays in .tmp until the next start-up
            log_event(logger, "quarantine.failed", logging.ERROR, quarantine_id=qid, error=repr(exc))
        return self._quarantined(qid, dst, reason, calling_ae, meta)

    def take_bytes(self, data: bytes, reason: str, *, calling_ae: str) -> QuarantinedError:
        """Write ``data`` (the raw bytes as received) to quarantine with a JSON sidecar and a row."""
        qid = uuid4().hex
        dst = self.dir / f"{qid}.dcm"
        received_at = self._clock()
        meta = file_meta_summary(io.BytesIO(data))
        try:
            with open(dst, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._record(qid, dst, reason, calling_ae, received_at, len(data), util.sha256_bytes(data), meta)
        except (OSError, sqlite3.Error) as exc:
            # the peer still gets a failure status, so it keeps its copy
            log_event(logger, "quarantine.failed", logging.ERROR, quarantine_id=qid, error=repr(exc))
        return self._quarantined(qid, dst, reason, calling_ae, meta)

    def _record(self, qid: str, dst: Path, reason: str, calling_ae: str, received_at: float,
                size: int, digest: str, meta: dict[str, str]) -> None:
        """Sidecar, directory fsync and row for a quarantined file already durable at ``dst``."""
        sidecar = {
            "id": qid,
            "reason": reason,
            "calling_ae": calling_ae,
            "received_at": received_at,
            "size": size,
            "sha256": digest,
            **meta,
        }
        side = self.dir / f"{qid}.json"
        with open(side, "x", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        util.fsync_dir(self.dir)
        self._journal.add_quarantine(qid, dst, reason, calling_ae, received_at)
        self._added(qid, received_at, size)

    def _quarantined(self, qid: str, dst: Path, reason: str, calling_ae: str,
                     meta: dict[str, str]) -> QuarantinedError:
        sop_instance_uid = meta.get("media_storage_sop_instance_uid", "")
        log_event(logger, "instance.quarantined", logging.WARNING, quarantine_id=qid, reason=reason,
                  calling_ae=calling_ae, sop_instance_uid=sop_instance_uid)
        return QuarantinedError(reason, quarantine_id=qid, path=dst, sop_instance_uid=sop_instance_uid)
