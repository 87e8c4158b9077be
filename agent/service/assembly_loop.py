"""The assembly thread: stored instances become series, quiet series become jobs.

Each tick (``TICK_S``, or sooner when a series falls due): record the instances the listener
stored, write queued events to the outbox, turn every series quiet for ``pipeline.stable_age_s``
into one job per model that wants it (and an ``series.unrouted`` event when none does), offer
series a quarter of the way through their quiet period for decoding ahead, mark jobs whose result
left the outbox as published, and let the janitor sweep. A failure is logged and the next tick
tries again; the thread only ends on ``stop``.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time

from agent.assembly import JobStore, SeriesAssembler
from agent.core.config import PipelineConfig
from agent.core.errors import EdgeAgentError
from agent.core.events import SeriesUnrouted
from agent.core.log import log_event
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

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except EdgeAgentError as exc:
                log_event(log, "assembly.error", logging.ERROR, error=str(exc))
            except Exception:  # noqa: BLE001 - the loop must survive anything; logged with traceback
                log.exception("assembly.crashed")
            stop.wait(self.wait_s())

    def tick(self) -> None:
        self._record_instances()
        self.events.drain(self.outbox)
        for due in self.assembler.pop_due():
            if not due.models:
                self.events.write(self.outbox, SeriesUnrouted(series_uid=due.series_uid, modality=due.modality,
                                                              instances=due.n_instances).to_event())
            for name in due.models:
                self.jobs.create(due.series_uid, due.study_uid, name, due.revision)
            if due.models:
                self.jobs_ready.set()
                self.metrics.count("series_completed")
                # last instance -> jobs exist: the quiet period plus this loop's own delay
                self.metrics.observe("assemble", max(0.0, self.assembler.clock() - due.last_instance_at))
        self._offer_prefetch()
        for key in self.jobs.inferred_keys():
            if not self.outbox.has(key):
                self.jobs.mark_published(key)
        self.janitor.tick()

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
        while True:
            try:
                inst = self.instances.get_nowait()
            except queue.Empty:
                return
            self.assembler.note_instance(inst)

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
