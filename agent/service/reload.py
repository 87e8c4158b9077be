"""SIGHUP: read the configuration file again and apply what can change while the agent runs.

``ConfigReloader.reload()`` loads the file the agent was started with (and the same environment
overrides) with the same validation as at start. An unreadable or invalid file is refused as a
whole: ``config.reload_failed`` names the reason and the configuration in force does not change.
Otherwise every changed key is either *applied* now (``LIVE``) or reported as needing a restart
(its old value stays in force until then); ``config.reloaded`` lists both (keys only, never values).

Applied live (the running objects share the one ``Config``; the reloader updates its fields in
place and tells the parts that copied a value):

=================================  ===================================================================
``dicom.allowed_callers``           the next association is checked against the new rules (one in
                                    progress carries on: ``DicomListener.set_allowed_callers``)
``models.enabled``                  routing of series that fall due from now on (only among the models
                                    loaded at start; naming another model needs a restart)
``drift.thresholds``, ``drift.min_series``, ``drift.hysteresis_series``, ``drift.k_anonymity``,
``drift.min_publish_interval_s``    the next series' verdict (``thresholds``: calibrated again)
``telemetry.interval_s``,           from the next snapshot
``telemetry.max_queued``
``logging.level``, ``logging.format``  at once
=================================  ===================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.assembly import SeriesAssembler
from agent.core.config import Config, load_config
from agent.core.errors import ConfigError
from agent.core.events import ConfigReloaded, ConfigReloadFailed
from agent.core.log import log_event, setup_logging
from agent.core.modelspec import ModelSpec
from agent.core.types import Event
from agent.drift import DriftMonitor
from agent.ingest import DicomListener
from agent.ingest.scp import parse_allowed_callers

log = logging.getLogger(__name__)

LIVE = frozenset({
    "dicom.allowed_callers", "models.enabled",
    "drift.thresholds", "drift.min_series", "drift.hysteresis_series", "drift.k_anonymity",
    "drift.min_publish_interval_s", "telemetry.interval_s", "telemetry.max_queued",
    "logging.level", "logging.format",
})


@dataclass(frozen=True)
class ReloadTargets:
    """The running parts that copied a reloadable value. ``loaded``: the models loaded at start."""

    listener: DicomListener
    assembler: SeriesAssembler
    drift: DriftMonitor | None
    loaded: Mapping[str, ModelSpec]


def flat(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """``{"dicom.port": 11112, "dicom.tls.enabled": False, ...}`` (secrets stay SecretStr: they
    compare by value and are never printed)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flat(value, key + "."))
        else:
            out[key] = value
    return out


class ConfigReloader:
    def __init__(self, cfg: Config, path: Path | None, targets: ReloadTargets,
                 on_event: Callable[[Event], None]) -> None:
        self.cfg = cfg
        self.path = path
        self.targets = targets
        self.on_event = on_event

    def reload(self) -> ConfigReloaded | ConfigReloadFailed:
        """Read, validate, apply (see the module docstring); the event is also published."""
        source = str(self.path or "defaults")
        try:
            new = load_config(self.path)
            parse_allowed_callers(new.dicom.allowed_callers)  # refused here, not half-applied
        except ConfigError as exc:
            failed = ConfigReloadFailed(path=source, error=str(exc))
            log_event(log, "config.reload_failed", logging.ERROR, path=source, error=str(exc))
            self.on_event(failed.to_event())
            return failed
        old_keys, new_keys = flat(self.cfg), flat(new)
        changed = sorted(k for k in new_keys if new_keys[k] != old_keys.get(k))
        applied = [k for k in changed if k in LIVE and self._can_apply(k, new)]
        later = [k for k in changed if k not in applied]
        for key in applied:
            self._apply(key, new)
        done = ConfigReloaded(path=source, applied=tuple(applied), needs_restart=tuple(later))
        log_event(log, "config.reloaded", path=source, applied=",".join(applied) or "-",
                  needs_restart=",".join(later) or "-")
        self.on_event(done.to_event())
        return done

    def _can_apply(self, key: str, new: Config) -> bool:
        if key == "models.enabled":  # only models loaded at start can be routed to without a restart
            return set(new.models.enabled) <= set(self.targets.loaded)
        if key == "drift.thresholds":
            return self.targets.drift is not None
        return True

    def _apply(self, key: str, new: Config) -> None:
        section, _, name = key.partition(".")
        value = getattr(getattr(new, section), name)
        setattr(getattr(self.cfg, section), name, value)
        t = self.targets
        if key == "dicom.allowed_callers":
            t.listener.set_allowed_callers(value)
        elif key == "models.enabled":
            t.assembler.specs = [s for n, s in t.loaded.items() if not value or n in value]
        elif key == "drift.thresholds" and t.drift is not None:
            t.drift.retune(value == "model")
        elif section == "logging":
            setup_logging(self.cfg.logging.level, self.cfg.logging.format)
