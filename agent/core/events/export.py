"""Results back to the PACS as DICOM objects (agent/export, agent/service/export_loop.py,
docs/export.md). ``result_id`` and ``revision`` are the result's (docs/mqtt.md); ``destination`` an
``[[export]]`` name; ``object`` ``seg`` or ``sr``. UIDs only, never patient attributes."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.events.base import TypedEvent


@dataclass(frozen=True, kw_only=True)
class ExportDelivered(TypedEvent):
    """The destination stored the object (C-STORE status 0x0000, or a storage warning 0xB000,
    0xB006, 0xB007): its UIDs, so a consumer of the result can open it in the PACS."""

    KIND = "export.delivered"
    SEVERITY = "info"

    result_id: str
    revision: int
    destination: str
    object: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    status: int
    attempts: int

    def message(self) -> str:
        return (f"{self.object} of result {self.result_id} (revision {self.revision}) stored by "
                f"{self.destination} after {self.attempts} tries (status 0x{self.status:04X})")


@dataclass(frozen=True, kw_only=True)
class ExportDeadLettered(TypedEvent):
    """An object the destination did not store after ``max_attempts`` tries: it stays in the
    queue's dead-letter state (counted in telemetry) and is not tried again."""

    KIND = "export.dead_lettered"
    SEVERITY = "error"

    result_id: str
    revision: int
    destination: str
    object: str
    attempts: int
    error: str

    def message(self) -> str:
        return (f"{self.object} of result {self.result_id} (revision {self.revision}) not stored by "
                f"{self.destination} after {self.attempts} tries: {self.error}")


@dataclass(frozen=True, kw_only=True)
class ExportRefused(TypedEvent):
    """The object could not be built from the source images (a missing or inconsistent attribute,
    a label with no code, the source gone from the spool): not sent, not retried."""

    KIND = "export.refused"
    SEVERITY = "error"

    result_id: str
    revision: int
    object: str
    reason: str

    def message(self) -> str:
        return f"{self.object} of result {self.result_id} (revision {self.revision}) not built: {self.reason}"
