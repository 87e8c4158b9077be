"""Every event kind the agent publishes on ``{prefix}/{device_id}/events``, as a typed model.

One frozen dataclass per kind: ``KIND`` (the dotted name on the wire), ``SEVERITY`` (its usual
severity; ``SEVERITIES`` lists every severity it can have when that depends on the values), its
fields (names, types, order: exactly the ``fields`` object of the message) and ``message()``, the
one line for humans. ``to_event()`` turns one into the generic ``agent.core.types.Event`` that the
outbox and ``agent.mqtt.payloads.event_payload`` take, so an emitter writes::

    on_event(ModelUpdated(model=m, version=v, ...).to_event())

and cannot misspell a kind or a field. ``CATALOG`` (kind -> class) is the single list of event
kinds: docs/mqtt.md documents each of them (tests/test_mqtt_docs.py checks both ways, field by
field), and a kind emitted anywhere as a string literal must be in it.

Two kinds of dataclass field are not plain message fields:

* ``metadata=DETAIL``: context the message line quotes but the ``fields`` object does not carry
  (today's wire has them in the message only; e.g. the error of ``job.failed``);
* ``metadata=OMIT_NONE``: left out of ``fields`` when None (e.g. ``correlation_id`` of the engine
  manager's events, present only when a command started the work).

Also here (``commands``): what a command handler returns (``CommandResult``; docs/mqtt.md "Commands") and the
typed outcomes of ``cmd/update`` and ``cmd/rollback`` that ``command.completed`` and
``command.failed`` carry in ``result`` (``cmd/selftest``'s are agent/core/status.py
``SelfTestReport``).

Fields hold UIDs, names, counts and reasons only: never patient identifiers.

Modules: ``base`` (TypedEvent, field markers), ``reception`` (DICOM, series, jobs), ``updates``
(model updates), ``engine`` (variant choice), ``drift`` (drift state), ``supervision`` (the daemon's
loops), ``export`` (DICOM objects back to the PACS), ``lifecycle`` (configuration reloads), ``commands``
(command events and results).
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.core.events.base import DETAIL, OMIT_NONE, DataclassInstance, Severity, TypedEvent, plain
from agent.core.events.commands import (
    CommandAccepted,
    CommandCompleted,
    CommandFailed,
    CommandRejected,
    CommandResult,
    ResultItem,
    RollbackOutcome,
    UpdateAction,
    UpdateOutcome,
)
from agent.core.events.drift import DriftStateChanged
from agent.core.events.engine import (
    EngineActivated,
    EngineActivationFailed,
    EngineDemoted,
    EngineDeviceGate,
    EngineDeviceGateStarted,
    EngineFallback,
    EngineRollbackFailed,
    EngineRollbackImpossible,
    EngineRolledBack,
    EngineSelftest,
    EngineSelftestFailed,
    EngineServingModelsDir,
    EngineShadowDisagreement,
)
from agent.core.events.export import ExportDeadLettered, ExportDelivered, ExportRefused
from agent.core.events.lifecycle import ConfigReloaded, ConfigReloadFailed
from agent.core.events.reception import (
    AssociationRejected,
    ConnectionRefused,
    DicomRejected,
    EventsSuppressed,
    InstanceQuarantined,
    JobFailed,
    SeriesRefused,
    SeriesUnrouted,
)
from agent.core.events.supervision import LoopFailed, LoopRecovered, LoopStalled
from agent.core.events.updates import (
    ModelDowngradeRefused,
    ModelRollbackFailed,
    ModelRolledBack,
    ModelUpdated,
    ModelUpdateFailed,
)

# --------------------------------------------------------------------------------------------
# the catalog

#: refusals of peers' traffic: rate-limited and coalesced (events.suppressed) by the event sink,
#: and a bounded share of the outbox (agent/mqtt/outbox.py kind "refusal")
REFUSAL_KINDS: frozenset[str] = frozenset({
    DicomRejected.KIND, InstanceQuarantined.KIND, AssociationRejected.KIND, ConnectionRefused.KIND,
})

_KINDS: tuple[type[TypedEvent], ...] = (
    DicomRejected,
    InstanceQuarantined,
    AssociationRejected,
    ConnectionRefused,
    EventsSuppressed,
    SeriesUnrouted,
    SeriesRefused,
    JobFailed,
    LoopStalled,
    LoopRecovered,
    LoopFailed,
    ConfigReloaded,
    ConfigReloadFailed,
    ModelUpdated,
    ModelUpdateFailed,
    ModelDowngradeRefused,
    ModelRolledBack,
    ModelRollbackFailed,
    EngineActivated,
    EngineActivationFailed,
    EngineDeviceGateStarted,
    EngineDeviceGate,
    EngineSelftest,
    EngineSelftestFailed,
    EngineServingModelsDir,
    EngineFallback,
    EngineDemoted,
    EngineShadowDisagreement,
    EngineRollbackImpossible,
    EngineRollbackFailed,
    EngineRolledBack,
    CommandAccepted,
    CommandRejected,
    CommandCompleted,
    CommandFailed,
    DriftStateChanged,
    ExportDelivered,
    ExportDeadLettered,
    ExportRefused,
)

#: every event kind the agent publishes: kind -> its class (docs/mqtt.md "Event kinds")
CATALOG: Mapping[str, type[TypedEvent]] = {cls.KIND: cls for cls in _KINDS}
if len(CATALOG) != len(_KINDS):  # pragma: no cover - a copy-pasted KIND
    raise RuntimeError("two event classes share a KIND")

__all__ = [
    "CATALOG",
    "REFUSAL_KINDS",
    "DETAIL",
    "OMIT_NONE",
    "AssociationRejected",
    "CommandAccepted",
    "CommandCompleted",
    "CommandFailed",
    "CommandRejected",
    "CommandResult",
    "ConfigReloadFailed",
    "ConfigReloaded",
    "ConnectionRefused",
    "DataclassInstance",
    "DicomRejected",
    "DriftStateChanged",
    "EngineActivated",
    "EngineActivationFailed",
    "EngineDemoted",
    "EngineDeviceGate",
    "EngineDeviceGateStarted",
    "EngineFallback",
    "EngineRollbackFailed",
    "EngineRollbackImpossible",
    "EngineRolledBack",
    "EngineSelftest",
    "EngineSelftestFailed",
    "EngineServingModelsDir",
    "EngineShadowDisagreement",
    "EventsSuppressed",
    "ExportDeadLettered",
    "ExportDelivered",
    "ExportRefused",
    "InstanceQuarantined",
    "JobFailed",
    "LoopFailed",
    "LoopRecovered",
    "LoopStalled",
    "ModelDowngradeRefused",
    "ModelRollbackFailed",
    "ModelRolledBack",
    "ModelUpdateFailed",
    "ModelUpdated",
    "ResultItem",
    "RollbackOutcome",
    "SeriesRefused",
    "SeriesUnrouted",
    "Severity",
    "TypedEvent",
    "UpdateAction",
    "UpdateOutcome",
    "plain",
]
