"""Drift of a model's live traffic against its reference (agent/drift, docs/drift.md)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.drift import DriftState
from agent.core.events.base import Severity, TypedEvent

_SEVERITY: dict[DriftState, Severity] = {"ok": "info", "warn": "warning", "alert": "error"}


@dataclass(frozen=True, kw_only=True)
class DriftStateChanged(TypedEvent):
    """A model's drift state moved (``ok``, ``warn``, ``alert``); ``signals`` names the signals at
    the new state (empty when it returned to ``ok``). Severity follows the new state: info for
    ok, warning for warn, error for alert."""

    KIND = "drift.state_changed"
    SEVERITY = "warning"
    SEVERITIES = ("info", "warning", "error")

    model: str
    version: str
    from_state: DriftState
    to_state: DriftState
    signals: tuple[str, ...]
    series_in_window: int

    def severity(self) -> Severity:
        return _SEVERITY[self.to_state]

    def message(self) -> str:
        why = f" ({', '.join(self.signals)})" if self.signals else ""
        return f"{self.model} {self.version}: drift {self.from_state} -> {self.to_state}{why}"
