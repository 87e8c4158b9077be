"""Durable storage of received DICOM instances and their SQLite journal.

The listener hands the spool the bytes a peer sent (file meta and the data set exactly as encoded
on the wire); the spool makes them durable before anyone acknowledges them. The guarantee: when
``store_bytes`` returns, the instance survives a crash or power loss *and* will be processed (it is
journaled now, or re-journaled by ``reconcile()`` at the next start-up).

Fast path (``store_bytes``)
---------------------------
1. check the free-space floor (counting the incoming size) -> ``OutOfSpaceError``, nothing written;
2. take a file from the *pool* ``<root>/.pool``: empty files created ahead of time in batches
   whose directory entries were made durable with one directory fsync per batch;
3. write the instance into it with a *commit mark* in the 128-byte preamble (magic, total length,
   CRC-32 of everything after the preamble) and ``fdatasync`` it. ``fdatasync`` persists the
   data and the file size; the file's name was already durable, so nothing else is needed: the
   instance is now durable, with one device flush instead of three (file, directory, journal).
   While this thread waits for the device, a helper thread parses the header from the bytes in
   memory (pydicom, stopping before the pixel data) and asks the journal about duplicates, so the
   parse costs no time of its own;
4. a data set that does not parse or lacks a required UID -> quarantine + ``MalformedDicomError``;
   an unaccepted SOP class -> ``UnsupportedDicomError`` (the pool file's mark is zeroed and
   flushed, so a crash cannot resurrect it); a SOP Instance UID already journaled -> duplicate,
   the first copy is kept (``created=False``); in all three cases the pool file is removed;
5. ``rename`` the pool file to ``<root>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm`` without a
   directory fsync, and insert the ``instances`` row on a connection with ``synchronous=NORMAL``
   (a WAL commit without a flush).

Only then may the caller answer Success.

Why that is enough: the files are the source of truth and ``reconcile()`` rebuilds everything
else from them. After a crash an acknowledged instance is in exactly one of two places (a rename
is atomic on a journaling filesystem): still in the pool (the rename was not yet on disk) or in
place (its row possibly lost with the unsynced WAL tail). ``reconcile()`` moves pool files whose
commit mark verifies into place, journals spooled files that lack a row, and leaves empty pool
files for reuse. A pool file whose mark is missing or does not verify (a crash during the write or
before ``fdatasync`` returned) was never acknowledged and is dropped: the peer got no Success and
sends it again. The mark is what makes that distinction safe: without it a half-written file with
a complete header would be journaled, and the peer's resend would then be discarded as a duplicate
of a corrupt copy. The preamble is ours to use (PS3.10 7.1: "available for use as defined by ...
specific implementations"); it never travels over the network and readers skip it.

The renames become durable in their final directories with the next journal commit the
filesystem makes anyway (every ``fdatasync`` of a growing file commits ext4's journal), and at the
latest when a background thread fsyncs the series directories touched and the pool directory:
every ``sync_interval_s`` seconds, sooner after many renames, and in ``close()``. That thread
also refills the pool; the store path creates pool files itself only when the pool is empty. It is
started on demand and exits when idle; the parse helpers (a small thread pool, also created on
first use) stay until ``close()``.

Measured alternatives (ext4 on a virtio disk with a volatile write cache): a fresh temp file with
fsync + rename + directory fsync costs three device flushes; pre-allocating (``fallocate``) or
pre-zeroing pool files to the instance size, which spares ``fdatasync`` the metadata commit, did
not make it faster: the device flush itself dominates, so one flush per instance is the floor for
a synchronous peer (storescu waits for each response), and this path pays exactly that.

Slow paths, unchanged in substance: ``store_file`` (pynetdicom's chunked receive) links or copies
the file into ``<root>/.tmp``, fsyncs it, renames it into place and fsyncs the directory;
quarantine fsyncs its file, sidecar and directory; retention deletes and quarantine rows commit
with ``synchronous=FULL`` (those rows are not reconstructible from the files).

Assumes a journaling filesystem whose metadata operations reach the disk in order and atomically
(ext4 with ``data=ordered``, XFS), as crash-safe renames always do.

Nothing here reads or logs patient fields; the journal holds UIDs and routing attributes only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from agent.db import transaction
from agent.errors import MalformedDicomError, OutOfSpaceError, StorageError, UnsupportedDicomError
from agent.ingest.sopclasses import is_image_storage, is_valid_uid, sop_class_name
from agent.log import log_event
from agent.types import Instance

__all__ = ["QuarantinedError", "Spool", "dataset_offset"]

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
_COPY_CHUNK = 1024 * 1024

# (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

_TAG_SOP_CLASS = 0x00080016
_TAG_SOP_INSTANCE = 0x00080018
_TAG_MODALITY = 0x00080060
_TAG_SERIES_DESCRIPTION = 0x0008103E
_TAG_BODY_PART = 0x00180015
_TAG_STUDY_UID = 0x0020000D
_TAG_SERIES_UID = 0x0020000E
_TAG_INSTANCE_NUMBER = 0x00200013

# Commit mark written into the Part 10 preamble of every pooled instance: magic, total file
# length, CRC-32 of the bytes after the preamble. Written with the data, in the same fdatasync.
_PREAMBLE = 128
_MARK_MAGIC = b"edge-agent:spool"
_MARK = struct.Struct("<16sQI")
_MARK_PAD = bytes(_PREAMBLE - _MARK.size)

_POOL_SUFFIX = ".pool"
# the store path creates this many when it finds the pool empty (one directory fsync for all)
_POOL_INLINE_BATCH = 8
# a background worker with nothing to do for this many ticks exits (a store restarts it)
_WORKER_IDLE_TICKS = 5

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


class DiskUsage(Protocol):
    """What ``shutil.disk_usage`` returns; only ``free`` (bytes) is used."""

    @property
    def free(self) -> int: ...


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
class _Header:
    """The header fields the spool needs, read without touching the pixel data."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str
    series_description: str
    body_part: str
    instance_number: int


