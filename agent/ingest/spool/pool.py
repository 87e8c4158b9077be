"""The pool of pre-created files and the commit mark that makes a filled one recoverable.

Takes the pool directory ``<root>/.pool``; hands out empty files whose directory entries are
already durable (created in batches, one directory fsync per batch), so writing an instance into
one and ``fdatasync``-ing it is all it takes to make the instance durable: ``fdatasync`` persists
the data and the file size, and the name needed no flush of its own.

The commit mark goes into the 128-byte Part 10 preamble of every pooled instance: magic, total
file length, CRC-32 of everything after the preamble, written with the data in the same
``fdatasync``. After a crash a pool file whose mark verifies was (or was about to be) acknowledged
and is moved into place; one whose mark is missing or does not match (a crash during the write or
before ``fdatasync`` returned) was never acknowledged and is dropped, and the peer sends it again.
Without the mark a half-written file with a complete header would be journaled, and the resend
then discarded as a duplicate of a corrupt copy. The preamble is ours to use (PS3.10 7.1:
"available for use as defined by ... specific implementations"); it never travels over the
network and readers skip it.

Measured alternatives (ext4 on a virtio disk with a volatile write cache): a fresh temp file with
fsync + rename + directory fsync costs three device flushes; pre-allocating (``fallocate``) or
pre-zeroing pool files to the instance size, which spares ``fdatasync`` the metadata commit, did
not make it faster: the device flush itself dominates, so one flush per instance is the floor for
a synchronous peer (storescu waits for each response), and the pool path pays exactly that.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from uuid import uuid4

from agent.core import util
from agent.core.log import log_event
from agent.ingest.spool.files import remove_quietly

__all__ = ["PREAMBLE", "Pool", "fdatasync", "marked", "verify_mark_file", "write_all", "write_marked"]

logger = logging.getLogger("agent.ingest.spool")

PREAMBLE = 128
_MARK_MAGIC = b"edge-agent:spool"
_MARK = struct.Struct("<16sQI")
_MARK_PAD = bytes(PREAMBLE - _MARK.size)
_READ_CHUNK = 1024 * 1024

_POOL_SUFFIX = ".pool"
# a store creates this many when it finds the pool empty (one directory fsync for all)
_INLINE_BATCH = 8


class Pool:
    """Free pool files (durable, empty) and those handed to a store in progress.

    Thread-safe with a lock of its own, so taking a file never waits on the journal. ``size`` files
    are kept ready; ``refill()`` tops the pool up once it falls below half of that.
    """

    def __init__(self, pool_dir: Path, size: int) -> None:
        self.dir = pool_dir
        self._lock = threading.Lock()
        self._free: deque[Path] = deque()
        # handed out and not yet renamed or discarded: reconcile() must not touch these
        self._in_use: set[Path] = set()
        self._target = max(1, size)
        self._low = max(1, self._target // 2)

    def load(self) -> None:
        """Adopt the empty pool files a previous run left (non-empty ones are reconcile()'s)."""
        free: list[Path] = []
        for p in self.dir.iterdir():
            if p.suffix != _POOL_SUFFIX:
                continue
            try:
                if p.is_file() and p.stat().st_size == 0:
                    free.append(p)
            except FileNotFoundError:
                continue  # removed while we looked: not ours to adopt
        if free:
            # after a process crash (not a power loss) their names may be visible yet not durable
            util.fsync_dir(self.dir)
        with self._lock:
            self._free.extend(free)

    def take(self) -> tuple[Path, bool]:
        """A durable empty file for one store, and whether the pool is now below its low-water
        mark (time to refill in the background). Creates a small batch only if the pool is empty.

        Raises ``OSError`` when it has to create files and cannot.
        """
        with self._lock:
            path = self._free.popleft() if self._free else None
            if path is not None:
                self._in_use.add(path)
            low = len(self._free) < self._low
        if path is None:
            made = self._create(_INLINE_BATCH)
            path = made.pop()
            with self._lock:
                self._in_use.add(path)
                self._free.extend(made)
        return path, low

    def release(self, path: Path) -> None:
        """``path`` was renamed out of the pool: it is no longer the pool's."""
        with self._lock:
            self._in_use.discard(path)

    def discard(self, path: Path, *, unmark: bool = False) -> None:
        """Drop a pool file a store could not use (its content, if any, was never acknowledged).

        The unlink is not flushed: after a crash the file may be back, and reconcile() judges it
        by its mark. With ``unmark`` the mark is zeroed and flushed first, for content that
        verifies but must not be recovered (an instance refused with an error status).
        """
        if unmark:
            try:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, bytes(_MARK.size), 0)
                    fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log_event(logger, "spool.unmark_failed", logging.WARNING, file=path.name,
                          error=exc.strerror or type(exc).__name__)
        remove_quietly(path)
        self.release(path)

    def refill(self) -> bool:
        """Top the pool up to its target when it is below the low-water mark; True if it did."""
        with self._lock:
            missing = self._target - len(self._free)
            if len(self._free) >= self._low:
                return False
        made = self._create(missing)
        with self._lock:
            self._free.extend(made)
        return True

    def try_refill(self) -> None:
        """``refill`` where failing must not stop the caller (construction, reconcile)."""
        try:
            self.refill()
        except OSError as exc:
            # no inodes or space left: stores create pool files themselves and report the error
            log_event(logger, "spool.pool_refill_failed", logging.WARNING,
                      error=exc.strerror or type(exc).__name__)

    def known(self) -> set[Path]:
        """The files the pool is tracking (free or in use): everything else in it is a leftover."""
        with self._lock:
            return set(self._in_use) | set(self._free)

    def adopt(self, path: Path) -> None:
        """Take an empty leftover file back as a free one."""
        with self._lock:
            self._free.append(path)

    def _create(self, n: int) -> list[Path]:
        """Create ``n`` empty files in the pool and make their names durable (one dir fsync)."""
        made: list[Path] = []
        try:
            for _ in range(n):
                p = self.dir / f"{uuid4().hex}{_POOL_SUFFIX}"
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, util.PRIVATE_FILE))
                made.append(p)
            util.fsync_dir(self.dir)
        except BaseException:
            # a file whose name may not be durable must never hold an acknowledged instance
            for p in made:
                remove_quietly(p)
            raise
        return made


