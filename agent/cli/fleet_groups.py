"""Is a drift on one device or across a group? The group rule of ``edge-agent fleet`` (docs/fleet.md).

``group_verdicts(devices)`` takes the fleet's ``agent.cli.fleet_state.Device`` records and returns
one ``GroupVerdict`` per (group, signal) with at least one device in warn or alert on that signal,
group-wide ones first. ``device_scopes(verdicts)`` maps ``(device_id, model, signal)`` to the scope
shown beside a device's drift: ``model-wide``, ``scanner-wide`` or ``local``.

Groups. Each model a device reports drift for is a *member*: of the model group ``(model, variant)``
(the variant from the device's status or telemetry) and, when its drift message carries the
categorical signal ``metadata.manufacturer_model``, of the scanner group named by that signal's
dominant category. Only members in phase ``monitoring`` count (collecting or reference-less models
have no verdict yet).

Rule. A signal is *group-wide* in a group when at least ``GROUP_SHARE`` (30 %) of the group's
monitoring devices, and at least ``GROUP_MIN_DEVICES`` (2), are in warn or alert on that same signal:
the cause is shared (the model, or a scanner's protocol or software), not the site. Otherwise it is
*device-local* (a site, a scanner room, one misconfigured protocol). A model-wide verdict whose
affected devices all sit behind one scanner that is itself scanner-wide, while the group's devices on
other scanners are fine, is reported as that scanner's problem instead: the model is not what
changed. The rule is a triage hint (hence the "?"), never an automatic action.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agent.cli.fleet_state import Device

GROUP_SHARE = 0.30
GROUP_MIN_DEVICES = 2

Member = tuple[str, str]  # (device_id, model)


@dataclass(frozen=True)
class GroupVerdict:
    """One signal in one group: ``affected`` members in warn/alert (``alerts`` of them in alert) out of
    the group's ``monitoring`` devices; ``wide`` by the rule; ``scanner`` set when a model-wide
    pattern is explained by one scanner."""

    kind: Literal["model", "scanner"]
    key: str  # "mr-brain-cls ort-int8-u8s8" or the scanner's name
    signal: str
    monitoring: int
    affected: tuple[Member, ...]
    alerts: int
    wide: bool
    scanner: str | None = None

    @property
    def devices(self) -> int:
        return len({d for d, _ in self.affected})

    @property
    def scope(self) -> str:
        if not self.wide:
            return "local"
        return "scanner-wide" if self.kind == "scanner" or self.scanner is not None else "model-wide"

    def line(self) -> str:
        """``mr-brain-cls ort-int8-u8s8: 7/20 monitoring devices alert on input.intensity -> model-wide?``"""
        level = "alert" if self.alerts == len(self.affected) else \
            "warn" if self.alerts == 0 else f"warn/alert ({self.alerts} alert)"
        head = f"{'scanner ' if self.kind == 'scanner' else ''}{self.key}: {self.devices}/{self.monitoring} " \
               f"monitoring devices {level} on {self.signal}"
        if self.scanner is not None:
            return f"{head} -> all on scanner {self.scanner}: scanner-wide?"
        if self.wide:
            return f"{head} -> {self.scope}?"
        return f"{head} -> device-local ({', '.join(sorted({d for d, _ in self.affected})[:3])}" \
               f"{', ...' if self.devices > 3 else ''})"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "group": self.key, "signal": self.signal, "monitoring": self.monitoring,
                "affected": self.devices, "alerts": self.alerts, "scope": self.scope,
                "scanner": self.scanner, "devices": sorted({d for d, _ in self.affected})}


def is_wide(affected_devices: int, monitoring: int) -> bool:
    """The rule: at least 2 devices and at least 30 % of the group's monitoring devices."""
    return affected_devices >= GROUP_MIN_DEVICES and affected_devices >= math.ceil(GROUP_SHARE * monitoring - 1e-9)


def group_verdicts(devices: Iterable[Device]) -> list[GroupVerdict]:
    """See the module docstring."""
    members: dict[tuple[str, str], set[Member]] = defaultdict(set)  # (kind, key) -> members
    troubled: dict[tuple[str, str, str], list[tuple[Member, bool]]] = defaultdict(list)  # + signal
    scanner_of: dict[Member, str] = {}
    for dev in devices:
        for info in dev.drift.values():
            if info.phase != "monitoring":
                continue
            m: Member = (dev.device_id, info.model)
            keys = [("model", f"{info.model} {dev.variant_of(info.model)}")]
            if info.scanner is not None:
                keys.append(("scanner", info.scanner))
                scanner_of[m] = info.scanner
            signals = info.troubled_signals() if info.state != "ok" else ()
            for group in keys:
                members[group].add(m)
                for s in signals:
                    alert = info.signals.get(s, info.state) == "alert"
                    troubled[(*group, s)].append((m, alert))
    out: list[GroupVerdict] = []
    for (kind, key, signal), hits in troubled.items():
        monitoring = len({d for d, _ in members[(kind, key)]})
        affected = tuple(sorted(m for m, _ in hits))
        out.append(GroupVerdict("model" if kind == "model" else "scanner", key, signal, monitoring, affected,
                                sum(a for _, a in hits), is_wide(len({d for d, _ in affected}), monitoring)))
    out = [_explained_by_scanner(v, out, members, scanner_of) for v in out]
    out.sort(key=lambda v: (not v.wide, v.kind != "model", -v.devices, v.key, v.signal))
    return out


def _explained_by_scanner(v: GroupVerdict, verdicts: list[GroupVerdict],
                          members: Mapping[tuple[str, str], set[Member]],
                          scanner_of: Mapping[Member, str]) -> GroupVerdict:
    """A model-wide verdict whose affected members share one scanner-wide scanner, while the group's
    members on other scanners are unaffected, names that scanner (see the module docstring)."""
    if v.kind != "model" or not v.wide:
        return v
    scanners = {scanner_of.get(m) for m in v.affected}
    if len(scanners) != 1 or None in scanners:
        return v
    (scanner,) = scanners
    others = {m for m in members[("model", v.key)] if scanner_of.get(m) != scanner}
    scanner_wide = any(w.kind == "scanner" and w.key == scanner and w.signal == v.signal and w.wide
                       for w in verdicts)
    if not others or not scanner_wide:
        return v  # nothing to compare against: the model stays the suspect
    return GroupVerdict(v.kind, v.key, v.signal, v.monitoring, v.affected, v.alerts, v.wide, scanner)


def device_scopes(verdicts: Iterable[GroupVerdict]) -> dict[tuple[str, str, str], str]:
    """``(device_id, model, signal) -> scope``: a model-wide verdict wins over a scanner-wide one,
    which wins over device-local."""
    rank = {"model-wide": 2, "scanner-wide": 1, "local": 0}
    out: dict[tuple[str, str, str], str] = {}
    for v in verdicts:
        for device_id, model in v.affected:
            key = (device_id, model, v.signal)
            if key not in out or rank[v.scope] > rank[out[key]]:
                out[key] = v.scope
    return out
