"""DICOM reception and the pipeline: refused instances, quarantine, rejected associations
(agent/ingest/scp.py); unrouted series and failed jobs (agent/service).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.events.base import DETAIL, OMIT_NONE, Severity, TypedEvent

# --------------------------------------------------------------------------------------------
# DICOM reception (agent/ingest/scp.py)


@dataclass(frozen=True, kw_only=True)
class DicomRejected(TypedEvent):
    """A C-STORE answered with a failure status and nothing kept: SOP class not accepted,
    unsupported data, spool full or failing, an internal error."""

    KIND = "dicom.rejected"
    SEVERITY = "warning"
    SEVERITIES = ("warning", "error")

    sop_instance_uid: str
    calling_ae: str
    reason: str
    status: int
    #: "warning" when the sender's data was refused, "error" when this device failed (disk, bug)
    level: Severity = field(default="warning", metadata=DETAIL)

    def severity(self) -> Severity:
        return self.level

    def message(self) -> str:
        return f"C-STORE refused with 0x{self.status:04X}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class InstanceQuarantined(TypedEvent):
    """A malformed instance refused (0xC210) and its bytes kept in quarantine."""

    KIND = "instance.quarantined"
    SEVERITY = "warning"

    sop_instance_uid: str
    calling_ae: str
    reason: str
    status: int
    quarantine_id: str

    def message(self) -> str:
        return f"C-STORE refused with 0x{self.status:04X}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class AssociationRejected(TypedEvent):
    """An association refused with A-ASSOCIATE-RJ (called AE title, caller not allowed, too many
    associations); ``result``, ``source``, ``diagnostic`` are the RJ parameters (PS3.8 9.3.4)."""

    KIND = "association.rejected"
    SEVERITY = "warning"

    sop_instance_uid: str = ""
    calling_ae: str
    peer: str
    reason: str
    status: int | None = None
    result: int | None
    source: int | None
    diagnostic: int | None

    def message(self) -> str:
        return f"association from {self.calling_ae or '?'}@{self.peer} rejected: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class ConnectionRefused(TypedEvent):
    """A TCP connection closed before pynetdicom saw it (agent/ingest/guard.py): too many
    connections not yet associated (from this peer or in total), no complete A-ASSOCIATE-RQ within
    ``dicom.limits.association_request_timeout_s``, a request PDU over ``dicom.limits.max_request_kb``,
    or something that is not an association request."""

    KIND = "connection.refused"
    SEVERITY = "warning"

    peer: str
    reason: str
    #: what the limit was about: pending_peer, pending_total, timeout, pdu_size, pdu_type
    limit: str

    def message(self) -> str:
        return f"connection from {self.peer} closed: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class EventsSuppressed(TypedEvent):
    """Refusal events beyond ``events.refusals_per_minute`` in one minute, counted instead of sent:
    ``counts`` kind -> number, ``reasons`` "kind: reason" -> number (the 20 most frequent),
    ``peers`` calling AE / address -> number (the 20 most frequent)."""

    KIND = "events.suppressed"
    SEVERITY = "warning"

    window_s: float
    total: int
    counts: dict[str, int]
    reasons: dict[str, int]
    peers: dict[str, int]

    def message(self) -> str:
        return f"{self.total} refusal events suppressed in {self.window_s:.0f} s"


# --------------------------------------------------------------------------------------------
# pipeline (agent/service.py)


@dataclass(frozen=True, kw_only=True)
class SeriesUnrouted(TypedEvent):
    """A complete series no model's routing rules want."""

    KIND = "series.unrouted"
    SEVERITY = "info"

    series_uid: str
    modality: str
    instances: int

    def message(self) -> str:
        return "no model wants this series"


@dataclass(frozen=True, kw_only=True)
class JobFailed(TypedEvent):
    """A job that failed ``pipeline.max_attempts`` times: no result for this series and model."""

    KIND = "job.failed"
    SEVERITY = "error"

    series_uid: str
    model: str
    kind: str  # what failed: the runner's failure kind
    attempts: int
    error: str = field(metadata=DETAIL)

    def message(self) -> str:
        return f"inference failed: {self.error}"


@dataclass(frozen=True, kw_only=True)
class SeriesRefused(TypedEvent):
    """A series too large to analyse: over a ``series_limits`` limit (at assembly or in the worker),
    or its job hit the worker's memory limit (``pipeline.worker_memory_mb``). Refused at once, never
    retried, and never counted against the model."""

    KIND = "series.refused"
    SEVERITY = "warning"

    series_uid: str
    model: str | None = field(default=None, metadata=OMIT_NONE)  # None: refused before routing to a job
    limit: str  # the configuration key of the limit it hit
    reason: str

    def message(self) -> str:
        return f"series refused as too large: {self.reason}"