class Spool:
    """The spool directory, its quarantine and the ``instances`` / ``quarantine`` tables.

    ``root`` and ``quarantine`` are created if missing. ``conn`` comes from ``agent.db.connect``;
    the spool serialises its own use of it with a lock, so the listener's association threads and
    the assembler may call the spool concurrently. Give the spool a connection of its own: other
    code using the same connection outside this lock could interleave with its statements, and the
    spool sets ``synchronous=NORMAL`` on it (see the module docstring). ``min_free_mb`` is the
    floor below which instances are refused; ``disk_usage`` is injectable so tests can fake a full
    disk. ``pool_size`` empty files are kept ready in ``<root>/.pool``; directories touched by
    stores are fsynced every ``sync_interval_s`` seconds (or after ``sync_every`` renames) by a
    background thread. Call ``close()`` at shutdown to make those renames durable at once.
    """

    def __init__(
        self,
        root: Path,
        quarantine: Path,
        conn: sqlite3.Connection,
        min_free_mb: int,
        *,
        disk_usage: Callable[[Path], DiskUsage] = shutil.disk_usage,
        clock: Callable[[], float] = time.time,
        pool_size: int = 128,
        sync_interval_s: float = 2.0,
        sync_every: int = 512,
    ) -> None:
        self.root = Path(root).absolute()
        self.quarantine_dir = Path(quarantine).absolute()
        self.tmp_dir = self.root / ".tmp"
        self.pool_dir = self.root / ".pool"
        self.min_free_mb = min_free_mb
        self.sync_interval_s = sync_interval_s
        self._conn = conn
        self._disk_usage = disk_usage
        self._clock = clock
        # One lock for the journal and for directory create/rename/delete: sqlite3 connections are
        # not safe for interleaved use across threads, and retention must not rmdir a series
        # directory between a store's mkdir and its rename.
        self._lock = threading.RLock()
        # The pool: free files (durable, empty) and those handed to a store in progress (which
        # reconcile() must not touch). Its own lock, so taking a file never waits on the journal.
        self._pool_lock = threading.Lock()
        self._pool: deque[Path] = deque()
        self._in_use: set[Path] = set()
        self._pool_target = max(1, pool_size)
        self._pool_low = max(1, self._pool_target // 2)
        # Background worker state: directories with renames not yet fsynced, and the worker itself.
        self._bg_lock = threading.Lock()
        self._wake = threading.Event()
        self._dirty: set[Path] = set()
        self._dirty_count = 0
        self._sync_every = max(1, sync_every)
        self._worker: threading.Thread | None = None
        self._helpers: ThreadPoolExecutor | None = None
        self._closing = False

        for d in (self.root, self.tmp_dir, self.pool_dir, self.quarantine_dir):
            _makedirs_durable(d, stop_at=Path(d.anchor))
        with self._lock:
            self._conn.executescript(_SCHEMA)
            # the files are the source of truth (see the module docstring): a row lost with the
            # unsynced WAL tail is rebuilt by reconcile(), so commits need not flush the device
            self._conn.execute("PRAGMA synchronous=NORMAL")
        self._remove_stale_temps()
        self._load_pool()
        self._try_refill_pool()

    # ------------------------------------------------------------------ storing

    def store_bytes(
        self,
        data: bytes | bytearray | memoryview,
        *,
        calling_ae: str = "",
        sop_classes: Collection[str] | None = None,
    ) -> tuple[Instance, bool]:
        """Store one Part 10 encoded instance (preamble + file meta + data set) durably.

        Returns ``(instance, created)``; ``created`` is False for a SOP Instance UID already
        stored (the first copy is kept). ``sop_classes``, when given, is the set of SOP classes
        accepted: anything else raises ``UnsupportedDicomError`` and is not kept.
        Raises ``OutOfSpaceError`` (nothing written), ``QuarantinedError`` (a
        ``MalformedDicomError``; bytes moved to quarantine) or ``StorageError``.
        The stored file's preamble carries the spool's commit mark; the rest is ``data`` as is.
        """
        view = memoryview(data).cast("B")
        self._check_space(view.nbytes)
        # BytesIO shares a bytes object's buffer (no copy); the parse stops before the pixels
        payload = data if isinstance(data, bytes) else view.tobytes()
        pooled = self._take_pool_file()
        inspection: Future[tuple[_Header, Instance | None]] | None = None
        try:
            fd = os.open(pooled, os.O_WRONLY)
            try:
                _write_all(fd, _marked(view))
                # the header is parsed (and the journal asked about duplicates) on a helper thread
                # while this one waits for the device: the flush costs the same either way, the
                # parse no longer adds to it. Not the other way round: a thread calling fdatasync
                # would first have to win the GIL from the parsing one.
                inspection = self._inspect_async(payload, sop_classes)
                _fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._discard_pool_file(pooled)
            _settle(inspection)
            raise _storage_error(exc, "writing a received instance") from exc
        except BaseException:
            self._discard_pool_file(pooled)  # nothing half-written stays behind, whatever interrupted us
            _settle(inspection)
            raise
        assert inspection is not None  # set before the flush, which is the last thing that can fail
        try:
            header, existing = inspection.result()
        except MalformedDicomError as exc:
            # reconcile() would drop it too (same parser); no need to flush its removal
            self._discard_pool_file(pooled)
            raise self._quarantine_bytes(view, str(exc), calling_ae=calling_ae) from exc
        except BaseException:
            # UnsupportedDicomError: a durable, verifiable file reconcile() would journal; unmark it
            self._discard_pool_file(pooled, unmark=True)
            raise
        if existing is not None:
            # the journaled first copy is kept; after a crash reconcile() drops this one as well
            self._discard_pool_file(pooled)
            return existing, False
        return self._place_pooled(pooled, header, view.nbytes, calling_ae=calling_ae)

    def _inspect(self, payload: bytes, sop_classes: Collection[str] | None) -> tuple[_Header, Instance | None]:
        """Header of a received instance, checked against ``sop_classes``, and any journaled copy."""
        header = _parse_header(io.BytesIO(payload))
        self._check_sop_class(header, sop_classes)
        return header, self.get(header.sop_instance_uid)

    def _inspect_async(
        self, payload: bytes, sop_classes: Collection[str] | None
    ) -> Future[tuple[_Header, Instance | None]]:
        """``_inspect`` on the helper pool (created on first use), or inline after ``close()``."""
        with self._bg_lock:
            if self._helpers is None and not self._closing:
                self._helpers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-inspect")
            helpers = self._helpers
        if helpers is not None:
            try:
                return helpers.submit(self._inspect, payload, sop_classes)
            except RuntimeError:
                # close() shut the pool down since we looked: inspect inline, below
                log_event(logger, "spool.inspect_inline", logging.DEBUG, reason="closed")
        done: Future[tuple[_Header, Instance | None]] = Future()
        try:
            done.set_result(self._inspect(payload, sop_classes))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future, as the pool does
            done.set_exception(exc)
        return done

    def store_file(
        self,
        tmp_path: Path,
        *,
        calling_ae: str = "",
        sop_classes: Collection[str] | None = None,
    ) -> tuple[Instance, bool]:
        """Store a Part 10 file durably; same result and errors as ``store_bytes``.

        A file already under the spool's ``.tmp`` directory is consumed (renamed into place or
        removed). Any other file (pynetdicom's chunked-receive temp file, a file on disk) is left
        where it is: it is hard-linked into ``.tmp`` when on the same filesystem, copied otherwise.
        This path fsyncs file and directory itself (it is not the hot path; the file is stored
        byte for byte, preamble included).
        """
        tmp_path = Path(tmp_path)
        try:
            size = tmp_path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot read {tmp_path.name}: {exc.strerror}") from exc
        if tmp_path.absolute().parent == self.tmp_dir:
            tmp = tmp_path.absolute()
            try:
                # the bytes are already on the spool's disk; count only what is left
                self._check_space(0)
                _fsync_file(tmp)
            except OSError as exc:
                _unlink_quietly(tmp)
                raise _storage_error(exc, "syncing a received instance") from exc
            except BaseException:
                _unlink_quietly(tmp)
                raise
        else:
            self._check_space(size)
            tmp = self._new_temp_path()
            self._link_or_copy(tmp_path, tmp)
        return self._commit(tmp, calling_ae=calling_ae, sop_classes=sop_classes)

    def _link_or_copy(self, src: Path, dst: Path) -> None:
        """Put ``src``'s bytes at ``dst`` (in .tmp) durably without modifying ``src``."""
        try:
            os.link(src, dst)
        except OSError:
            # other filesystem (EXDEV), or links not permitted: stream a copy instead
            try:
                with open(src, "rb") as fin, open(dst, "xb") as fout:
                    shutil.copyfileobj(fin, fout, _COPY_CHUNK)
                    fout.flush()
                    os.fsync(fout.fileno())
            except OSError as exc:
                _unlink_quietly(dst)
                raise _storage_error(exc, "copying a received instance") from exc
            except BaseException:
                _unlink_quietly(dst)
                raise
            return
        try:
            _fsync_file(dst)
        except OSError as exc:
            _unlink_quietly(dst)
            raise _storage_error(exc, "syncing a received instance") from exc

    def _check_sop_class(self, header: _Header, sop_classes: Collection[str] | None) -> None:
        if sop_classes is not None and header.sop_class_uid not in sop_classes:
            raise UnsupportedDicomError(
                f"SOP class {header.sop_class_uid} ({sop_class_name(header.sop_class_uid)}) not accepted"
            )

    def _final_path(self, header: _Header) -> Path:
        series_dir = self.root / _path_part(header.study_uid) / _path_part(header.series_uid)
        return series_dir / f"{_path_part(header.sop_instance_uid)}.dcm"

    def _new_instance(self, header: _Header, path: Path, size: int, calling_ae: str, received_at: float) -> Instance:
        return Instance(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            path=path,
            transfer_syntax=header.transfer_syntax,
            modality=header.modality,
            received_at=received_at,
            size=size,
            calling_ae=calling_ae,
            series_description=header.series_description,
            body_part=header.body_part,
            instance_number=header.instance_number,
        )

    def _place_pooled(self, pooled: Path, header: _Header, size: int, *, calling_ae: str) -> tuple[Instance, bool]:
        """Rename a durable pool file into place and journal it (or drop it as a duplicate)."""
        final = self._final_path(header)
        with self._lock:
            # again under the lock: another association may have stored the same UID meanwhile
            existing = self._get_locked(header.sop_instance_uid)
            if existing is not None:
                self._discard_pool_file(pooled)
                return existing, False
            try:
                _makedirs_durable(final.parent, stop_at=self.root)
                # replace, not link: a file left there by a crash between rename and insert is
                # the same instance, complete (only durable pool files are ever renamed)
                os.replace(pooled, final)
            except OSError as exc:
                self._discard_pool_file(pooled)
                raise _storage_error(exc, "moving an instance into the spool") from exc
            with self._pool_lock:
                self._in_use.discard(pooled)
            self._note_renamed(final.parent)
            instance = self._new_instance(header, final, size, calling_ae, self._clock())
            try:
                self._insert_locked(instance)
            except sqlite3.Error as exc:
                # the file is durable (it is the peer's data) but not acknowledged; a resend or
                # reconcile() journals it
                raise StorageError(f"journal insert failed: {exc}") from exc
        return instance, True

    def _commit(
        self, tmp: Path, *, calling_ae: str, sop_classes: Collection[str] | None
    ) -> tuple[Instance, bool]:
        """Parse a durable temp file (store_file), rename it into place, fsync, journal it (or not)."""
        try:
            header = _read_header(tmp)
        except MalformedDicomError as exc:
            raise self._quarantine(tmp, str(exc), calling_ae=calling_ae) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise
        try:
            self._check_sop_class(header, sop_classes)
        except UnsupportedDicomError:
            _unlink_quietly(tmp)
            raise

        size = tmp.stat().st_size
        final = self._final_path(header)
        with self._lock:
            existing = self._get_locked(header.sop_instance_uid)
            if existing is not None:
                _unlink_quietly(tmp)
                return existing, False
            try:
                _makedirs_durable(final.parent, stop_at=self.root)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            except OSError as exc:
                _unlink_quietly(tmp)
                raise _storage_error(exc, "moving an instance into the spool") from exc
            instance = self._new_instance(header, final, size, calling_ae, self._clock())
            try:
                self._insert_locked(instance)
            except sqlite3.Error as exc:
                raise StorageError(f"journal insert failed: {exc}") from exc
        return instance, True

    # ------------------------------------------------------------------ the pool

    def _load_pool(self) -> None:
        """Adopt the empty pool files a previous run left (non-empty ones are reconcile()'s)."""
        free: list[Path] = []
        for p in self.pool_dir.iterdir():
            if p.suffix != _POOL_SUFFIX:
                continue
            try:
                if p.is_file() and p.stat().st_size == 0:
                    free.append(p)
            except FileNotFoundError:
                continue  # removed while we looked: not ours to adopt
        if free:
            # after a process crash (not a power loss) their names may be visible yet not durable
            _fsync_dir(self.pool_dir)
        with self._pool_lock:
            self._pool.extend(free)

    def _create_pool_files(self, n: int) -> list[Path]:
        """Create ``n`` empty files in the pool and make their names durable (one dir fsync)."""
        made: list[Path] = []
        try:
            for _ in range(n):
                p = self.pool_dir / f"{uuid.uuid4().hex}{_POOL_SUFFIX}"
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                made.append(p)
            _fsync_dir(self.pool_dir)
        except BaseException:
            # a file whose name may not be durable must never hold an acknowledged instance
            for p in made:
                _unlink_quietly(p)
            raise
        return made

    def _refill_pool(self) -> bool:
        """Top the pool up to its target when it is below the low-water mark; True if it did."""
        with self._pool_lock:
            missing = self._pool_target - len(self._pool)
            if len(self._pool) >= self._pool_low:
                return False
        made = self._create_pool_files(missing)
        with self._pool_lock:
            self._pool.extend(made)
        return True

    def _try_refill_pool(self) -> None:
        """``_refill_pool`` where failing must not stop the caller (construction, reconcile)."""
        try:
            self._refill_pool()
        except OSError as exc:
            # no inodes or space left: stores create pool files themselves and report the error
            log_event(logger, "spool.pool_refill_failed", logging.WARNING, error=exc.strerror or type(exc).__name__)

    def _take_pool_file(self) -> Path:
        """A durable empty file for one store; creates a small batch only if the pool is empty."""
        with self._pool_lock:
            path = self._pool.popleft() if self._pool else None
            if path is not None:
                self._in_use.add(path)
            low = len(self._pool) < self._pool_low
        if path is None:
            try:
                made = self._create_pool_files(_POOL_INLINE_BATCH)
            except OSError as exc:
                raise _storage_error(exc, "creating spool files") from exc
            path = made.pop()
            with self._pool_lock:
                self._in_use.add(path)
                self._pool.extend(made)
        if low:
            self._kick_worker()
        return path

    def _discard_pool_file(self, path: Path, *, unmark: bool = False) -> None:
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
                    _fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log_event(logger, "spool.unmark_failed", logging.WARNING, file=path.name,
                          error=exc.strerror or type(exc).__name__)
        _unlink_quietly(path)
        with self._pool_lock:
            self._in_use.discard(path)

    # ------------------------------------------------------------------ background syncing

    def _note_renamed(self, series_dir: Path) -> None:
        """Remember a directory whose new entry still needs an fsync to be durable there."""
        with self._bg_lock:
            if self._closing:
                inline = True
            else:
                inline = False
                self._dirty.add(series_dir)
                self._dirty_count += 1
                if self._dirty_count >= self._sync_every:
                    self._wake.set()
                if self._worker is None:
                    self._start_worker_locked()
        if inline:
            # after close() no worker runs: make this rename durable now (slow, but correct)
            _fsync_dir(series_dir)
            _fsync_dir(self.pool_dir)

    def _kick_worker(self) -> None:
        with self._bg_lock:
            if self._closing:
                return
            self._wake.set()
            if self._worker is None:
                self._start_worker_locked()

    def _start_worker_locked(self) -> None:
        t = threading.Thread(target=self._worker_main, name="spool-sync", daemon=True)
        self._worker = t
        t.start()

    def _worker_main(self) -> None:
        """Refill the pool and fsync touched directories until closed or idle for a while."""
        idle = 0
        while True:
            self._wake.wait(self.sync_interval_s)
            self._wake.clear()
            worked = False
            try:
                worked = self._refill_pool()
                worked = self._sync_dirty() or worked
            except OSError as exc:
                # e.g. ENOSPC creating pool files: stores still work (they create files when the
                # pool is empty and report the error to the peer); try again next tick
                log_event(logger, "spool.background_failed", logging.WARNING,
                          error=exc.strerror or type(exc).__name__)
                worked = True
            except Exception:  # noqa: BLE001 - logged with traceback; the thread must not die silently
                logger.exception("spool.background_crashed")
                worked = True
            with self._bg_lock:
                if self._closing:
                    self._worker = None
                    return
                idle = 0 if (worked or self._dirty) else idle + 1
                if idle >= _WORKER_IDLE_TICKS:
                    self._worker = None  # the next store starts a new one
                    return

    def _sync_dirty(self) -> bool:
        """fsync the series directories with new entries, then the pool; True if any were."""
        with self._bg_lock:
            dirs, self._dirty, self._dirty_count = self._dirty, set(), 0
        if not dirs:
            return False
        try:
            # new names first, then the pool directory they left: at every point the file has a
            # durable name, even on a filesystem that does not order the two
            for d in sorted(dirs):
                try:
                    _fsync_dir(d)
                except FileNotFoundError:
                    # retention removed the series meanwhile: no entry left to make durable
                    log_event(logger, "spool.sync_skipped", logging.DEBUG, reason="directory removed")
            _fsync_dir(self.pool_dir)
        except BaseException:
            with self._bg_lock:
                self._dirty |= dirs  # all of them again at the next tick (an extra fsync is harmless)
                self._dirty_count += len(dirs)
            raise
        return True

    def close(self) -> None:
        """Stop the background thread and fsync the directories it had yet to sync. Idempotent.

        The spool stays usable; later stores fsync their directory themselves.
        """
        with self._bg_lock:
            self._closing = True
            worker, helpers, self._helpers = self._worker, self._helpers, None
        self._wake.set()
        if worker is not None:
            worker.join()
        if helpers is not None:
            helpers.shutdown(wait=True)
        try:
            self._sync_dirty()
        except OSError as exc:
            # the files are durable in the pool or in place either way; reconcile() finds them
            log_event(logger, "spool.close_sync_failed", logging.WARNING, error=exc.strerror or type(exc).__name__)

    # ------------------------------------------------------------------ quarantine

    def _quarantine(self, tmp: Path, reason: str, *, calling_ae: str) -> QuarantinedError:
        """Move ``tmp`` (the raw bytes as received) to quarantine with a JSON sidecar and a row."""
        qid = uuid.uuid4().hex
        dst = self.quarantine_dir / f"{qid}.dcm"
        received_at = self._clock()
        meta = _file_meta_summary(tmp)
        try:
            size = tmp.stat().st_size
            digest = _sha256(tmp)
            try:
                os.replace(tmp, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # quarantine on another filesystem: copy durably, then drop the temp
                shutil.copyfile(tmp, dst)
                _fsync_file(dst)
                _unlink_quietly(tmp)
            self._record_quarantine(qid, dst, reason, calling_ae, received_at, size, digest, meta)
        except (OSError, sqlite3.Error) as exc:
            # the peer still gets a failure status, so it keeps its copy; a temp that could not be
            # moved stays in .tmp until the next start-up
            log_event(logger, "quarantine.failed", logging.ERROR, quarantine_id=qid, error=repr(exc))
        return self._quarantined(qid, dst, reason, calling_ae, meta)

    def _quarantine_bytes(self, data: memoryview, reason: str, *, calling_ae: str) -> QuarantinedError:
        """Write ``data`` (the raw bytes as received) to quarantine with a JSON sidecar and a row."""
        qid = uuid.uuid4().hex
        dst = self.quarantine_dir / f"{qid}.dcm"
        received_at = self._clock()
        meta = _file_meta_summary_of(io.BytesIO(data))
        try:
            with open(dst, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._record_quarantine(qid, dst, reason, calling_ae, received_at, data.nbytes,
                                    hashlib.sha256(data).hexdigest(), meta)
        except (OSError, sqlite3.Error) as exc:
            # the peer still gets a failure status, so it keeps its copy
            log_event(logger, "quarantine.failed", logging.ERROR, quarantine_id=qid, error=repr(exc))
        return self._quarantined(qid, dst, reason, calling_ae, meta)

    def _record_quarantine(self, qid: str, dst: Path, reason: str, calling_ae: str, received_at: float,
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
        side = self.quarantine_dir / f"{qid}.json"
        with open(side, "x", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.quarantine_dir)
        with self._lock, self._full_sync():
            self._conn.execute(
                "INSERT INTO quarantine (id, path, reason, calling_ae, received_at) VALUES (?,?,?,?,?)",
                (qid, str(dst), reason, calling_ae, received_at),
            )

    def _quarantined(self, qid: str, dst: Path, reason: str, calling_ae: str,
                     meta: dict[str, str]) -> QuarantinedError:
        log_event(
            logger,
            "instance.quarantined",
            logging.WARNING,
            quarantine_id=qid,
            reason=reason,
            calling_ae=calling_ae,
            sop_instance_uid=meta.get("media_storage_sop_instance_uid", ""),
        )
        return QuarantinedError(
            reason,
            quarantine_id=qid,
            path=dst,
            sop_instance_uid=str(meta.get("media_storage_sop_instance_uid", "")),
        )

    # ------------------------------------------------------------------ queries

    def get(self, sop_instance_uid: str) -> Instance | None:
        """The journaled instance with this SOP Instance UID, or None."""
        with self._lock:
            return self._get_locked(sop_instance_uid)

    def instances_for_series(self, series_uid: str) -> list[Instance]:
        """All journaled instances of a series, by instance number then arrival."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM instances WHERE series_uid = ? ORDER BY instance_number, received_at",
                (series_uid,),
            ).fetchall()
        return [_row_to_instance(r) for r in rows]

    def count(self) -> int:
        """Number of journaled instances."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def delete_series(self, series_uid: str) -> int:
        """Delete a series' rows and files (retention); returns how many instances were removed.

        Rows go first (committed with a flush), then files, so a crash in between leaves
        unreferenced files (harmless, removed with the directory next time) rather than rows
        pointing at nothing.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT path FROM instances WHERE series_uid = ?", (series_uid,)
            ).fetchall()
            with self._full_sync(), transaction(self._conn) as c:
                c.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            dirs: set[Path] = set()
            for row in rows:
                path = Path(row["path"])
                _unlink_quietly(path)
                dirs.add(path.parent)
            for d in dirs:
                self._remove_empty_dirs(d)
        log_event(logger, "series.deleted", series_uid=series_uid, instances=len(rows))
        return len(rows)

    def free_mb(self) -> float:
        """Free space on the spool's filesystem, in MiB."""
        return self._disk_usage(self.root).free / _MB

    def reconcile(self) -> int:
        """Rebuild the spool's state from its files after a crash; meant for service start-up.

        (a) pool files whose commit mark verifies (acknowledged, or about to be) are moved into
        place; those whose mark is missing or wrong were never acknowledged and are dropped;
        (b) spooled files without a row (a crash before the row reached the disk) are journaled:
        they are the peer's data, so they are indexed rather than deleted; (c) empty pool files
        stay for reuse; (d) the directories changed are fsynced once at the end.
        Returns how many rows were added.
        """
        touched: set[Path] = set()
        moved, dropped = self._recover_pool(touched)
        added = 0
        with self._lock:
            known = {r["path"] for r in self._conn.execute("SELECT path FROM instances")}
        for path in self._iter_spooled():
            if str(path) in known:
                continue
            try:
                if _verify_mark_file(path) is False:
                    # only verified pool files are ever placed: this one changed on disk since
                    log_event(logger, "reconcile.skipped", logging.WARNING, file=path.name,
                              reason="commit mark does not match")
                    continue
                header = _read_header(path)
                st = path.stat()
            except OSError as exc:
                log_event(logger, "reconcile.skipped", logging.WARNING, file=path.name, reason=exc.strerror)
                continue
            except MalformedDicomError as exc:
                log_event(logger, "reconcile.skipped", logging.WARNING, file=path.name, reason=str(exc))
                continue
            instance = self._new_instance(header, path, st.st_size, "", st.st_mtime)
            with self._lock:
                if self._get_locked(instance.sop_instance_uid) is None:
                    self._insert_locked(instance)
                    added += 1
        if touched:
            for d in sorted(touched):
                _fsync_dir(d)
            _fsync_dir(self.pool_dir)
        self._try_refill_pool()
        if moved or dropped:
            log_event(logger, "spool.pool_recovered", logging.WARNING, moved=moved, dropped=dropped)
        if added:
            log_event(logger, "spool.reconciled", logging.WARNING, added=added)
        return added

    def _recover_pool(self, touched: set[Path]) -> tuple[int, int]:
        """Step (a) of reconcile(): returns (moved into place, dropped)."""
        moved = dropped = 0
        with self._pool_lock:
            skip = set(self._in_use) | set(self._pool)
        for p in sorted(self.pool_dir.iterdir()):
            if p in skip or not p.is_file():
                continue
            header: _Header | None = None
            try:
                if p.stat().st_size == 0:
                    with self._pool_lock:
                        self._pool.append(p)  # (c) empty: reuse it
                    continue
                if _verify_mark_file(p):
                    header = _read_header(p)
            except OSError as exc:
                log_event(logger, "reconcile.skipped", logging.WARNING, file=p.name, reason=exc.strerror)
                continue
            except MalformedDicomError as exc:
                # a malformed instance: answered 0xC210 and quarantined (or never answered)
                log_event(logger, "reconcile.pool_dropped", logging.WARNING, file=p.name, reason=str(exc))
            if header is None:
                # torn or unfinished write: never acknowledged, the peer sends it again
                _unlink_quietly(p)
                dropped += 1
                continue
            final = self._final_path(header)
            with self._lock:
                if final.exists():
                    # a complete copy of the same instance is already in place (a duplicate's)
                    _unlink_quietly(p)
                    dropped += 1
                    continue
                _makedirs_durable(final.parent, stop_at=self.root)
                os.replace(p, final)
            touched.add(final.parent)
            moved += 1
        return moved, dropped

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _full_sync(self) -> Iterator[None]:
        """Commit with ``synchronous=FULL`` inside the block: for rows no file can rebuild.

        Caller holds ``self._lock``. In WAL mode the flush also persists earlier NORMAL commits.
        """
        self._conn.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self._conn.execute("PRAGMA synchronous=NORMAL")

    def _check_space(self, incoming: int) -> None:
        free = self.free_mb()
        if free - incoming / _MB < self.min_free_mb:
            raise OutOfSpaceError(
                f"free space {free:.0f} MB minus incoming {incoming / _MB:.1f} MB is below the "
                f"{self.min_free_mb} MB floor"
            )

    def _new_temp_path(self) -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}.part"

    def _remove_stale_temps(self) -> None:
        # a temp file is never acknowledged data: the peer got no Success for it
        removed = 0
        for p in self.tmp_dir.iterdir():
            if p.is_file():
                _unlink_quietly(p)
                removed += 1
        if removed:
            log_event(logger, "spool.stale_temps_removed", logging.WARNING, count=removed)

    def _iter_spooled(self) -> Iterator[Path]:
        for study in self.root.iterdir():
            if not study.is_dir() or study in (self.tmp_dir, self.pool_dir):
                continue
            for series in study.iterdir():
                if series.is_dir():
                    yield from (p for p in series.iterdir() if p.suffix == ".dcm" and p.is_file())

    def _remove_empty_dirs(self, d: Path) -> None:
        """Remove ``d`` and its parents up to (not including) the root while they are empty."""
        while d != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass  # already gone: nothing to remove at this level
            except OSError:
                return  # not empty (another series of the study, or an orphan): keep it
            d = d.parent

    def _get_locked(self, sop_instance_uid: str) -> Instance | None:
        row = self._conn.execute(
            "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return None if row is None else _row_to_instance(row)

    def _insert_locked(self, i: Instance) -> None:
        self._conn.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, modality,"
            " transfer_syntax, path, size, received_at, calling_ae, series_description, body_part,"
            " instance_number) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                i.sop_instance_uid, i.sop_class_uid, i.study_uid, i.series_uid, i.modality,
                i.transfer_syntax, str(i.path), i.size, i.received_at, i.calling_ae,
                i.series_description, i.body_part, i.instance_number,
            ),
        )


# ---------------------------------------------------------------------- commit mark


def _marked(data: memoryview) -> list[memoryview | bytes]:
    """``data`` (a Part 10 encoding) with its preamble replaced by the commit mark, as parts."""
    body = data[_PREAMBLE:]
    return [_MARK.pack(_MARK_MAGIC, data.nbytes, zlib.crc32(body)) + _MARK_PAD, body]


def _write_marked(path: Path, data: memoryview) -> None:
    """Write ``data`` with the commit mark into the (empty, durable) pool file ``path``; fdatasync.

    ``fdatasync`` persists the data and the file size: the name is already durable, so the
    instance is too. (``store_bytes`` does the same inline, with the parse overlapping the flush.)
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        _write_all(fd, _marked(data))
        _fdatasync(fd)
    finally:
        os.close(fd)


def _settle(future: Future[Any] | None) -> None:
    """Wait for a helper job whose result is no longer wanted (it must not outlive the store)."""
    if future is not None:
        wait([future])


def _verify_mark_file(path: Path) -> bool | None:
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
        f.seek(_PREAMBLE)
        actual = 0
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            actual = zlib.crc32(chunk, actual)
    return actual == crc


def _write_all(fd: int, parts: Sequence[memoryview | bytes]) -> None:
    """``writev`` until every byte is written (a regular file takes it all unless interrupted)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _fdatasync(fd: int) -> None:
    # looked up at call time (tests patch os.fdatasync); platforms without it fall back to fsync
    getattr(os, "fdatasync", os.fsync)(fd)


# ---------------------------------------------------------------------- header parsing


def _read_header(path: Path) -> _Header:
    """``_parse_header`` of a file; a file that cannot be opened is MalformedDicomError too."""
    try:
        f = open(path, "rb")  # closed by the with below; an open error is reported like a parse error
    except OSError as exc:
        raise MalformedDicomError(f"unreadable file ({type(exc).__name__})") from exc
    with f:
        return _parse_header(f)


def _parse_header(fp: BinaryIO) -> _Header:
    """Parse the header of a Part 10 stream up to the pixel data; MalformedDicomError when unusable.

    Values are read from the raw elements rather than through pydicom's converters: conversion
    validates values and its warnings quote them, which must not happen for patient fields (and we
    only need a handful of ASCII attributes anyway).
    """
    seen_pixels: list[int] = []

    def stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        # called for top-level elements only (pydicom reads sequence items without it), so an
        # icon image's pixel data inside a sequence does not count
        if int(tag) in _PIXEL_TAGS:
            seen_pixels.append(int(tag))
            return True
        return False

    try:
        ds = read_partial(fp, stop_when=stop_at_pixels)
        transfer_syntax = _raw_str(ds.file_meta, 0x00020010) if ds.file_meta else ""
        fields = {tag: _raw_str(ds, tag) for tag in (
            _TAG_SOP_CLASS, _TAG_SOP_INSTANCE, _TAG_STUDY_UID, _TAG_SERIES_UID, _TAG_MODALITY,
            _TAG_SERIES_DESCRIPTION, _TAG_BODY_PART, _TAG_INSTANCE_NUMBER,
        )}
    except InvalidDicomError as exc:
        raise MalformedDicomError(f"not a DICOM Part 10 file: {_short(exc)}") from exc
    except MalformedDicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise MalformedDicomError(f"unparseable data set ({type(exc).__name__}: {_short(exc)})") from exc

    missing = [
        name
        for name, tag in (
            ("SOPClassUID", _TAG_SOP_CLASS),
            ("SOPInstanceUID", _TAG_SOP_INSTANCE),
            ("StudyInstanceUID", _TAG_STUDY_UID),
            ("SeriesInstanceUID", _TAG_SERIES_UID),
        )
        if not fields[tag]
    ]
    if missing:
        raise MalformedDicomError(f"missing {', '.join(missing)}")
    if not transfer_syntax:
        raise MalformedDicomError("missing TransferSyntaxUID in file meta")
    sop_class = fields[_TAG_SOP_CLASS]
    if is_image_storage(sop_class) and not seen_pixels:
        raise MalformedDicomError(f"no pixel data in an image storage instance ({sop_class_name(sop_class)})")
    try:
        instance_number = int(float(fields[_TAG_INSTANCE_NUMBER] or 0))
    except ValueError:
        instance_number = 0  # a bad InstanceNumber only affects ordering; assembly sorts by position
    return _Header(
        sop_class_uid=sop_class,
        sop_instance_uid=fields[_TAG_SOP_INSTANCE],
        study_uid=fields[_TAG_STUDY_UID],
        series_uid=fields[_TAG_SERIES_UID],
        transfer_syntax=transfer_syntax,
        modality=fields[_TAG_MODALITY],
        series_description=fields[_TAG_SERIES_DESCRIPTION],
        body_part=fields[_TAG_BODY_PART],
        instance_number=instance_number,
    )


def _raw_str(ds: Dataset, tag: int) -> str:
    """A short string attribute as text, without pydicom's value conversion (and its warnings)."""
    if tag not in ds:
        return ""
    elem: Any = ds.get_item(tag)
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        # UI/CS/IS are ASCII; LO (SeriesDescription) may use another character set, but it is
        # only a routing hint, so undecodable bytes are replaced rather than rejected
        text = bytes(value).decode("utf-8", errors="replace")
    elif value is None:
        text = ""
    elif isinstance(value, (list, tuple)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip(" \x00")


def _file_meta_summary(path: Path) -> dict[str, str]:
    """UIDs from a quarantined file's meta (set by the receiver from the C-STORE command)."""
    try:
        f = open(path, "rb")  # closed by the with below
    except OSError as exc:
        return {"meta_error": type(exc).__name__}
    with f:
        return _file_meta_summary_of(f)


def _file_meta_summary_of(f: BinaryIO) -> dict[str, str]:
    """``_file_meta_summary`` of an open stream positioned at the start of the preamble."""
    out: dict[str, str] = {}
    try:
        if f.read(132)[128:] != b"DICM":
            return out
        f.seek(0)  # read_partial reads the preamble itself
        ds = read_partial(f, stop_when=lambda tag, vr, length: int(tag) >> 16 != 0x0002)
        meta = ds.file_meta
        out["media_storage_sop_class_uid"] = _raw_str(meta, 0x00020002)
        out["media_storage_sop_instance_uid"] = _raw_str(meta, 0x00020003)
        out["transfer_syntax"] = _raw_str(meta, 0x00020010)
    except Exception as exc:  # noqa: BLE001 - best effort for the sidecar only
        out["meta_error"] = type(exc).__name__
    # only well-formed UIDs go into the sidecar: whatever else a broken file holds stays in it
    return {k: (v if k == "meta_error" or is_valid_uid(v) else "") for k, v in out.items()}


def dataset_offset(fp: BinaryIO) -> int:
    """Byte offset of the data set in a Part 10 file (after preamble and file meta).

    Uses the (0002,0000) group length, which pynetdicom and pydicom always write. Handy for
    comparing the data set a peer sent with what was stored.
    """
    fp.seek(0)
    head = fp.read(144)
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
        raise ValueError("no (0002,0000) File Meta Information Group Length")
    return 144 + int.from_bytes(head[140:144], "little")


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------- filesystem helpers


def _path_part(uid: str) -> str:
    """A UID as a safe file/directory name; anything else (../, odd characters) is hashed."""
    if is_valid_uid(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _makedirs_durable(d: Path, *, stop_at: Path) -> None:
    """mkdir -p ``d``; fsync the parent of each directory created so the entry survives a crash."""
    missing: list[Path] = []
    p = d
    while not p.exists() and p != stop_at:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(p.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass  # already gone is the goal
    except OSError as exc:
        log_event(logger, "spool.unlink_failed", logging.WARNING, file=p.name, error=exc.strerror)


def _storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an OS error into the domain error the C-STORE handler maps to a status."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(f"disk full while {what}")
    return StorageError(f"{what}: {exc.strerror or exc}")


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
