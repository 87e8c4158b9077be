"""Spool retention: series nobody wants and series whose results are delivered age out.

Unrouted series (no model wants them) go after ``storage.unrouted_retention_h``; completed series
after ``storage.retention_days``, and only once none of their jobs is still open (pending, running,
or inferred but not yet confirmed sent). Runs on the assembly thread every
``storage.janitor_interval_s``; the files go first, then the series row.
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
        for uid in self.assembler.expired_unrouted(self.cfg.unrouted_retention_h * 3600):
            self._age_out(uid, "unrouted")
        for uid in self.assembler.completed_before(self.clock() - self.cfg.retention_days * 86400):
            if self.jobs.series_done(uid):
                self._age_out(uid, "retention")

    def _age_out(self, series_uid: str, reason: str) -> None:
        self.spool.delete_series(series_uid)
        self.assembler.forget(series_uid)
        log_event(log, "spool.aged_out", series_uid=series_uid, reason=reason)
