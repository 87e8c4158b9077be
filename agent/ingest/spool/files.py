"""Where the spool keeps its files, and the small filesystem steps its parts share.

Takes the spool root; gives the layout's paths (``<root>/<study_uid>/<series_uid>/<sop_uid>.dcm``,
the temp directory ``<root>/.tmp`` and the pool ``<root>/.pool``), a durable ``mkdir -p``, a
removal that never raises, and the translation of an ``OSError`` into the ``StorageError`` the
C-STORE handler maps to a status.

Directory entries matter for crash safety: a directory the spool creates is fsynced into its
parent at once (``makedirs_durable``), so a file renamed into it later needs only its own
directory fsynced to survive a power cut.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

from agent.core import util
from agent.core.errors import OutOfSpaceError, StorageError
from agent.core.log import log_event
from agent.ingest.sopclasses import is_valid_uid
from agent.ingest.spool.header import Header

__all__ = ["SpoolLayout", "makedirs_durable", "path_part", "remove_quietly", "storage_error"]

# the package logs under one name, as it did when it was a single module
logger = logging.getLogger("agent.ingest.spool")


@dataclass(frozen=True)
class SpoolLayout:
    """The spool's directory tree under ``root`` (an absolute path)."""

    root: Path

    @property
    def tmp_dir(self) -> Path:
        """Where ``store_file`` stages a file before its rename (never acknowledged data)."""
        return self.root / ".tmp"

    @property
    def pool_dir(self) -> Path:
        """The pool of pre-created files (see ``agent.ingest.spool.pool``)."""
        return self.root / ".pool"

    def final_path(self, header: Header) -> Path:
        """Where an instance lives once stored; UIDs that are unsafe as names are hashed."""
        series_dir = self.root / path_part(header.study_uid) / path_part(header.series_uid)
        return series_dir / f"{path_part(header.sop_instance_uid)}.dcm"

    def new_temp_path(self) -> Path:
        return self.tmp_dir / f"{uuid4().hex}.part"

    def remove_stale_temps(self) -> None:
        """Empty ``.tmp`` at start-up: a temp file is never acknowledged data (the peer got no
        Success for it)."""
        removed = 0
        for p in self.tmp_dir.iterdir():
            if p.is_file():
                remove_quietly(p)
                removed += 1
        if removed:
            log_event(logger, "spool.stale_temps_removed", logging.WARNING, count=removed)

    def iter_spooled(self) -> Iterator[Path]:
        """Every ``.dcm`` file in place (outside ``.tmp`` and the pool)."""
        for study in self.root.iterdir():
            if not study.is_dir() or study in (self.tmp_dir, self.pool_dir):
                continue
            for series in study.iterdir():
                if series.is_dir():
                    yield from (p for p in series.iterdir() if p.suffix == ".dcm" and p.is_file())

    def remove_empty_dirs(self, d: Path) -> None:
        """Remove ``d`` and its parents up to (not including) the root while they are empty."""
        while d != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass  # already gone: nothing to remove at this level
            except OSError:
                return  # not empty (another series of the study, or an orphan): keep it
            d = d.parent


def path_part(uid: str) -> str:
    """A UID as a safe file/directory name; anything else (../, odd characters) is hashed."""
    if is_valid_uid(uid):
        return uid
    return "x" + util.sha256_bytes(uid.encode("utf-8", "surrogateescape"))[:40]


def makedirs_durable(d: Path, *, stop_at: Path) -> None:
    """mkdir -p ``d``; fsync the parent of each directory created so the entry survives a crash."""
    missing: list[Path] = []
    p = d
    while not p.exists() and p != stop_at:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=util.PRIVATE_DIR)
        except FileExistsError:
            continue
        # looked up at call time (util.fsync_dir), so a test can watch which directories are synced
        util.fsync_dir(p.parent)


def remove_quietly(p: Path) -> None:
    """``util.unlink_quietly``, logging instead of raising any other failure.

    Every caller is cleaning up (a refused store, retention, a stale temp): an error here must not
    replace the outcome the caller is about to report.
    """
    try:
        util.unlink_quietly(p)
    except OSError as exc:
        log_event(logger, "spool.unlink_failed", logging.WARNING, file=p.name, error=exc.strerror)


def storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an OS error into the domain error the C-STORE handler maps to a status."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(f"disk full while {what}")
    return StorageError(f"{what}: {exc.strerror or exc}")
