"""The spool's background thread: makes renames durable in their directories, refills the pool.

Takes the pool directory and a refill callable; stores report each directory a file was renamed
into (``note_renamed``). A rename out of the pool needs no directory fsync before the peer is
answered: the file is durable under its pool name either way, and ``reconcile()`` finds it in one
place or the other (see ``agent.ingest.spool``). The renames become durable in their final
directories with the next journal commit the filesystem makes anyway (every ``fdatasync`` of a
growing file commits ext4's journal), and at the latest when this thread fsyncs the series
directories touched and then the pool directory: every ``interval_s`` seconds, sooner after
``sync_every`` renames, and in ``close()``.

The thread is started on demand and exits when idle for a few ticks; the next rename or pool
shortage starts a new one. After ``stop()`` no thread runs and each rename is synced inline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from agent.core import util
from agent.core.log import log_event

__all__ = ["BackgroundSync"]

logger = logging.getLogger("agent.ingest.spool")

# a worker with nothing to do for this many ticks exits (a store restarts it)
_IDLE_TICKS = 5


class BackgroundSync:
    """Directories with renames not yet fsynced, and the thread that syncs them and refills the pool."""

    def __init__(self, pool_dir: Path, refill: Callable[[], bool], *, interval_s: float, sync_every: int) -> None:
        self.pool_dir = pool_dir
        self.interval_s = interval_s
        self._refill = refill
        self._sync_every = max(1, sync_every)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._dirty: set[Path] = set()
        self._dirty_count = 0
        self._worker: threading.Thread | None = None
        self._stopped = False

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive (it exits when idle and after ``stop()``)."""
        with self._lock:
            return self._worker is not None

    def pending(self) -> int:
        """How many directories wait for their fsync."""
        with self._lock:
            return len(self._dirty)

    def note_renamed(self, series_dir: Path) -> None:
        """Remember a directory whose new entry still needs an fsync to be durable there."""
        with self._lock:
            inline = self._stopped
            if not inline:
                self._dirty.add(series_dir)
                self._dirty_count += 1
                if self._dirty_count >= self._sync_every:
                    self._wake.set()
                if self._worker is None:
                    self._start_locked()
        if inline:
            # after stop() no worker runs: make this rename durable now (slow, but correct)
            util.fsync_dir(series_dir)
            util.fsync_dir(self.pool_dir)

    def kick(self) -> None:
        """Wake the worker now (the pool ran low), starting one if none runs."""
        with self._lock:
            if self._stopped:
                return
            self._wake.set()
            if self._worker is None:
                self._start_locked()

    def stop(self) -> None:
        """Stop the worker and wait for it. Idempotent; ``flush()`` syncs what it left."""
        with self._lock:
            self._stopped = True
            worker = self._worker
        self._wake.set()
        if worker is not None:
            worker.join()

    def flush(self) -> bool:
        """fsync the series directories with new entries, then the pool; True if any were.

        On failure every directory stays pending (an extra fsync later is harmless) and the
        ``OSError`` propagates.
        """
        with self._lock:
            dirs, self._dirty, self._dirty_count = self._dirty, set(), 0
        if not dirs:
            return False
        try:
            # new names first, then the pool directory they left: at every point the file has a
            # durable name, even on a filesystem that does not order the two
            for d in sorted(dirs):
                try:
                    util.fsync_dir(d)
                except FileNotFoundError:
                    # retention removed the series meanwhile: no entry left to make durable
                    log_event(logger, "spool.sync_skipped", logging.DEBUG, reason="directory removed")
            util.fsync_dir(self.pool_dir)
        except BaseException:
            with self._lock:
                self._dirty |= dirs
                self._dirty_count += len(dirs)
            raise
        return True

    def _start_locked(self) -> None:
        t = threading.Thread(target=self._main, name="spool-sync", daemon=True)
        self._worker = t
        t.start()

    def _main(self) -> None:
        """Refill the pool and fsync touched directories until stopped or idle for a while."""
        idle = 0
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            worked = False
            try:
                worked = self._refill()
                worked = self.flush() or worked
            except OSError as exc:
                # e.g. ENOSPC creating pool files: stores still work (they create files when the
                # pool is empty and report the error to the peer); try again next tick
                log_event(logger, "spool.background_failed", logging.WARNING,
                          error=exc.strerror or type(exc).__name__)
                worked = True
            except Exception:  # noqa: BLE001 - logged with traceback; the thread must not die silently
                logger.exception("spool.background_crashed")
                worked = True
            with self._lock:
                if self._stopped:
                    self._worker = None
                    return
                idle = 0 if (worked or self._dirty) else idle + 1
                if idle >= _IDLE_TICKS:
                    self._worker = None  # the next store starts a new one
                    return
