"""Every loop of the daemon runs supervised: a failure never silently ends a thread.

A loop is a ``step()`` callable that does one round of work and returns how long to wait before the
next (it may block inside, e.g. the job thread waiting for work). ``Supervisor.spawn(name, step,
stop)`` runs it on a thread:

* a step that raises is logged with its traceback (``loop.step_failed``), published once per stall
  as ``loop.stalled`` (agent/core/events/supervision.py) and tried again after an exponential
  backoff (``supervision.retry_initial_s`` doubling up to ``retry_max_s``);
* the first step that succeeds after a stall publishes ``loop.recovered``;
* a loop that has not made a successful step for ``supervision.give_up_after_s``, or whose thread
  ends while the service runs (an escaped ``BaseException``), is *fatal*: ``loop.failed`` is
  published (best effort), ``fatal`` is set, and the service's ``run_forever`` returns
  ``EXIT_LOOP_FAILED`` so the process exits non-zero and the service manager restarts it, rather
  than run on half-dead (the listener answering Success while nothing is analysed).

What a loop holds across a failed step (an instance notification, a prediction not yet written) is
the loop's business: it must keep it and finish it in a later step (see assembly_loop.py and
job_loop.py). Events go through the event sink, so ``loop.stalled`` for a database stall reaches the
outbox once the database takes writes again.

Every loop also leaves a heartbeat in ``Supervisor.heartbeats`` at the start of each step, after it
(succeeded or failed and retried) and before it sleeps, with the time by which the next is due; a
step that may legitimately run long says so (``Heartbeats.busy``: the job thread, for the job's time
budget). The watchdog (agent/service/lifecycle.py) pings systemd only while no loop is overdue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from agent.core.config import SupervisionConfig
from agent.core.events import LoopFailed, LoopRecovered, LoopStalled
from agent.core.log import log_event
from agent.core.types import Event

log = logging.getLogger(__name__)

#: the process's exit status when a loop could not recover (systemd: Restart=on-failure restarts it)
EXIT_LOOP_FAILED = 3

Step = Callable[[], float]


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


class Heartbeats:
    """When each loop must show progress again: ``beat(name, quiet_s)`` after progress, with how
    long the loop may now be quiet (its sleep, or a job's budget); ``overdue(grace_s)`` names the
    loops that missed that by more than ``grace_s``. Thread-safe (one dict write per beat)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._due: dict[str, float] = {}

    def beat(self, name: str, quiet_s: float = 0.0) -> None:
        self._due[name] = self.clock() + max(0.0, quiet_s)

    def busy(self, name: str, seconds: float) -> None:
        """``name`` is inside a step that may take ``seconds`` (a job within its time budget)."""
        self.beat(name, seconds)

    def ended(self, name: str) -> None:
        """The loop's thread ended: overdue from now on."""
        self._due[name] = float("-inf")

    def overdue(self, names: Iterable[str], grace_s: float) -> list[str]:
        """Those of ``names`` past their due time by more than ``grace_s`` (or never seen)."""
        now = self.clock()
        return [n for n in names if now > self._due.get(n, float("-inf")) + grace_s]


class Supervisor:
    """Runs loops under the rules of the module docstring. ``fatal`` is set when one gave up;
    ``failure`` says which and why."""

    def __init__(self, cfg: SupervisionConfig, on_event: Callable[[Event], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.on_event = on_event
        self.clock = clock
        self.fatal = threading.Event()
        self.failure = ""
        self.heartbeats = Heartbeats(clock)
        self._threads: list[threading.Thread] = []

    def spawn(self, name: str, step: Step, stop: threading.Event, *, critical: bool = True,
              finally_: Callable[[], None] | None = None) -> threading.Thread:
        """Run ``step`` supervised on a daemon thread ``edge-{name}`` until ``stop`` is set.
        ``critical`` False: the loop never gives up (telemetry: the data path does not depend on
        it). ``finally_`` runs on that thread when the loop ends (closing what the loop opened)."""

        def target() -> None:
            try:
                self.run(name, step, stop, critical=critical)
            except BaseException as exc:  # noqa: BLE001 - a dying loop must end the process, not vanish
                log.exception("loop.died", extra={"ea_fields": {"loop": name}})
                self._give_up(name, _short(exc), 0.0)
            finally:
                if finally_ is not None:
                    finally_()
            self.heartbeats.ended(name)
            if not stop.is_set() and not self.fatal.is_set():
                self._give_up(name, "the loop returned while the service runs", 0.0)

        t = threading.Thread(target=target, name=f"edge-{name}", daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def join(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds in all for the loops to end; True when they all did."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def run(self, name: str, step: Step, stop: threading.Event, *, critical: bool = True) -> None:
        """The supervised loop itself (on the caller's thread); returns when ``stop`` is set or the
        loop gave up (then ``fatal`` is set; never when not ``critical``)."""
        failing_since: float | None = None
        failures = 0
        delay = self.cfg.retry_initial_s
        beats = self.heartbeats
        while not stop.is_set():
            beats.beat(name)
            try:
                wait = step()
            except Exception as exc:  # noqa: BLE001 - any failure is retried; logged with traceback
                now = self.clock()
                failures += 1
                error = _short(exc)
                log.error("loop.step_failed", exc_info=failures == 1,
                          extra={"ea_fields": {"loop": name, "failures": failures, "error": error,
                                               "retry_in_s": delay}})
                if failing_since is None:
                    failing_since = now
                    self.on_event(LoopStalled(loop=name, error=error, retry_in_s=round(delay, 3)).to_event())
                stalled = now - failing_since
                if critical and stalled >= self.cfg.give_up_after_s:
                    self._give_up(name, error, stalled)
                    return
                left = self.cfg.give_up_after_s - stalled if critical else delay
                pause = min(delay, max(0.0, left) + 0.01)
                beats.beat(name, pause)  # failing and retried is alive; giving up is the supervisor's call
                stop.wait(pause)
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            if failing_since is not None:
                stalled = round(self.clock() - failing_since, 3)
                log_event(log, "loop.recovered", loop=name, stalled_s=stalled, failures=failures)
                self.on_event(LoopRecovered(loop=name, stalled_s=stalled, failures=failures).to_event())
                failing_since, failures, delay = None, 0, self.cfg.retry_initial_s
            beats.beat(name, wait)
            if wait > 0:
                stop.wait(wait)

    def _give_up(self, name: str, error: str, stalled_s: float) -> None:
        if self.fatal.is_set():
            return
        self.failure = f"{name}: {error}"
        log_event(log, "loop.failed", logging.CRITICAL, loop=name, error=error, stalled_s=round(stalled_s, 3))
        try:
            self.on_event(LoopFailed(loop=name, error=error, stalled_s=round(stalled_s, 3)).to_event())
        finally:
            self.fatal.set()
