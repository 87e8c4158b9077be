"""``Spool``: the store paths, and the facade over pool, journal, quarantine and background sync.

Takes the bytes a peer sent (``store_bytes``) or a received file (``store_file``); returns the
journaled ``Instance`` and whether it is new, or raises the ``DicomError`` subclass the C-STORE
handler maps to a status. Also answers the service's queries (``get``, ``instances_for_series``,
``series_summary``, ``count``), deletes series for retention and runs ``reconcile()`` at start-up.
The crash-safety argument for the whole package is in ``agent.ingest.spool``.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol

from agent.core import util
from agent.core.errors import MalformedDicomError, OutOfSpaceError, StorageError, UnsupportedDicomError
from agent.core.limits import DecodeLimits
from agent.core.log import log_event
from agent.core.types import Instance, SpooledSeries
from agent.ingest.sopclasses import sop_class_name
from agent.ingest.spool import recovery
from agent.ingest.spool.files import SpoolLayout, makedirs_durable, remove_quietly, storage_error
from agent.ingest.spool.header import Header, parse_header, read_header
from agent.ingest.spool.journal import Journal
from agent.ingest.spool.pool import Pool, fdatasync, marked, write_all
from agent.ingest.spool.quarantine import Quarantine, QuarantineLimits
from agent.ingest.spool.sync import BackgroundSync

__all__ = ["DiskUsage", "Spool"]

logger = logging.getLogger("agent.ingest.spool")

_MB = 1024 * 1024
_COPY_CHUNK = 1024 * 1024

# a header and the journaled copy of the same SOP Instance UID, if any
_Inspection = tuple[Header, Instance | None]


class DiskUsage(Protocol):
    """What ``shutil.disk_usage`` returns; only ``free`` (bytes) is used."""

    @property
    def free(self) -> int: ...


class Spool:
    """The spool directory, its quarantine and the ``instances`` / ``quarantine`` tables.

    ``root`` and ``quarantine`` are created if missing. ``conn`` comes from ``agent.core.db.connect``;
    the spool serialises its own use of it with a lock, so the listener's association threads and
    the assembler may call the spool concurrently. Give the spool a connection of its own: other
    code using the same connection outside this lock could interleave with its statements, and the
    spool sets ``synchronous=NORMAL`` on it (see ``agent.ingest.spool``). ``min_free_mb`` is the
    floor below which instances are refused; ``disk_usage`` is injectable so tests can fake a full
    disk. ``pool_size`` empty files are kept ready in ``<root>/.pool``; directories touched by
    stores are fsynced every ``sync_interval_s`` seconds (or after ``sync_every`` renames) by a
    background thread. Call ``close()`` at shutdown to make those renames durable at once.
    ``decode_limits`` (None: no check) bound what a received instance may inflate or declare
    (``LimitExceededError``, 0xC212, nothing kept); ``quarantine_limits`` bound the quarantine.
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
        decode_limits: DecodeLimits | None = None,
        quarantine_limits: QuarantineLimits | None = None,
    ) -> None:
        self._layout = SpoolLayout(Path(root).absolute())
        self.root = self._layout.root
        self.quarantine_dir = Path(quarantine).absolute()
        self.tmp_dir = self._layout.tmp_dir
        self.pool_dir = self._layout.pool_dir
        self.min_free_mb = min_free_mb
        self.sync_interval_s = sync_interval_s
        self._disk_usage = disk_usage
        self._clock = clock
        for d in (self.root, self.tmp_dir, self.pool_dir, self.quarantine_dir):
            makedirs_durable(d, stop_at=Path(d.anchor))
        self._journal = Journal(conn)
        self.decode_limits = decode_limits
        self._quarantine = Quarantine(self.quarantine_dir, self._journal, clock, quarantine_limits)
        self._pool = Pool(self.pool_dir, pool_size)
        self._sync = BackgroundSync(self.pool_dir, self._pool.refill, interval_s=sync_interval_s,
                                    sync_every=sync_every)
        # the parse helpers: a small thread pool created on first use, kept until close()
        self._helpers_lock = threading.Lock()
        self._helpers: ThreadPoolExecutor | None = None
        self._closing = False

        self._layout.remove_stale_temps()
        self._pool.load()
        self._pool.try_refill()
        self.prune_quarantine()  # entries aged out while the agent was down

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
        inspection: Future[_Inspection] | None = None
        try:
            fd = os.open(pooled, os.O_WRONLY)
            try:
                write_all(fd, marked(view))
                # the header is parsed (and the journal asked about duplicates) on a helper thread
                # while this one waits for the device: the flush costs the same either way, the
                # parse no longer adds to it. Not the other way round: a thread calling fdatasync
                # would first have to win the GIL from the parsing one.
                inspection = self._inspect_async(payload, sop_classes)
                fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._pool.discard(pooled)
            _settle(inspection)
            raise storage_error(exc, "writing a received instance") from exc
        except BaseException:
            self._pool.discard(pooled)  # nothing half-written stays behind, whatever interrupted us
            _settle(inspection)
            raise
        assert inspection is not None  # set before the flush, which is the last thing that can fail
        try:
            header, existing = inspection.result()
        except MalformedDicomError as exc:
            # reconcile() would drop it too (same parser); no need to flush its removal
            self._pool.discard(pooled)
            raise self._quarantine.take_bytes(payload, str(exc), calling_ae=calling_ae) from exc
        except BaseException:
            # UnsupportedDicomError: a durable, verifiable file reconcile() would journal; unmark it
            self._pool.discard(pooled, unmark=True)
            raise
        if existing is not None:
            # the journaled first copy is kept; after a crash reconcile() drops this one as well
            self._pool.discard(pooled)
            return existing, False
        return self._place_pooled(pooled, header, view.nbytes, calling_ae=calling_ae)

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
                util.fsync_file(tmp)
            except OSError as exc:
                remove_quietly(tmp)
                raise storage_error(exc, "syncing a received instance") from exc
            except BaseException:
                remove_quietly(tmp)
                raise
        else:
            self._check_space(size)
            tmp = self._layout.new_temp_path()
            _link_or_copy(tmp_path, tmp)
        return self._commit(tmp, calling_ae=calling_ae, sop_classes=sop_classes)

    def _inspect(self, payload: bytes, sop_classes: Collection[str] | None) -> _Inspection:
        """Header of a received instance, checked against ``sop_classes``, and any journaled copy."""
        header = parse_header(io.BytesIO(payload), self.decode_limits)
        _check_sop_class(header, sop_classes)
        return header, self._journal.get(header.sop_instance_uid)

    def _inspect_async(self, payload: bytes, sop_classes: Collection[str] | None) -> Future[_Inspection]:
        """``_inspect`` on the helper pool (created on first use), or inline after ``close()``."""
        with self._helpers_lock:
            if self._helpers is None and not self._closing:
                self._helpers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-inspect")
            helpers = self._helpers
        if helpers is not None:
            try:
                return helpers.submit(self._inspect, payload, sop_classes)
            except RuntimeError:
                # close() shut the pool down since we looked: inspect inline, below
                log_event(logger, "spool.inspect_inline", logging.DEBUG, reason="closed")
        done: Future[_Inspection] = Future()
        try:
            done.set_result(self._inspect(payload, sop_classes))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future, as the pool does
            done.set_exception(exc)
        return done

    def _take_pool_file(self) -> Path:
        try:
            path, low = self._pool.take()
        except OSError as exc:
            raise storage_error(exc, "creating spool files") from exc
        if low:
            self._sync.kick()
        return path

    def _place_pooled(self, pooled: Path, header: Header, size: int, *, calling_ae: str) -> tuple[Instance, bool]:
        """Rename a durable pool file into place and journal it (or drop it as a duplicate)."""
        final = self._layout.final_path(header)
        with self._journal.lock:
            # again under the lock: another association may have stored the same UID meanwhile
            existing = self._journal.get(header.sop_instance_uid)
            if existing is not None:
                self._pool.discard(pooled)
                return existing, False
            try:
                makedirs_durable(final.parent, stop_at=self.root)
                # replace, not link: a file left there by a crash between rename and insert is
                # the same instance, complete (only durable pool files are ever renamed)
                os.replace(pooled, final)
            except OSError as exc:
                self._pool.discard(pooled)
                raise storage_error(exc, "moving an instance into the spool") from exc
            self._pool.release(pooled)
            self._sync.note_renamed(final.parent)
            instance = header.instance(final, size, calling_ae, self._clock())
            try:
                self._journal.insert(instance)
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
            header = read_header(tmp, self.decode_limits)
        except MalformedDicomError as exc:
            raise self._quarantine.take_file(tmp, str(exc), calling_ae=calling_ae) from exc
        except BaseException:
            remove_quietly(tmp)
            raise
        try:
            _check_sop_class(header, sop_classes)
        except UnsupportedDicomError:
            remove_quietly(tmp)
            raise

        size = tmp.stat().st_size
        final = self._layout.final_path(header)
        with self._journal.lock:
            existing = self._journal.get(header.sop_instance_uid)
            if existing is not None:
                remove_quietly(tmp)
                return existing, False
            try:
                makedirs_durable(final.parent, stop_at=self.root)
                os.replace(tmp, final)
                util.fsync_dir(final.parent)
            except OSError as exc:
                remove_quietly(tmp)
                raise storage_error(exc, "moving an instance into the spool") from exc
            instance = header.instance(final, size, calling_ae, self._clock())
            try:
                self._journal.insert(instance)
            except sqlite3.Error as exc:
                raise StorageError(f"journal insert failed: {exc}") from exc
        return instance, True

    def _check_space(self, incoming: int) -> None:
        free = self.free_mb()
        if free - incoming / _MB < self.min_free_mb:
            raise OutOfSpaceError(
                f"free space {free:.0f} MB minus incoming {incoming / _MB:.1f} MB is below the "
                f"{self.min_free_mb} MB floor"
            )

    # ------------------------------------------------------------------ queries and upkeep

    def get(self, sop_instance_uid: str) -> Instance | None:
        """The journaled instance with this SOP Instance UID, or None."""
        return self._journal.get(sop_instance_uid)

    def instances_for_series(self, series_uid: str) -> list[Instance]:
        """All journaled instances of a series, by instance number then arrival."""
        return self._journal.instances_for_series(series_uid)

    def series_summary(self) -> list[SpooledSeries]:
        """One ``SpooledSeries`` per journaled series (order unspecified): what the assembler
        re-derives its series table from after a crash."""
        return self._journal.series_summary()

    def prune_quarantine(self) -> int:
        """Delete quarantined entries beyond the quarantine's limits (oldest first, and aged out)."""
        try:
            return self._quarantine.prune()
        except (OSError, sqlite3.Error) as exc:
            log_event(logger, "quarantine.prune_failed", logging.ERROR, error=repr(exc))
            return 0

    def last_received_at(self, series_uid: str) -> float | None:
        """When the series' newest instance was stored (None: the spool holds none)."""
        return self._journal.last_received_at(series_uid)

    def count(self) -> int:
        """Number of journaled instances."""
        return self._journal.count()

    def free_mb(self) -> float:
        """Free space on the spool's filesystem, in MiB."""
        return self._disk_usage(self.root).free / _MB

    def delete_series(self, series_uid: str, received_at_or_before: float | None = None) -> int:
        """Delete a series' rows and files (retention); returns how many instances were removed.

        Rows go first (committed with a flush), then files, so a crash in between leaves
        unreferenced files (harmless, removed with the directory next time) rather than rows
        pointing at nothing. ``received_at_or_before`` (the janitor: ``last_received_at`` read
        when it chose the series) spares an instance acknowledged after that: its row and its file
        stay, and the assembler sees a series again.
        """
        with self._journal.lock:
            paths = self._journal.delete_series(series_uid, received_at_or_before)
            for path in paths:
                remove_quietly(path)
            for d in {path.parent for path in paths}:
                self._layout.remove_empty_dirs(d)
        log_event(logger, "series.deleted", series_uid=series_uid, instances=len(paths))
        return len(paths)

    def reconcile(self) -> int:
        """Rebuild the spool's state from its files after a crash; meant for service start-up.

        Moves pool files whose commit mark verifies into place and drops the others, journals
        spooled files that lack a row, keeps empty pool files (see ``agent.ingest.spool.recovery``).
        Returns how many rows were added.
        """
        return recovery.reconcile(self._layout, self._pool, self._journal)

    def close(self) -> None:
        """Stop the background thread and fsync the directories it had yet to sync. Idempotent.

        The spool stays usable; later stores fsync their directory themselves.
        """
        with self._helpers_lock:
            self._closing = True
            helpers, self._helpers = self._helpers, None
        self._sync.stop()
        if helpers is not None:
            helpers.shutdown(wait=True)
        try:
            self._sync.flush()
        except OSError as exc:
            # the files are durable in the pool or in place either way; reconcile() finds them
            log_event(logger, "spool.close_sync_failed", logging.WARNING, error=exc.strerror or type(exc).__name__)


def _check_sop_class(header: Header, sop_classes: Collection[str] | None) -> None:
    if sop_classes is not None and header.sop_class_uid not in sop_classes:
        raise UnsupportedDicomError(
            f"SOP class {header.sop_class_uid} ({sop_class_name(header.sop_class_uid)}) not accepted"
        )


def _link_or_copy(src: Path, dst: Path) -> None:
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
            remove_quietly(dst)
            raise storage_error(exc, "copying a received instance") from exc
        except BaseException:
            remove_quietly(dst)
            raise
        return
    try:
        util.fsync_file(dst)
    except OSError as exc:
        remove_quietly(dst)
        raise storage_error(exc, "syncing a received instance") from exc


def _settle(future: Future[_Inspection] | None) -> None:
    """Wait for a helper job whose result is no longer wanted (it must not outlive the store)."""
    if future is not None:
        wait([future])
