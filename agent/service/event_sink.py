"""Events from any thread, written to the outbox by one thread.

Listener threads, the job thread, the updater and the variant manager report events with
``put`` (a queue: they never wait on the database); the assembly thread calls ``drain`` each tick
and writes them to the outbox on its own connection, stamped when they were reported.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from agent.core.metrics import NO_METRICS, Metrics
from agent.core.types import Event
from agent.mqtt import payloads
from agent.mqtt.outbox import Outbox
from agent.telemetry import count_event


class EventSink:
    def __init__(self, topic: str, device_id: str, metrics: Metrics = NO_METRICS) -> None:
        self._metrics = metrics
        self._topic = topic
        self._device_id = device_id
        self._queue: queue.Queue[Event] = queue.Queue()
        self._wake: Callable[[], None] = lambda: None

    def put(self, event: Event) -> None:
        """Report ``event`` (any thread); stamped now unless it carries its own time."""
        if not event.created_at:
            event = Event(event.kind, event.severity, event.message, event.fields, time.time())
        count_event(self._metrics, event)  # fallbacks, demotions, failed jobs for telemetry
        self._queue.put(event)

    def on_written(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after events reach the outbox (the publisher's wake-up)."""
        self._wake = wake

    def drain(self, outbox: Outbox) -> int:
        """Write every queued event to the outbox (the assembly thread only); returns how many."""
        n = 0
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            self.write(outbox, event)
            n += 1
        return n

    def write(self, outbox: Outbox, event: Event) -> None:
        """Write one event to the outbox now (on the draining thread's connection); an unstamped
        event is stamped by ``event_payload``."""
        outbox.put(self._topic, payloads.event_payload(event, self._device_id), qos=1, kind="event")
        self._wake()
