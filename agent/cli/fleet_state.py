"""Merged state of a fleet of edge agents, fed one MQTT message at a time (``edge-agent fleet``).

Pure: no network, no clock. ``FleetState.feed(topic, payload, now)`` takes a message received on
``{prefix}/{device_id}/{status,telemetry,drift,events}`` (``now``: epoch seconds it arrived) and
returns the device id it changed (None when the message was ignored or unattributable);
``FleetState.view(now)`` returns a ``FleetView``: one ``DeviceRow`` per device, problems first, the
group verdicts of ``agent.cli.fleet_groups`` and a ``FleetSummary``. ``DeviceRow.to_json()`` is the
``--json`` form (docs/fleet.md).

Parsing is deliberately tolerant, unlike ``agent.mqtt.payloads.parse_status`` (which validates the
contract strictly and refuses unknown fields in nested objects): a monitor must keep showing a fleet
that runs several agent versions. Unknown fields are ignored, a missing or mistyped field is shown as
'-', and a message that cannot be read at all (not a JSON object, another message kind's schema, no
usable state) is counted against its device and skipped: one bad device never stops the view.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.cli.fleet_groups import GroupVerdict, device_scopes, group_verdicts
from agent.core.util import iso_utc

KINDS = ("status", "telemetry", "drift", "events")
DriftLevel = Literal["ok", "warn", "alert"]
_DRIFT_RANK = {"ok": 0, "warn": 1, "alert": 2}
#: a categorical metadata signal whose dominant category names the scanner a model's traffic comes from
SCANNER_SIGNAL = "metadata.manufacturer_model"
#: outbox rows older than this are a problem: results are not reaching the broker
OUTBOX_AGE_PROBLEM_S = 300.0
#: telemetry interval assumed before a device has said its own
DEFAULT_INTERVAL_S = 60.0
#: missed intervals before a device is marked stale (when --stale-after is not given)
STALE_INTERVALS = 3.0


# ------------------------------------------------------------------------------ tolerant readers


def _num(doc: Any, *path: str) -> float | None:
    """The number at ``path`` in nested dicts, or None (missing, not a number, a bool)."""
    for key in path:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    # json.loads takes NaN and Infinity: neither is a figure to show, nor valid JSON to pass on
    if isinstance(doc, bool) or not isinstance(doc, (int, float)) or not math.isfinite(doc):
        return None
    return float(doc)


def _str(doc: Mapping[str, Any], key: str) -> str | None:
    return value if isinstance(value := doc.get(key), str) and value else None


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an ISO 8601 timestamp (``...Z`` or with an offset), None when unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        # Python 3.10's fromisoformat does not take the "Z" every agent writes
        when = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def _load(payload: bytes, kind: str) -> dict[str, Any] | None:
    """The message as a dict, or None when it is not one of ``kind`` (a schema of another kind)."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    schema = doc.get("schema")
    want = "edge-agent/event/" if kind == "events" else f"edge-agent/{kind}/"
    # no schema at all is read anyway (hand-made test messages); a different kind's schema is not
    if schema is not None and not (isinstance(schema, str) and schema.startswith(want)):
        return None
    return doc


def _models(raw: Any) -> tuple[ModelRow, ...]:
    if not isinstance(raw, list):
        return ()
    return tuple(ModelRow(_str(m, "name") or "-", _str(m, "version") or "-", _str(m, "variant") or "-",
                          _str(m, "backend") or "-")
                 for m in raw if isinstance(m, Mapping))


def dominant_category(counts: Any) -> str | None:
    """The most frequent category of ``{category: n}``; "other" (rare categories folded together for
    k-anonymity) only when nothing else was seen; ties go to the first name in sort order."""
    if not isinstance(counts, Mapping):
        return None
    valid = {str(k): float(v) for k, v in counts.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}
    named = {k: v for k, v in valid.items() if k != "other"} or valid
    if not named:
        return None
    return min(named, key=lambda k: (-named[k], k))


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class ModelRow:
    name: str
    version: str
    variant: str
    backend: str


@dataclass(frozen=True)
class DriftInfo:
    """One model's latest drift message on one device."""

    model: str
    version: str
    state: DriftLevel
    phase: str
    responsible: tuple[str, ...]
    signals: Mapping[str, str]  # signal name -> its state
    scanner: str | None
    created_at: float | None
    seq: float | None

    def troubled_signals(self) -> tuple[str, ...]:
        """Signals in warn or alert: the responsible ones, or read from the signals when absent."""
        if self.responsible:
            return self.responsible
        return tuple(sorted(n for n, s in self.signals.items() if s in ("warn", "alert")))


