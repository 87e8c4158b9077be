"""Message payloads published over MQTT: results, events and device status (telemetry and drift
are built in ``agent.mqtt.monitoring`` and re-exported here).

This is a public contract (documented in docs/mqtt.md): hospital fleet monitoring parses these
messages. Every payload is compact UTF-8 JSON with a ``schema`` field naming its kind and major
version. The pydantic models below are the executable form of the schema; ``parse_result``,
``parse_event`` and ``parse_status`` validate received bytes against them.

Privacy: a result payload carries patient identifiers (name, ID, birth date) only when the
device is configured to (``privacy.include_patient_identifiers``); otherwise the builder never
reads them, so they cannot leak into any field.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.core import status
from agent.core.errors import PublishError
from agent.core.events import TypedEvent
from agent.core.types import (
    ClassificationOutput,
    Event,
    ModelRef,
    Result,
    SegmentationOutput,
)
from agent.core.util import iso_utc
from agent.mqtt.monitoring import DRIFT_SCHEMA as DRIFT_SCHEMA
from agent.mqtt.monitoring import TELEMETRY_SCHEMA as TELEMETRY_SCHEMA
from agent.mqtt.monitoring import drift_payload as drift_payload
from agent.mqtt.monitoring import parse_drift as parse_drift
from agent.mqtt.monitoring import parse_telemetry as parse_telemetry
from agent.mqtt.monitoring import telemetry_payload as telemetry_payload
from agent.mqtt.wire import dumps, finite, jsonable, parse

RESULT_SCHEMA = "edge-agent/result/1"
EVENT_SCHEMA = "edge-agent/event/1"
STATUS_SCHEMA = "edge-agent/status/1"

#: Fixed namespace of result ids (never change it: consumers de-duplicate on result_id).
RESULT_ID_NAMESPACE = uuid.UUID("f3968246-4914-4a72-a9b3-24bef4b2457e")

# DICOM keywords accepted as aliases of the patient mapping keys, so a caller can hand over the
# attributes it read from the dataset without renaming them.
_PATIENT_KEYS: dict[str, tuple[str, ...]] = {
    "name": ("name", "PatientName"),
    "id": ("id", "PatientID"),
    "birth_date": ("birth_date", "PatientBirthDate"),
}


# --------------------------------------------------------------------------------------------
# helpers


def result_id(series_uid: str, model_name: str, model_version: str) -> str:
    """Deterministic id of the result of one model version on one series.

    Takes the SeriesInstanceUID and the model's name and version; returns a UUID string
    (uuid5 over ``RESULT_ID_NAMESPACE`` and ``"{series_uid}|{model_name}|{model_version}"``).
    The same inputs give the same id on every device and after every restart, so consumers can
    de-duplicate on ``(result_id, revision)``; a new model version gives a new id.
    """
    if not series_uid or not model_name or not model_version:
        raise ValueError("result_id needs a series UID, a model name and a model version")
    return str(uuid.uuid5(RESULT_ID_NAMESPACE, f"{series_uid}|{model_name}|{model_version}"))


# --------------------------------------------------------------------------------------------
# schema (pydantic): the contract, as code


class _Strict(BaseModel):
    # Unknown keys are refused inside the schema's nested objects, so a typo in a builder is
    # caught by the tests; the top-level models allow extra keys so an older follower can read
    # messages from a newer minor revision that only added fields.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    name: str
    version: str
    variant: str
    backend: str
    precision: str


class LabelInfo(_Strict):
    voxels: int = Field(ge=0)
    volume_ml: float = Field(ge=0)
    bbox: list[int] = Field(description="[z0, y0, x0, z1, y1, x1] voxel indices, end exclusive")

    @model_validator(mode="after")
    def _bbox_len(self) -> LabelInfo:
        if len(self.bbox) not in (0, 6):
            raise ValueError("bbox has 6 entries (z0, y0, x0, z1, y1, x1), or none for an empty label")
        return self


class SegmentationOutputs(_Strict):
    labels: dict[str, LabelInfo]


class ClassificationOutputs(_Strict):
    label: str
    confidence: float = Field(ge=0, le=1)
    probabilities: dict[str, float]


class PatientInfo(_Strict):
    name: str
    id: str
    birth_date: str


class ResultMessage(BaseModel):
    """``edge-agent/result/1``: one model's result on one series revision."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_: Literal["edge-agent/result/1"] = Field(alias="schema")
    result_id: str
    revision: int = Field(ge=1)
    device_id: str
    study_uid: str
    series_uid: str
    model: ModelInfo
    task: Literal["segmentation", "classification"]
    outputs: SegmentationOutputs | ClassificationOutputs
    timings_ms: dict[str, float]
    created_at: str
    patient: PatientInfo | None = None

    @model_validator(mode="after")
    def _outputs_match_task(self) -> ResultMessage:
        want = SegmentationOutputs if self.task == "segmentation" else ClassificationOutputs
        if not isinstance(self.outputs, want):
            raise ValueError(f"outputs do not have the shape of a {self.task} result")
        return self


