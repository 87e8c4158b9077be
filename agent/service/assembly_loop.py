"""The assembly thread: stored instances become series, quiet series become jobs.

Each tick (``TICK_S``, or sooner when a series falls due): record the instances the listener
stored, turn every series quiet for ``pipeline.stable_age_s`` into one job per model that wants it
(a ``series.unrouted`` event when none does, ``series.refused`` when it is over
``series_limits.max_instances``), offer series a quarter of the way through their quiet period for
decoding ahead, mark jobs whose result left the outbox as published, let the janitor sweep, and
write queued events to the outbox.

Nothing is dropped by a failing tick (the service runs ``step`` under agent/service/supervisor.py,
which retries it with backoff): an instance notification leaves the loop's hands only once it is
recorded, and a series is marked complete in the same transaction that creates its jobs
(``SeriesAssembler.pop_due`` with a successor), so a failure in between leaves it open and due.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time

from agent.assembly import JobStore, SeriesAssembler
from agent.assembly.assembler import DueSeries
from agent.core.config import PipelineConfig
from agent.core.db import transaction
from agent.core.events import SeriesRefused, SeriesUnrouted
from agent.core.metrics import NO_METRICS, Metrics
from agent.core.types import Instance
from agent.mqtt.outbox import Outbox
from agent.service.event_sink import EventSink
from agent.service.janitor import Janitor

log = logging.getLogger(__name__)

TICK_S = 0.25


class PrefetchOffers:
    """Series offered to the job thread for decoding ahead (newest offer wins)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._offered: dict[str, int] = {}  # series uid -> instance count when offered

    def offer(self, series_uid: str, n_instances: int) -> bool:
        """Offer a series unless it was already offered with this many instances."""
        if self._offered.get(series_uid) == n_instances:
            return False
        self._offered[series_uid] = n_instances
        self._queue.put(series_uid)
        if len(self._offered) > 1000:  # bounded: only open series need remembering
            self._offered.clear()
        return True

    def latest(self) -> str | None:
        """The newest offer, dropping older ones: the worker keeps one prefetched series."""
        newest = None
        while True:
            try:
                newest = self._queue.get_nowait()
            except queue.Empty:
                return newest


class AssemblyLoop:
    def __init__(self, cfg: PipelineConfig, assembler: SeriesAssembler, jobs: JobStore, outbox: Outbox,
                 events: EventSink, janitor: Janitor, prefetch: PrefetchOffers,
                 jobs_ready: threading.Event, metrics: Metrics = NO_METRICS) -> None:
        self.metrics = metrics
        self.cfg = cfg
        self.assembler = assembler
        self.jobs = jobs
        self.outbox = outbox
        self.events = events
        self.janitor = janitor
        self.prefetch = prefetch
        self.jobs_ready = jobs_ready
        self.instances: queue.Queue[Instance] = queue.Queue()  # the listener's on_instance
        self._holding: Instance | None = None  # taken from the queue, not yet recorded

    def step(self) -> float:
        """One tick, then how long to wait for the next (the supervisor's step)."""
        self.tick()
        return self.wait_s()

    def tick(self) -> None:
        self._write_events()  # first too: a stall further down must still be announced
        self._record_instances()
        for due in self.assembler.pop_due(self._create_jobs):
            if due.refused:
                self.events.put(SeriesRefused(series_uid=due.series_uid, limit="series_limits.max_instances",
                                              reason=due.refused).to_event())
            elif not due.models:
                self.events.put(SeriesUnrouted(series_uid=due.series_uid, modality=due.modality,
                                               instances=due.n_instances).to_event())
            else:
                self.jobs_ready.set()
                self.metrics.count("series_completed")
                # last instance -> jobs exist: the quiet period plus this loop's own delay
                self.metrics.observe("assemble", max(0.0, self.assembler.clock() - due.last_instance_at))
        self._offer_prefetch()
        for key in self.jobs.inferred_keys():
            if not self.outbox.has(key):
                self.jobs.mark_published(key)
        self.janitor.tick()
        self._write_events()

    def _write_events(self) -> None:
        # the sink hands an event over as it writes it: take the write lock first, so a database
        # that refuses writes fails the tick here (retried) rather than in the middle of the drain
        with transaction(self.assembler.conn):  # this thread's own connection
            pass
        self.events.drain(self.outbox)

    def _create_jobs(self, conn: sqlite3.Connection, due: DueSeries) -> None:
        """The jobs of a due series, in the transaction that marks it complete."""
        for name in due.models:
            self.jobs.create(due.series_uid, due.study_uid, name, due.revision, conn=conn)

    def wait_s(self) -> float:
        """Sleep until the next tick, or sooner when a series falls due before it: a series is
        handed to inference when its quiet period ends, not up to a tick later."""
        try:
            due_at = self.assembler.next_due_at()
        except sqlite3.Error:
            return TICK_S
        if due_at is None:
            return TICK_S
        return min(TICK_S, max(0.0, due_at - time.time()))

    def _record_instances(self) -> None:
        """Record queued instance notifications; the one being recorded stays held until its row
        is committed, so a failure here loses none (the next tick records it)."""
        while True:
            if self._holding is None:
                try:
                    self._holding = self.instances.get_nowait()
                except queue.Empty:
                    return
            self.assembler.note_instance(self._holding)
            self._holding = None

    def _offer_prefetch(self) -> None:
        """Offer the job thread series a quarter of the way through their quiet period: decoding
        them while the worker is idle takes the load stage off the path to the result (early
        enough to finish before the series falls due even with a short ``stable_age_s``; a
        prefetch wasted on a series that receives more instances costs idle CPU only)."""
        if not self.cfg.prefetch:
            return
        for uid, n in self.assembler.quiet_series(self.cfg.stable_age_s / 4):
            if self.prefetch.offer(uid, n):
                self.jobs_ready.set()  # wakes the job thread, which prefetches when it has no job