@dataclass
class Device:
    """Everything known about one device; fields stay None until a message said them."""

    device_id: str
    first_seen: float
    state: str | None = None  # online | offline
    reason: str | None = None
    version: str | None = None
    started_at: str | None = None
    status_seq: float | None = None
    models: tuple[ModelRow, ...] = ()
    telemetry_at: float | None = None  # when the latest telemetry arrived (our clock)
    telemetry_created: float | None = None
    interval_s: float | None = None
    p95_ms: float | None = None
    queue_depth: float | None = None
    outbox_pending: float | None = None
    outbox_oldest_age_s: float | None = None
    telemetry_models: tuple[ModelRow, ...] = ()
    drift: dict[str, DriftInfo] = field(default_factory=dict)
    event_kind: str | None = None
    event_severity: str | None = None
    event_at: float | None = None
    malformed: int = 0

    def variant_of(self, model: str) -> str:
        """The variant ``model`` runs in on this device ('-' when no status or telemetry said)."""
        for m in (*self.models, *self.telemetry_models):
            if m.name == model and m.variant != "-":
                return m.variant
        return "-"


@dataclass(frozen=True)
class DeviceRow:
    """One device as shown: ``level`` 3 critical, 2 warning, 1 notice, 0 fine; ``problems`` says why."""

    device_id: str
    state: str  # online | offline | unknown
    reason: str | None
    version: str | None
    models: tuple[ModelRow, ...]
    p95_ms: float | None
    queue_depth: float | None
    outbox_pending: float | None
    outbox_oldest_age_s: float | None
    telemetry_at: float | None
    stale: bool
    drift_state: str | None  # ok | warn | alert | collecting | no_reference
    drift_model: str | None
    drift_signals: tuple[str, ...]
    drift_scope: str | None  # model-wide | scanner-wide | local
    scanner: str | None
    event_kind: str | None
    event_severity: str | None
    event_at: float | None
    malformed: int
    level: int
    problems: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` device line: absolute times only, so it changes when the device does."""
        def when(ts: float | None) -> str | None:
            return None if ts is None else iso_utc(ts)

        def number(v: float | None) -> float | int | None:
            return int(v) if v is not None and v.is_integer() else v

        return {
            "type": "device", "device_id": self.device_id, "state": self.state, "reason": self.reason,
            "version": self.version,
            "models": [{"name": m.name, "version": m.version, "variant": m.variant, "backend": m.backend}
                       for m in self.models],
            "inference_p95_ms": self.p95_ms, "queue_depth": number(self.queue_depth),
            "outbox_pending": number(self.outbox_pending), "outbox_oldest_age_s": self.outbox_oldest_age_s,
            "telemetry_at": when(self.telemetry_at), "stale": self.stale,
            "drift": {"state": self.drift_state, "model": self.drift_model, "signals": list(self.drift_signals),
                      "scope": self.drift_scope, "scanner": self.scanner},
            "last_event": None if self.event_kind is None else
            {"kind": self.event_kind, "severity": self.event_severity, "at": when(self.event_at)},
            "malformed": self.malformed, "level": self.level, "problems": list(self.problems),
        }


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    online: int
    offline: int
    unknown: int
    stale: int
    drift_alert: int
    drift_warn: int
    problems: int  # rows at level >= 2
    malformed: int  # messages skipped, all devices and unattributable ones
    ignored: int  # messages on topics the view does not read

    def to_json(self) -> dict[str, Any]:
        return {"type": "summary", **{k: getattr(self, k) for k in self.__dataclass_fields__}}


@dataclass(frozen=True)
class FleetView:
    rows: tuple[DeviceRow, ...]
    groups: tuple[GroupVerdict, ...]
    summary: FleetSummary


# ------------------------------------------------------------------------------ the merge


class FleetState:
    """Devices under ``prefix``; see the module docstring.

    ``stale_after_s``: an online device is stale when no telemetry arrived for this long (default:
    ``STALE_INTERVALS`` of its own ``interval_s``); ``event_recent_s``: how long a warning or error
    event keeps counting as a problem.
    """

    def __init__(self, prefix: str, *, stale_after_s: float | None = None, event_recent_s: float = 3600.0) -> None:
        self.prefix = prefix.rstrip("/")
        self.stale_after_s = stale_after_s
        self.event_recent_s = event_recent_s
        self.devices: dict[str, Device] = {}
        self.malformed = 0
        self.ignored = 0

    def split_topic(self, topic: str) -> tuple[str, str] | None:
        """``(device_id, kind)`` of ``{prefix}/{device_id}/{kind}``, None for any other topic."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or not parts[0] or parts[1] not in KINDS:
            return None
        return parts[0], parts[1]

    def feed(self, topic: str, payload: bytes, now: float) -> str | None:
        """Merge one message; returns the device id it changed, None when it changed nothing."""
        where = self.split_topic(topic)
        if where is None:
            self.ignored += 1
            return None
        device_id, kind = where
        if kind == "status" and not payload:
            # an empty retained message clears the topic: the device was taken out of service
            return device_id if self.devices.pop(device_id, None) is not None else None
        doc = _load(payload, kind)
        dev = self.devices.get(device_id)
        if dev is None:
            dev = Device(device_id, first_seen=now)
        ok = doc is not None and {"status": self._status, "telemetry": self._telemetry,
                                  "drift": self._drift, "events": self._event}[kind](dev, doc, now)
        if not ok:
            self.malformed += 1
            dev.malformed += 1
        self.devices[device_id] = dev
        return device_id

    @staticmethod
    def _status(dev: Device, doc: dict[str, Any], now: float) -> bool:
        state = doc.get("state")
        if state not in ("online", "offline"):
            return False
        seq, started = _num(doc, "seq"), _str(doc, "started_at")
        if (seq is not None and dev.status_seq is not None and seq < dev.status_seq
                and (started or "") <= (dev.started_at or "")):
            # a Will of an older connection of the same process, published after the newer birth
            # (the broker noticed the dead connection late): the device is not offline
            return True
        dev.state, dev.reason = state, _str(doc, "reason") if state == "offline" else None
        dev.version, dev.started_at, dev.status_seq = _str(doc, "version"), started, seq
        dev.models = _models(doc.get("models"))
        return True

    @staticmethod
    def _telemetry(dev: Device, doc: dict[str, Any], now: float) -> bool:
        created = parse_time(doc.get("created_at"))
        dev.telemetry_at = now  # it arrived: the device (or its outbox) is alive, whatever its age
        if created is not None and dev.telemetry_created is not None and created < dev.telemetry_created:
            # the outbox replays old telemetry after an outage: keep the newer figures on show
            return True
        pipeline = doc.get("pipeline")
        dev.telemetry_created = created
        dev.interval_s = _num(doc, "interval_s")
        p95_s = _num(pipeline, "latency", "inference", "p95_s")
        # two spellings: latency.{stage}.p95_s (seconds, agent.mqtt.monitoring) and latency_ms.{stage}.p95
        dev.p95_ms = round(p95_s * 1000, 3) if p95_s is not None else _num(pipeline, "latency_ms", "inference", "p95")
        dev.queue_depth = _num(pipeline, "queue_depth")
        dev.outbox_pending = _num(pipeline, "outbox_pending")
        dev.outbox_oldest_age_s = _num(pipeline, "outbox_oldest_age_s")
        dev.telemetry_models = _models(doc.get("models"))
        return True

    @staticmethod
    def _drift(dev: Device, doc: dict[str, Any], now: float) -> bool:
        model, state = _str(doc, "model"), doc.get("state")
        if model is None or state not in _DRIFT_RANK:
            return False
        created, seq = parse_time(doc.get("created_at")), _num(doc, "seq")
        old = dev.drift.get(model)
        if old is not None and ((created is not None and old.created_at is not None and created < old.created_at)
                                or (created is None and seq is not None and old.seq is not None and seq < old.seq)):
            return True  # an older report delivered late
        signals: dict[str, str] = {}
        scanner = None
        raw_signals = doc.get("signals")
        for s in raw_signals if isinstance(raw_signals, list) else ():
            if isinstance(s, Mapping) and isinstance(s.get("name"), str):
                signals[s["name"]] = str(s.get("state", "-"))
                if s["name"] == SCANNER_SIGNAL and isinstance(s.get("detail"), Mapping):
                    scanner = dominant_category(s["detail"].get("counts")) or scanner
        raw_resp = doc.get("responsible")
        responsible = tuple(r for r in raw_resp if isinstance(r, str)) if isinstance(raw_resp, list) else ()
        phase = _str(doc, "phase") or "monitoring"
        dev.drift[model] = DriftInfo(model, _str(doc, "version") or "-", state, phase, responsible, signals,
                                     scanner, created, seq)
        return True

    @staticmethod
    def _event(dev: Device, doc: dict[str, Any], now: float) -> bool:
        kind = _str(doc, "kind")
        if kind is None:
            return False
        dev.event_kind, dev.event_severity = kind, _str(doc, "severity")
        created = parse_time(doc.get("created_at"))
        # a device clock ahead of ours would show a negative age: never later than its arrival
        dev.event_at = now if created is None else min(created, now)
        return True

    # -------------------------------------------------------------------------- reading

    def view(self, now: float) -> FleetView:
        """Rows (problems first), group verdicts and the summary as of ``now``."""
        verdicts = group_verdicts(self.devices.values())
        scopes = device_scopes(verdicts)
        rows = sorted((self._row(d, now, scopes) for d in self.devices.values()),
                      key=lambda r: (-r.level, -len(r.problems), r.device_id))
        summary = FleetSummary(
            devices=len(rows), online=sum(r.state == "online" for r in rows),
            offline=sum(r.state == "offline" for r in rows), unknown=sum(r.state == "unknown" for r in rows),
            stale=sum(r.stale for r in rows), drift_alert=sum(r.drift_state == "alert" for r in rows),
            drift_warn=sum(r.drift_state == "warn" for r in rows), problems=sum(r.level >= 2 for r in rows),
            malformed=self.malformed, ignored=self.ignored)
        return FleetView(tuple(rows), tuple(verdicts), summary)

    def _stale(self, dev: Device, now: float) -> tuple[bool, str | None]:
        if dev.state == "offline":
            return False, None  # its Last Will already says so
        limit = self.stale_after_s or STALE_INTERVALS * (dev.interval_s or DEFAULT_INTERVAL_S)
        since = dev.telemetry_at if dev.telemetry_at is not None else dev.first_seen
        if now - since <= limit:
            return False, None
        if dev.telemetry_at is None:
            return True, "no telemetry"
        return True, f"no telemetry for {format_age(now - since)}"

    def _row(self, dev: Device, now: float, scopes: Mapping[tuple[str, str, str], str]) -> DeviceRow:
        problems: list[tuple[int, str]] = []
        state = dev.state or "unknown"
        if state == "offline":
            problems.append((1, "stopped") if dev.reason == "shutdown" else (3, f"offline ({dev.reason or '-'})"))
        elif state == "unknown":
            problems.append((1, "no status"))
        stale, why = self._stale(dev, now)
        if why is not None:
            # a device that never sent telemetry may be an agent from before telemetry existed
            problems.append((2 if dev.telemetry_at is not None else 1, why))
        worst = max(dev.drift.values(), key=lambda d: (d.phase == "monitoring", _DRIFT_RANK[d.state], d.model),
                    default=None)
        drift_state: str | None = None
        signals: tuple[str, ...] = ()
        scope: str | None = None
        if worst is not None:
            drift_state = worst.state if worst.phase == "monitoring" else worst.phase
            if worst.phase == "monitoring" and worst.state != "ok":
                signals = worst.troubled_signals()
                scope = next((scopes[(dev.device_id, worst.model, s)] for s in signals
                              if (dev.device_id, worst.model, s) in scopes), "local")
                problems.append((3 if worst.state == "alert" else 2,
                                 f"drift {worst.state} {worst.model}: {', '.join(signals) or '-'} ({scope})"))
        if dev.event_at is not None and now - dev.event_at <= self.event_recent_s:
            if dev.event_severity == "error":
                problems.append((2, f"error event {dev.event_kind}"))
            elif dev.event_severity == "warning":
                problems.append((1, f"warning event {dev.event_kind}"))
        if dev.outbox_oldest_age_s is not None and dev.outbox_oldest_age_s > OUTBOX_AGE_PROBLEM_S:
            problems.append((2, f"outbox backlog {format_age(dev.outbox_oldest_age_s)} old"))
        if dev.malformed:
            problems.append((1, f"{dev.malformed} malformed message(s)"))
        problems.sort(key=lambda p: -p[0])
        return DeviceRow(
            dev.device_id, state, dev.reason, dev.version, dev.models or dev.telemetry_models, dev.p95_ms,
            dev.queue_depth, dev.outbox_pending, dev.outbox_oldest_age_s, dev.telemetry_at, stale, drift_state,
            worst.model if worst is not None else None, signals, scope,
            worst.scanner if worst is not None else None, dev.event_kind, dev.event_severity, dev.event_at,
            dev.malformed, max((p[0] for p in problems), default=0), tuple(p[1] for p in problems))


def format_age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: an age in its largest whole unit."""
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"
