"""Events from any thread, written to the outbox by one thread.

Listener threads, the job thread, the updater and the variant manager report events with
``put`` (a queue: they never wait on the database); the assembly thread calls ``drain`` each tick
and writes them to the outbox on its own connection, stamped when they were reported.

Refusals of peers' traffic (``agent.core.events.REFUSAL_KINDS``: rejected associations, refused
connections, refused or quarantined instances) are what a hostile or broken peer can make us
produce without end, so they are rate-limited: at most ``events.refusals_per_minute`` of each kind
per minute are written; the rest are counted (per kind, per reason, per calling AE / address) and
summarised in one ``events.suppressed`` event when the minute is over. They are also the outbox's
bounded ``refusal`` kind (``events.max_queued_refusals``): during a broker outage the oldest are
dropped, never a result or another event.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

from agent.core.config import EventsConfig
from agent.core.events import REFUSAL_KINDS, EventsSuppressed
from agent.core.metrics import NO_METRICS, Metrics
from agent.core.types import Event
from agent.mqtt import payloads
from agent.mqtt.outbox import Outbox
from agent.telemetry import count_event

_WINDOW_S = 60.0
_TOP = 20  # reasons / peers named in a summary
_KEYS_KEPT = 200  # distinct reasons / peers counted per window (the rest as "other")


class RefusalLimiter:
    """At most ``per_minute`` refusal events of each kind per window; counts of the rest."""

    def __init__(self, per_minute: int, *, window_s: float = _WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._passed: Counter[str] = Counter()
        self._kinds: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._peers: Counter[str] = Counter()

    def admit(self, event: Event) -> tuple[bool, Event | None]:
        """(write ``event``?, a summary of the window that just ended, if any)."""
        if event.kind not in REFUSAL_KINDS:
            return True, None
        with self._lock:
            summary = self._roll()
            self._passed[event.kind] += 1
            if self._passed[event.kind] <= self.per_minute:
                return True, summary
            self._kinds[event.kind] += 1
            _bump(self._reasons, f"{event.kind}: {event.fields.get('reason', '')}")
            calling, peer = event.fields.get("calling_ae") or "", event.fields.get("peer") or ""
            _bump(self._peers, f"{calling}@{peer}" if calling and peer else str(calling or peer or "?"))
            return False, summary

    def flush(self) -> Event | None:
        """The summary of a window that is over (None when it is not, or nothing was suppressed)."""
        with self._lock:
            return self._roll()

    def _roll(self) -> Event | None:
        now = self._clock()
        if now - self._start < self.window_s:
            return None
        summary = None
        total = sum(self._kinds.values())
        if total:
            summary = EventsSuppressed(
                window_s=round(now - self._start, 1), total=total, counts=dict(self._kinds),
                reasons=dict(self._reasons.most_common(_TOP)), peers=dict(self._peers.most_common(_TOP)),
            ).to_event(created_at=time.time())
        self._start = now
        for c in (self._passed, self._kinds, self._reasons, self._peers):
            c.clear()
        return summary


def _bump(counter: Counter[str], key: str) -> None:
    if key in counter or len(counter) < _KEYS_KEPT:
        counter[key] += 1
    else:
        counter["other"] += 1


class EventSink:
    def __init__(self, topic: str, device_id: str, metrics: Metrics = NO_METRICS,
                 limits: EventsConfig | None = None) -> None:
        self._metrics = metrics
        self._topic = topic
        self._device_id = device_id
        self._limits = limits or EventsConfig()
        self._limiter = RefusalLimiter(self._limits.refusals_per_minute)
        self._queue: queue.Queue[Event] = queue.Queue()
        self._unwritten: Event | None = None  # taken off the queue, its write failed: first next time
        self._wake: Callable[[], None] = lambda: None

    def put(self, event: Event) -> None:
        """Report ``event`` (any thread); stamped now unless it carries its own time. A refusal
        beyond the rate limit is counted into the next ``events.suppressed`` instead."""
        if not event.created_at:
            event = Event(event.kind, event.severity, event.message, event.fields, time.time())
        count_event(self._metrics, event)  # fallbacks, demotions, failed jobs for telemetry
        admitted, summary = self._limiter.admit(event)
        if summary is not None:
            self._queue.put(summary)
        if admitted:
            self._queue.put(event)

    def on_written(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after events reach the outbox (the publisher's wake-up)."""
        self._wake = wake

    def drain(self, outbox: Outbox) -> int:
        """Write every queued event to the outbox (the assembly thread only); returns how many.
        An event whose write raises (database locked, disk full) is kept and written first by the
        next drain: the error propagates to the caller's supervised loop, the event is not lost."""
        summary = self._limiter.flush()
        if summary is not None:
            self._queue.put(summary)
        n = 0
        while True:
            event = self._unwritten
            if event is None:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._unwritten = event
            self.write(outbox, event)
            self._unwritten = None
            n += 1
        return n

    def pending(self) -> int:
        """Events reported but not yet in the outbox."""
        return self._queue.qsize() + (self._unwritten is not None)

    def write(self, outbox: Outbox, event: Event) -> None:
        """Write one event to the outbox now (on the draining thread's connection); an unstamped
        event is stamped by ``event_payload``. Refusals (and their summaries) are the outbox's
        bounded ``refusal`` kind."""
        payload = payloads.event_payload(event, self._device_id)
        if event.kind in REFUSAL_KINDS or event.kind == EventsSuppressed.KIND:
            outbox.put(self._topic, payload, qos=1, kind="refusal", max_queued=self._limits.max_queued_refusals)
        else:
            outbox.put(self._topic, payload, qos=1, kind="event")
        self._wake()
