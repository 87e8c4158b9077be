"""Job-time rules for the active variant: when to shadow, when to demote.

Pure bookkeeping (no I/O); the job path (jobs.py) asks and acts. Per model, for the variant running now:

* consecutive failures: a job whose variant failed (load error, exception, non-finite output, a crash
  by a signal; not a timeout or out of memory, which are the device's limits) counts one; a success
  resets the count. ``max_consecutive_failures`` in a row: demote.
* shadow validation: every ``shadow_every``-th job also runs FP32; each comparison agrees or not
  (``selftest.agrees``). Over the last ``shadow_window`` comparisons, once there are at least
  ``shadow_min_samples``, an agreement rate below ``shadow_min_agreement`` demotes.

The counters live in memory: after a restart a variant starts with a clean slate (its demotion, once
decided, is persisted by the job path).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from agent.core.config import EnginesConfig
from agent.core.status import GuardStatus


@dataclass
class _Health:
    variant: str
    jobs: int = 0
    consecutive_failures: int = 0
    window: deque[bool] = field(default_factory=deque)


@dataclass(frozen=True)
class Verdict:
    """What the guard concluded after a job: ``demote`` and why."""

    demote: bool = False
    reason: str = ""


class JobGuard:
    """Failure and agreement counters per model (see the module docstring)."""

    def __init__(self, cfg: EnginesConfig) -> None:
        self.cfg = cfg
        self._health: dict[str, _Health] = {}

    def _for(self, model: str, variant: str) -> _Health:
        h = self._health.get(model)
        if h is None or h.variant != variant:  # another variant (or version) took over: start afresh
            h = self._health[model] = _Health(variant, window=deque(maxlen=self.cfg.shadow_window))
        return h

    def next_job_shadowed(self, model: str, variant: str) -> bool:
        """Count a job about to run on ``variant``; True when this one should also run FP32."""
        h = self._for(model, variant)
        h.jobs += 1
        every = self.cfg.shadow_every
        return every > 0 and h.jobs % every == 0

    def succeeded(self, model: str, variant: str) -> None:
        self._for(model, variant).consecutive_failures = 0

    def failed(self, model: str, variant: str) -> Verdict:
        h = self._for(model, variant)
        h.consecutive_failures += 1
        n = self.cfg.max_consecutive_failures
        if h.consecutive_failures >= n:
            return Verdict(True, f"{h.consecutive_failures} consecutive failed jobs (limit {n})")
        return Verdict()

    def compared(self, model: str, variant: str, agreed: bool) -> tuple[Verdict, float]:
        """Record one shadow comparison; returns the verdict and the agreement rate over the window."""
        h = self._for(model, variant)
        h.window.append(agreed)
        rate = sum(h.window) / len(h.window)
        if len(h.window) >= self.cfg.shadow_min_samples and rate < self.cfg.shadow_min_agreement:
            return Verdict(True, f"agreement with FP32 {rate:.0%} over the last {len(h.window)} shadow "
                           f"comparisons, below {self.cfg.shadow_min_agreement:.0%}"), rate
        return Verdict(), rate

    def stats(self, model: str) -> GuardStatus | None:
        """Counters for ``describe``; None before the model's first job in this process."""
        h = self._health.get(model)
        if h is None:
            return None
        return GuardStatus(variant=h.variant, jobs=h.jobs, consecutive_failures=h.consecutive_failures,
                           shadow_comparisons=len(h.window),
                           shadow_agreement=round(sum(h.window) / len(h.window), 4) if h.window else None)
