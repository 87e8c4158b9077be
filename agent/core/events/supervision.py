"""The daemon's own health: a supervised loop that fails, recovers, or gives up
(agent/service/supervisor.py). ``loop`` names the loop: assembly, jobs, telemetry, mqtt-drain."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.events.base import TypedEvent


@dataclass(frozen=True, kw_only=True)
class LoopStalled(TypedEvent):
    """A loop's step failed (database locked past the busy timeout, disk full, I/O error, a bug);
    it is retried with exponential backoff. Published once per stall, not per retry."""

    KIND = "loop.stalled"
    SEVERITY = "warning"

    loop: str
    error: str
    retry_in_s: float

    def message(self) -> str:
        return f"the {self.loop} loop stalled ({self.error}); retrying in {self.retry_in_s:g} s"


@dataclass(frozen=True, kw_only=True)
class LoopRecovered(TypedEvent):
    """A stalled loop made a step again; nothing it held was lost."""

    KIND = "loop.recovered"
    SEVERITY = "info"

    loop: str
    stalled_s: float
    failures: int

    def message(self) -> str:
        return f"the {self.loop} loop recovered after {self.stalled_s:g} s ({self.failures} failed tries)"


@dataclass(frozen=True, kw_only=True)
class LoopFailed(TypedEvent):
    """A loop failed for ``supervision.give_up_after_s`` (or died): the process exits non-zero so the
    service manager restarts it. Written to the outbox when the database still takes it."""

    KIND = "loop.failed"
    SEVERITY = "error"

    loop: str
    error: str
    stalled_s: float

    def message(self) -> str:
        return f"the {self.loop} loop failed for {self.stalled_s:g} s ({self.error}); the agent exits to be restarted"