class EventMessage(BaseModel):
    """``edge-agent/event/1``: something operators should know about."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_: Literal["edge-agent/event/1"] = Field(alias="schema")
    device_id: str
    kind: str
    severity: Literal["info", "warning", "error"]
    message: str
    fields: dict[str, Any]
    created_at: str


class StatusModel(_Strict):
    name: str
    version: str
    variant: str
    backend: str
    accuracy: str = Field("", description="how the running variant's accuracy on this device's instruction-set "
                          "family is known (the publisher's verdict or the device gate's figures); '' for FP32 "
                          "from models.dir or a version not activated yet")


class GpuSummary(_Strict):
    name: str
    cc: str | None = Field(description="compute capability 'major.minor'; null when the driver does not say")
    int8: bool
    fp8: bool


class DeviceSummary(_Strict):
    """The capability probe in short (agent/device/probe.py ``Probe.summary()``, docs/probe.md)."""

    arch: str
    features: list[str] = Field(description="the CPU features that decide INT8/BF16 paths, as the kernel names them")
    int8_path: str
    isa_family: str = Field("", description="agent.core.isa family: where quantized variants' accuracy must be shown")
    bf16: bool
    gpus: list[GpuSummary]
    jetson: str | None = None
    backends: list[str] = Field(description="inference backends installed and usable")


class StatusMessage(BaseModel):
    """``edge-agent/status/1``: birth (``online``) and Last Will / shutdown (``offline``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_: Literal["edge-agent/status/1"] = Field(alias="schema")
    state: Literal["online", "offline"]
    device_id: str
    version: str
    started_at: str
    seq: int = Field(ge=0)
    capabilities: dict[str, Any]
    models: list[StatusModel]
    device: DeviceSummary | None = None
    reason: str | None = None


def parse_result(data: bytes | str) -> dict[str, Any]:
    """Validate a result message; returns it as a dict, raises PublishError when it is invalid."""
    return parse(ResultMessage, data)


def parse_event(data: bytes | str) -> dict[str, Any]:
    """Validate an event message; returns it as a dict, raises PublishError when it is invalid."""
    return parse(EventMessage, data)


def parse_status(data: bytes | str) -> dict[str, Any]:
    """Validate a status message; returns it as a dict, raises PublishError when it is invalid."""
    return parse(StatusMessage, data)


# --------------------------------------------------------------------------------------------
# builders


def _model_dict(model: ModelRef) -> dict[str, str]:
    return {
        "name": model.name,
        "version": model.version,
        "variant": model.variant,
        "backend": model.backend,
        "precision": model.precision,
    }


def _outputs_dict(outputs: SegmentationOutput | ClassificationOutput) -> dict[str, Any]:
    if isinstance(outputs, SegmentationOutput):
        return {
            "labels": {
                str(name): {
                    "voxels": int(stats.voxels),
                    "volume_ml": round(finite(stats.volume_ml, f"volume of {name}"), 3),
                    "bbox": [int(v) for v in stats.bbox],
                }
                for name, stats in outputs.labels.items()
            }
        }
    if isinstance(outputs, ClassificationOutput):
        return {
            "label": str(outputs.label),
            "confidence": round(finite(outputs.confidence, "confidence"), 6),
            "probabilities": {
                str(k): round(finite(v, f"probability of {k}"), 6) for k, v in outputs.probabilities.items()
            },
        }
    raise PublishError(f"unknown outputs type {type(outputs).__name__}")


def _patient_dict(patient: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, aliases in _PATIENT_KEYS.items():
        value = next((patient[a] for a in aliases if a in patient and patient[a] is not None), "")
        out[key] = str(value)
    return out


def result_payload(
    result: Result,
    *,
    patient: Mapping[str, Any] | None = None,
    include_patient_identifiers: bool = False,
) -> bytes:
    """Build the ``edge-agent/result/1`` message of ``result``.

    Takes the result and, optionally, the patient's identifiers (keys ``name``, ``id``,
    ``birth_date`` or the DICOM keywords ``PatientName``, ``PatientID``, ``PatientBirthDate``);
    returns compact UTF-8 JSON. The ``patient`` object is present only when
    ``include_patient_identifiers`` is true and ``patient`` is given; otherwise ``patient`` is not
    even read. Raises PublishError for values JSON cannot carry (NaN volumes, confidences).
    """
    pred = result.prediction
    doc: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "result_id": result.result_id,
        "revision": int(result.revision),
        "device_id": result.device_id,
        "study_uid": result.study_uid,
        "series_uid": result.series_uid,
        "model": _model_dict(pred.model),
        "task": pred.task,
        "outputs": _outputs_dict(pred.outputs),
        "timings_ms": {str(k): round(finite(v, f"timing {k}"), 3) for k, v in pred.timings_ms.items()},
        "created_at": result.created_at,
    }
    if include_patient_identifiers and patient is not None:
        doc["patient"] = _patient_dict(patient)
    return dumps(doc)


def event_payload(event: Event | TypedEvent, device_id: str) -> bytes:
    """Build the ``edge-agent/event/1`` message of ``event`` (stamped now when it has no time).

    ``event`` is one of the typed event kinds of agent/core/events/ (``CATALOG``), or the
    generic Event one of them made (``to_event()``).
    """
    if isinstance(event, TypedEvent):
        event = event.to_event()
    doc = {
        "schema": EVENT_SCHEMA,
        "device_id": device_id,
        "kind": event.kind,
        "severity": event.severity,
        "message": event.message,
        # default=str in _dumps would hide a bad value; convert explicitly: event fields are UIDs,
        # counts and reasons, anything else becomes its string form.
        "fields": {str(k): jsonable(v) for k, v in event.fields.items()},
        "created_at": iso_utc(event.created_at or None),
    }
    return dumps(doc)


def _status_models(models: Iterable[ModelRef | status.ModelSummary]) -> list[dict[str, str]]:
    out = []
    for m in models:
        if isinstance(m, ModelRef):
            out.append({"name": m.name, "version": m.version, "variant": m.variant, "backend": m.backend,
                        "accuracy": ""})
        else:
            doc = m.to_json()
            out.append({k: str(doc.get(k, "")) for k in ("name", "version", "variant", "backend", "accuracy")})
    return out


def status_payload(
    *,
    device_id: str,
    version: str,
    started_at: float | str,
    capabilities: Mapping[str, Any] | None = None,
    models: Iterable[ModelRef | status.ModelSummary] = (),
    state: Literal["online", "offline"] = "online",
    seq: int = 0,
    reason: str | None = None,
    device: status.DeviceSummary | None = None,
) -> bytes:
    """Build an ``edge-agent/status/1`` message (birth when ``state`` is online).

    ``started_at`` is the process start (epoch seconds or ISO string); ``capabilities`` a small
    summary dict (backends, accelerator, ...); ``models`` the loaded models; ``device`` the
    capability probe's summary (``Probe.summary()``: CPU arch and INT8/BF16 features, GPUs,
    usable backends), validated here so a malformed one fails the build, not a consumer. The
    publisher re-stamps ``seq`` (and ``state``/``reason`` for the offline variants) with
    ``restamp_status``.
    """
    doc: dict[str, Any] = {
        "schema": STATUS_SCHEMA,
        "state": state,
        "device_id": device_id,
        "version": version,
        "started_at": started_at if isinstance(started_at, str) else iso_utc(started_at),
        "seq": int(seq),
        "capabilities": {str(k): jsonable(v) for k, v in (capabilities or {}).items()},
        "models": _status_models(models),
    }
    if device is not None:
        try:
            doc["device"] = DeviceSummary.model_validate(device.to_json()).model_dump()
        except ValidationError as exc:
            raise PublishError(f"device summary does not match DeviceSummary: {exc}") from exc
    if reason is not None:
        doc["reason"] = reason
    return dumps(doc)


def restamp_status(
    payload: bytes, *, seq: int, state: Literal["online", "offline"], reason: str | None = None
) -> bytes:
    """Return the status message ``payload`` with ``seq``, ``state`` and ``reason`` replaced.

    The publisher builds the birth from its ``birth()`` callback and the Last Will / shutdown
    message from the same birth, so all three carry the same version, models and start time and
    the ``seq`` of the connection they belong to. Raises PublishError when ``payload`` is not a
    valid status message.
    """
    doc = parse_status(payload)
    doc["seq"] = int(seq)
    doc["state"] = state
    if reason is None:
        doc.pop("reason", None)
    else:
        doc["reason"] = reason
    return dumps(doc)
