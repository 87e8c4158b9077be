"""Model updates from the registry (agent/updates/updater.py): installed, failed, refused
downgrades, rollbacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.events.base import TypedEvent

# --------------------------------------------------------------------------------------------
# model updates (agent/updates/updater.py)


@dataclass(frozen=True, kw_only=True)
class ModelUpdated(TypedEvent):
    """A new version passed activation and is current."""

    KIND = "model.updated"
    SEVERITY = "info"

    model: str
    version: str
    previous: str | None
    variant: str | None
    reason: str
    variants: tuple[str, ...]
    downloaded_bytes: int
    correlation_id: str | None

    def message(self) -> str:
        return f"{self.model} {self.version} is active ({self.variant or '?'})"


@dataclass(frozen=True, kw_only=True)
class ModelUpdateFailed(TypedEvent):
    """An update that stopped at ``stage``; ``current`` is the version still running."""

    KIND = "model.update_failed"
    SEVERITY = "error"

    model: str
    target: str | None
    stage: str
    error: str
    current: str | None
    correlation_id: str | None

    def message(self) -> str:
        return f"update of {self.model} failed ({self.stage}): {self.error}"


@dataclass(frozen=True, kw_only=True)
class ModelDowngradeRefused(TypedEvent):
    """The registry offers a version older than the newest this device ran."""

    KIND = "model.downgrade_refused"
    SEVERITY = "warning"

    model: str
    offered: str
    current: str | None
    newest: str
    correlation_id: str | None

    def message(self) -> str:
        return (f"the registry offers {self.model} {self.offered}, older than {self.newest} which this "
                "device already ran: refusing the downgrade (an old or replayed index?); use rollback to go back")


@dataclass(frozen=True, kw_only=True)
class ModelRolledBack(TypedEvent):
    """The previous version passed activation and is current again (an operator's rollback)."""

    KIND = "model.rolled_back"
    SEVERITY = "warning"

    model: str
    version: str
    from_version: str | None
    variant: str | None
    correlation_id: str | None

    def message(self) -> str:
        return f"{self.model} rolled back from {self.from_version} to {self.version}"


@dataclass(frozen=True, kw_only=True)
class ModelRollbackFailed(TypedEvent):
    """A rollback that could not be done; the current version stays. ``model`` is null when none
    was named and more than one is installed."""

    KIND = "model.rollback_failed"
    SEVERITY = "error"

    model: str | None
    error: str
    correlation_id: str | None

    def message(self) -> str:
        return f"rollback failed: {self.error}"
