"""Spool retention: series nobody wants and series whose results are delivered age out.

Unrouted series (no model wants them) go after ``storage.unrouted_retention_h``; completed series
after ``storage.retention_days``, and only once none of their jobs is still open (pending, running,
or inferred but not yet confirmed sent). Runs on the assembly thread every
``storage.janitor_interval_s``.

The series row goes first, in one statement that re-checks what the janitor chose it for (still
closed, completed before the cutoff, no open job: ``SeriesAssembler.forget``); only when that
statement deleted it do the files go. A series that took a new instance or a new job since it was
chosen keeps its row and its files. An instance stored after the janitor read the series' newest
arrival time (``Spool.last_received_at``) is spared too: the spool deletes only the rows received
at or before it, and only their files.

The quarantine's age bound (``quarantine.max_age_days``) is applied here as well, so it holds even
when nothing new is quarantined for weeks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.assembly import JobStore, SeriesAssembler
from agent.core.config import StorageConfig
from agent.core.log import log_event
from agent.ingest.spool import Spool

log = logging.getLogger(__name__)


class Janitor:
    def __init__(self, cfg: StorageConfig, spool: Spool, assembler: SeriesAssembler, jobs: JobStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.spool = spool
        self.assembler = assembler
        self.jobs = jobs
        self.clock = clock
        self._last = 0.0

    def tick(self) -> None:
        """Sweep when the interval has passed since the last sweep."""
        if self.clock() - self._last > self.cfg.janitor_interval_s:
            self._last = self.clock()
            self.sweep()

    def sweep(self) -> None:
        self.spool.prune_quarantine()
        unrouted_cutoff = self.clock() - self.cfg.unrouted_retention_h * 3600
        for uid in self.assembler.expired_unrouted(self.cfg.unrouted_retention_h * 3600):
            self._age_out(uid, "unrouted", unrouted_cutoff)
        cutoff = self.clock() - self.cfg.retention_days * 86400
        for uid in self.assembler.completed_before(cutoff):
            if self.jobs.series_done(uid):
                self._age_out(uid, "retention", cutoff)

    def _age_out(self, series_uid: str, reason: str, cutoff: float) -> None:
        newest = self.spool.last_received_at(series_uid)  # read before the row goes: see the docstring
        if not self.assembler.forget(series_uid, completed_before=cutoff):
            log_event(log, "spool.age_out_skipped", series_uid=series_uid, reason="changed since chosen")
            return
        if newest is not None:
            self.spool.delete_series(series_uid, received_at_or_before=newest)
        log_event(log, "spool.aged_out", series_uid=series_uid, reason=reason)
