"""What the stages measure, collected per telemetry window: the ``Metrics`` implementation.

``TelemetryCollector`` takes ``observe(stage, seconds)`` and ``count(name, n)`` from any thread
(the DICOM listener's, the job thread, paho's) and ``take_window()`` returns what arrived since the
previous call as a ``Window`` (latency samples and counts per stage, counters in the window and
since start) and starts the next window. ``count_event(metrics, event)`` counts what only an event
tells (failed jobs, fallbacks, demotions), for the service's event sink to call on every event.

Cheap and bounded on purpose: the listener and the job thread call this on their hot paths, so a
call is one lock and one append or addition; latency samples live in one ring buffer per stage
(``max_samples``; in a window with more observations the quantiles come from the newest ones,
the count stays exact), and unknown names are ignored rather than grown into new entries.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.core.events import TypedEvent
from agent.core.metrics import COUNTERS, STAGES, Counter, Metrics, Stage
from agent.core.types import Event

#: event kinds -> the counter they bump. Only kinds whose emitter does not count them itself:
#: the DICOM listener counts associations, quarantined and refused instances directly.
EVENT_COUNTERS: Mapping[str, Counter] = {
    "job.failed": "jobs_failed",
    "engine.fallback": "fallbacks",
    "engine.demoted": "demotions",
    # a demotion for too little shadow agreement is announced by this kind alone (no engine.demoted)
    "engine.shadow_disagreement": "demotions",
}


@dataclass(frozen=True)
class Window:
    """What one window collected. ``started``/``ended``: monotonic seconds; ``samples``: per stage,
    the newest latency observations of the window (at most ``max_samples``); ``observed``: per
    stage, every observation of the window; ``observed_total``/``seconds_total``: per stage since
    start; ``counts``/``counts_total``: every counter in the window and since start."""

    started: float
    ended: float
    samples: Mapping[str, tuple[float, ...]]
    observed: Mapping[str, int]
    observed_total: Mapping[str, int]
    seconds_total: Mapping[str, float]
    counts: Mapping[str, int]
    counts_total: Mapping[str, int]

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended - self.started)


class TelemetryCollector:
    """Thread-safe ``agent.core.metrics.Metrics``: hand it to every stage (see the module docstring).

    ``max_samples``: latency samples kept per stage and window; ``clock``: monotonic seconds
    (tests pass a fake).
    """

    def __init__(self, *, max_samples: int = 2048, clock: Callable[[], float] = time.monotonic) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self._window_start = self.started
        self._samples: dict[str, deque[float]] = {s: deque(maxlen=max_samples) for s in STAGES}
        self._observed: dict[str, int] = {s: 0 for s in STAGES}
        self._observed_total: dict[str, int] = {s: 0 for s in STAGES}
        self._seconds_total: dict[str, float] = {s: 0.0 for s in STAGES}
        self._counts: dict[str, int] = {c: 0 for c in COUNTERS}
        self._counts_total: dict[str, int] = {c: 0 for c in COUNTERS}

    # --------------------------------------------------------------------------- Metrics

    def observe(self, stage: Stage, seconds: float) -> None:
        """Record one latency of ``stage``; a non-finite value or an unknown stage is ignored
        (measuring must never break the flow it measures)."""
        try:
            s = float(seconds)
        except (TypeError, ValueError):
            return
        if not math.isfinite(s):  # before max(): max(0.0, nan) would be 0.0
            return
        s = max(0.0, s)
        with self._lock:
            ring = self._samples.get(stage)
            if ring is None:
                return
            ring.append(s)
            self._observed[stage] += 1
            self._observed_total[stage] += 1
            self._seconds_total[stage] += s

    def count(self, name: Counter, n: int = 1) -> None:
        """Add ``n`` (>= 0) to counter ``name``; unknown names and negative ``n`` are ignored
        (counters only ever increase)."""
        if not isinstance(n, int) or n < 0:
            return
        with self._lock:
            if name not in self._counts:
                return
            self._counts[name] += n
            self._counts_total[name] += n

    # ---------------------------------------------------------------------------- windows

    def take_window(self) -> Window:
        """Return the current window and start a new one (totals carry on)."""
        with self._lock:
            now = self._clock()
            win = Window(
                started=self._window_start, ended=now,
                samples={s: tuple(r) for s, r in self._samples.items()},
                observed=dict(self._observed), observed_total=dict(self._observed_total),
                seconds_total=dict(self._seconds_total),
                counts=dict(self._counts), counts_total=dict(self._counts_total),
            )
            self._window_start = now
            for ring in self._samples.values():
                ring.clear()
            self._observed = {s: 0 for s in STAGES}
            self._counts = {c: 0 for c in COUNTERS}
        return win

    def uptime_s(self) -> float:
        return max(0.0, self._clock() - self.started)


def count_event(metrics: Metrics, event: Event | TypedEvent) -> None:
    """Bump the counter ``event``'s kind stands for (``EVENT_COUNTERS``); other kinds count nothing."""
    kind = event.KIND if isinstance(event, TypedEvent) else event.kind
    name = EVENT_COUNTERS.get(kind)
    if name is not None:
        metrics.count(name)


def quantile(sorted_values: tuple[float, ...] | list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``sorted_values`` by linear interpolation between closest
    ranks (numpy's default); ``sorted_values`` must not be empty."""
    n = len(sorted_values)
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
