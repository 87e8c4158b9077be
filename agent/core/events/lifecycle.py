"""The daemon's lifecycle under its service manager (agent/service/reload.py, docs/lifecycle.md):
configuration reloads on SIGHUP. Fields name configuration keys and reasons, never values that
could be secrets."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.events.base import TypedEvent


@dataclass(frozen=True, kw_only=True)
class ConfigReloaded(TypedEvent):
    """SIGHUP: the configuration file was read again and is valid. ``applied``: changed keys now in
    force; ``needs_restart``: changed keys that take effect only after a restart (the old values
    stay in force until then)."""

    KIND = "config.reloaded"
    SEVERITY = "info"

    path: str
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]

    def message(self) -> str:
        applied = ", ".join(self.applied) or "nothing changed"
        later = f"; needs a restart: {', '.join(self.needs_restart)}" if self.needs_restart else ""
        return f"configuration reloaded ({applied}){later}"


@dataclass(frozen=True, kw_only=True)
class ConfigReloadFailed(TypedEvent):
    """SIGHUP: the configuration file could not be used (unreadable, not TOML, invalid); the
    configuration in force stays as it was."""

    KIND = "config.reload_failed"
    SEVERITY = "error"

    path: str
    error: str

    def message(self) -> str:
        return f"configuration reload refused, the previous one stays in force: {self.error}"
