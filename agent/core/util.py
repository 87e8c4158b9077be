"""The helpers every stage needs, written once: durable files, SHA-256, timestamps.

Durability is the point of most of them. A file that must survive a power cut is written to a
temporary name in the same folder, ``fsync``ed, renamed over the final name, and the folder is
``fsync``ed so the rename itself is on disk (``atomic_write``); a reader therefore sees the old
complete file or the new complete file, never a torn one. Callers that need a different error type
(``RegistryError``, ``SpoolError``) translate ``OSError`` at their edge.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB: models and DICOM files can be large; hashing never reads them whole

#: the agent's state (spool, quarantine, database, outbox, models) is its user's alone: patient
#: names are inside. The daemon sets this umask at start (``set_private_umask``) and creates its
#: files and folders with these modes explicitly as well, so neither depends on the other.
PRIVATE_UMASK = 0o077
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


# ---- private files ------------------------------------------------------------------------------
def set_private_umask() -> int:
    """Make every file this process creates from now on ``0600``/``0700``; returns the old umask."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: Path | str) -> bool:
    """``mkdir -p`` ``path`` with mode 0700; an existing folder that group or others can access
    (made by an older version under umask 022) is tightened to 0700. True when it tightened one."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return tighten(p, PRIVATE_DIR)


def tighten(path: Path | str, mode: int) -> bool:
    """chmod ``path`` to ``mode`` when it grants group/others anything; True when it changed it.
    A missing path is left alone (False)."""
    try:
        current = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return False
    if not current & 0o077:
        return False
    os.chmod(path, mode)
    return True


# ---- durable files ------------------------------------------------------------------------------
def fsync_dir(path: Path | str) -> None:
    """fsync a directory so a creation, rename or removal inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path | str) -> None:
    """fsync a file's data and metadata (for a file written by someone else, e.g. a download)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path | str, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``final`` is
    left as it was. ``mode``: the file's permission bits; default 0666 minus the umask, as a plain
    ``open()`` would give (``mkstemp`` alone gives 0600, which a static web server cannot read).
    The caller writes and fsyncs the file's data; the folder is fsynced after the rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, (0o666 & ~_umask()) if mode is None else mode)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_write(final: Path | str, data: bytes | str, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``final`` atomically and durably (temp + fsync + rename + folder fsync)."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(final, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    return Path(final)


def unlink_quietly(path: Path) -> None:
    """Remove ``path``; already gone is the goal, so a missing file is not an error."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# ---- hashing ------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    """Lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, chunk: int = _CHUNK) -> str:
    """Lower-case hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---- time ---------------------------------------------------------------------------------------
def iso_utc(ts: float | None = None, *, timespec: str = "milliseconds") -> str:
    """ISO 8601 UTC with a ``Z`` suffix (``2026-12-03T20:11:52.123Z``); ``ts`` epoch seconds,
    default now. Every timestamp the agent writes to the wire or to a record uses this form."""
    when = _dt.datetime.fromtimestamp(time.time() if ts is None else ts, _dt.timezone.utc)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")