# ---------------------------------------------------------------------- commit mark


def marked(data: memoryview) -> list[memoryview | bytes]:
    """``data`` (a Part 10 encoding) with its preamble replaced by the commit mark, as parts."""
    body = data[PREAMBLE:]
    return [_MARK.pack(_MARK_MAGIC, data.nbytes, zlib.crc32(body)) + _MARK_PAD, body]


def write_marked(path: Path, data: memoryview) -> None:
    """Write ``data`` with the commit mark into the (empty, durable) pool file ``path``; fdatasync.

    ``fdatasync`` persists the data and the file size: the name is already durable, so the
    instance is too. (``Spool.store_bytes`` does the same inline, with the parse overlapping the
    flush.)
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        write_all(fd, marked(data))
        fdatasync(fd)
    finally:
        os.close(fd)


def verify_mark_file(path: Path) -> bool | None:
    """True when the file carries a commit mark matching its length and content, False when the
    mark is there but does not match (a torn or unfinished write), None when it has no mark."""
    with open(path, "rb") as f:
        head = f.read(_MARK.size)
        if len(head) < _MARK.size:
            return None
        magic, length, crc = _MARK.unpack(head)
        if magic != _MARK_MAGIC:
            return None
        if os.fstat(f.fileno()).st_size != length:
            return False
        f.seek(PREAMBLE)
        actual = 0
        for chunk in iter(lambda: f.read(_READ_CHUNK), b""):
            actual = zlib.crc32(chunk, actual)
    return actual == int(crc)


def write_all(fd: int, parts: Sequence[memoryview | bytes]) -> None:
    """``writev`` until every byte is written (a regular file takes it all unless interrupted)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def fdatasync(fd: int) -> None:
    # looked up at call time (tests patch os.fdatasync); platforms without it fall back to fsync
    getattr(os, "fdatasync", os.fsync)(fd)
