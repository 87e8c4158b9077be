"""What the service manager sees of the running agent: the watchdog and the STATUS= line.

``Watchdog`` (only when systemd set ``WATCHDOG_USEC``): a thread that every half of that interval
*checks* and pings ``WATCHDOG=1`` only when

* the receiver works: the listener's accept thread is alive and the spool folder takes a new file
  (a full disk counts as working: the listener answers 0xA700, and a restart would not help);
* every watched supervised loop (assembly, jobs) made a step recently: its heartbeat
  (supervisor.py ``Heartbeats``) is not overdue by more than ``service.watchdog_stall_s``. A loop
  sleeping or idle beats on every round; a job running within its time budget declared itself busy
  for that budget (job_loop.py ``on_busy``), and a request in the inference worker within its limit
  (``InferenceRunner.busy_until``: a self-test of an activation the job path started) counts too,
  so a long inference is progress, a wedged thread is not;
* the MQTT drain thread went round recently (``MqttPublisher.last_beat``; it goes round every
  second, connected or not: a broker outage is not a reason to restart).

A check that fails withholds the ping (logged once as ``watchdog.withheld`` naming what failed) and
systemd kills and restarts the agent after ``WatchdogSec``; pings resume (``watchdog.resumed``) when
every check passes again. It is deliberately not a timer that pings regardless.

``StatusLine``: a thread that every ``service.status_interval_s`` composes the one-line summary
(``compose``) and sends ``STATUS=`` when it changed: phase, each model's active variant, queue
depth, outbox backlog, broker connection, drift states.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.core.log import log_event
from agent.core.status import ModelSummary
from agent.service.notify import Notifier
from agent.service.supervisor import Heartbeats

log = logging.getLogger(__name__)

#: the supervised loops the watchdog watches (telemetry is not on the data path)
WATCHED_LOOPS = ("assembly", "jobs")


def spool_writable(folder: Path) -> bool:
    """A new file can be created in ``folder`` (created and removed). Out of space or quota counts
    as writable: the listener refuses with 0xA700 and a restart would not free anything."""
    probe = folder / ".watchdog-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class WatchedParts:
    """What the watchdog checks: the listener's accept thread, the spool folder, the supervised
    loops' heartbeats and the MQTT drain thread's last round (monotonic seconds)."""

    accepting: Callable[[], bool]
    spool_dir: Path
    heartbeats: Heartbeats
    drain_beat: Callable[[], float]
    clock: Callable[[], float]
    worker_busy_until: Callable[[], float] = lambda: 0.0  # the inference runner's request deadline


class Watchdog:
    def __init__(self, notifier: Notifier, parts: WatchedParts, stall_s: float) -> None:
        self.notifier = notifier
        self.parts = parts
        self.stall_s = stall_s
        self.interval_s = notifier.watchdog_usec / 2e6
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.withheld: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.interval_s > 0

    def problems(self) -> list[str]:
        """What keeps the ping back now (empty: all is well)."""
        p = self.parts
        out = [] if p.accepting() else ["receiver: the listener's accept thread is not running"]
        if not spool_writable(p.spool_dir):
            out.append(f"receiver: the spool ({p.spool_dir}) takes no new file")
        overdue = p.heartbeats.overdue(WATCHED_LOOPS, self.stall_s)
        if "jobs" in overdue and p.worker_busy_until() > p.clock():
            overdue.remove("jobs")  # inside a worker request (a trial of a job-time activation) within its limit
        out += [f"{name}: no step for over {self.stall_s:g} s" for name in overdue]
        if p.clock() - p.drain_beat() > self.stall_s:
            out.append(f"mqtt-drain: no round for over {self.stall_s:g} s")
        return out

    def check_and_ping(self) -> bool:
        """One round: ping when every check passes; True when it pinged."""
        problems = tuple(self.problems())
        if problems != self.withheld:
            if problems:
                log_event(log, "watchdog.withheld", logging.ERROR, problems="; ".join(problems))
            else:
                log_event(log, "watchdog.resumed", logging.WARNING)
            self.withheld = problems
        return not problems and self.notifier.watchdog()

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        log_event(log, "watchdog.started", interval_s=round(self.interval_s, 3), stall_s=self.stall_s)
        self._thread = threading.Thread(target=self._run, name="edge-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_and_ping()
            except Exception:  # noqa: BLE001 - a failed check withholds this ping only
                log.exception("watchdog.check_failed")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def models_text(models: Sequence[ModelSummary]) -> str:
    """``ct-abdomen-seg 1.0.0 int8-vnni, mr-brain-cls fp32`` (``activating`` before a variant is chosen)."""
    return ", ".join(f"{m.name}{' ' + m.version if m.version else ''} {m.variant or 'activating'}"
                     for m in models) or "none"


class StatusLine:
    """Sends ``STATUS=compose()`` every ``interval_s`` when it changed (and at once on ``refresh``)."""

    def __init__(self, notifier: Notifier, compose: Callable[[], str], interval_s: float) -> None:
        self.notifier = notifier
        self.compose = compose
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.notifier.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edge-status", daemon=True)
            self._thread.start()

    def refresh(self) -> None:
        self._wake.set()

    def send(self) -> None:
        text = self.compose()
        if text != self._last:
            self.notifier.status(text)
            self._last = text

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send()
            except Exception:  # noqa: BLE001 - a status line is never worth a thread
                log.exception("status.compose_failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
