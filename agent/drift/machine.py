"""A model's drift state machine: ok -> warn -> alert, escalating at once, stepping down slowly.

:func:`verdict` takes the window's signals and returns the worst state among them; :func:`step`
takes the current state, the number of consecutive series evaluated below it so far, the new
verdict and ``hysteresis_series``, and returns the next state, the new count and why it changed
(None when it did not):

* a verdict above the state: the state becomes the verdict at once (``escalated``), count 0;
* a verdict below the state: the count grows; at ``hysteresis_series`` the state steps down *one*
  level (``stepped_down``: alert -> warn, never alert -> ok in one go) and the count restarts,
  so alert -> ok takes 2 x ``hysteresis_series`` clean series;
* a verdict equal to the state: the count restarts (the series in a row must be consecutive).

Why: a shifted scanner stays in the rolling window for ``window`` series, so a verdict flickering
around a threshold as series enter and leave would otherwise publish a state change per series.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.core.drift import DRIFT_STATES, DriftSignal, DriftState, TransitionReason


def level(state: DriftState) -> int:
    return DRIFT_STATES.index(state)


def verdict(signals: Iterable[DriftSignal]) -> DriftState:
    """The worst state among ``signals`` (ok when there are none)."""
    return max((s.state for s in signals), key=level, default="ok")


def step(state: DriftState, lower_streak: int, new: DriftState,
         hysteresis_series: int) -> tuple[DriftState, int, TransitionReason | None]:
    """The next (state, consecutive series below it, reason of a change); see the module docstring."""
    if level(new) > level(state):
        return new, 0, "escalated"
    if level(new) == level(state):
        return state, 0, None
    lower_streak += 1
    if lower_streak >= hysteresis_series:
        return DRIFT_STATES[level(state) - 1], 0, "stepped_down"
    return state, lower_streak, None
