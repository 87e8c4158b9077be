"""What the export stage needs of one result to build its DICOM objects: ``ExportRequest``.

The job thread writes it (as JSON, ``to_json``) in the transaction that commits the result, so it
holds everything later steps need without the job: the model's identity, the published outputs,
the exact source files the job read, and where the worker left the label map. No patient
attributes: those are read from the source files when the objects are built.

UIDs (``object_uids``): the Series and SOP Instance UIDs of a result's SEG and SR are derived from
its ``result_id`` and the object kind only (``2.25.`` + a 128-bit integer from a SHA-256), not from
the revision: a later revision of the same result (a re-sent or re-opened series) gets the *same*
UIDs, so a PACS that replaces an instance on a second store of its SOP Instance UID replaces it
(Orthanc with ``OverwriteInstances``) and one that keeps the first ignores it; no PACS shows two.
The revision is in the objects (``InstanceNumber``, ``ContentLabel``/series description).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core.types import ClassificationOutput, Outputs, SegmentationOutput

#: the kinds of object a result can become
OBJECT_KINDS = ("seg", "sr")
#: a namespace for derived UIDs, so no other scheme's hash collides with ours
_UID_NAMESPACE = "edge-agent/export/1"


def derived_uid(*parts: str) -> str:
    """A DICOM UID derived from ``parts``: ``2.25.`` and the first 128 bits of their SHA-256 read
    as an unsigned integer (PS3.5 B.2 UUID-derived form; at most 44 characters)."""
    digest = hashlib.sha256("|".join((_UID_NAMESPACE, *parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True)
class ObjectUids:
    series_uid: str
    sop_instance_uid: str


def object_uids(result_id: str, kind: str) -> ObjectUids:
    """The Series and SOP Instance UIDs of ``kind`` (seg, sr) for ``result_id`` (see the module
    docstring: the revision does not enter, so a new revision replaces the old one)."""
    if kind not in OBJECT_KINDS:
        raise ValueError(f"unknown object kind {kind!r}")
    return ObjectUids(derived_uid(result_id, kind, "series"), derived_uid(result_id, kind, "instance"))


def device_uid(device_id: str) -> str:
    """The UID of this device as an SR observer (stable per ``device_id``)."""
    return derived_uid("device", device_id)


@dataclass(frozen=True)
class LabelFigures:
    """One label of a segmentation result: what the result message published."""

    voxels: int
    volume_ml: float


@dataclass(frozen=True)
class ExportRequest:
    """One result to export. ``labels``: the model's labels in output order (segmentation:
    background first); ``figures``: per foreground label (segmentation); ``predicted`` /
    ``probability``: the class and its probability (classification). ``sources``: the spooled files
    the job read; ``label_map``: the worker's ``.npz`` (segmentation), "" when none was written.
    ``not_for_diagnostic_use``: the model says so (its description); the series descriptions say it."""

    result_id: str
    revision: int
    device_id: str
    model: str
    version: str
    variant: str
    backend: str
    precision: str
    task: str
    labels: tuple[str, ...]
    study_uid: str
    series_uid: str
    sources: tuple[str, ...]
    created_at: str
    not_for_diagnostic_use: bool = True
    label_map: str = ""
    figures: Mapping[str, LabelFigures] = field(default_factory=dict)
    predicted: str = ""
    probability: float = 0.0

    def to_json(self) -> str:
        doc: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["labels"] = list(self.labels)
        doc["sources"] = list(self.sources)
        doc["figures"] = {k: {"voxels": v.voxels, "volume_ml": v.volume_ml} for k, v in self.figures.items()}
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExportRequest:
        doc = json.loads(text)
        doc["labels"] = tuple(doc["labels"])
        doc["sources"] = tuple(doc["sources"])
        doc["figures"] = {k: LabelFigures(int(v["voxels"]), float(v["volume_ml"])) for k, v in doc["figures"].items()}
        return cls(**doc)


def figures_of(outputs: Outputs) -> tuple[dict[str, LabelFigures], str, float]:
    """(per-label figures, predicted class, its probability) of a prediction's outputs."""
    if isinstance(outputs, SegmentationOutput):
        return {k: LabelFigures(v.voxels, v.volume_ml) for k, v in outputs.labels.items()}, "", 0.0
    if isinstance(outputs, ClassificationOutput):
        return {}, outputs.label, float(outputs.confidence)
    raise TypeError(f"unknown outputs {type(outputs).__name__}")


def not_for_diagnostic_use(description: str) -> bool:
    """Whether a model's description (its model card's summary in model.toml) restricts its use:
    it says "not for clinical use" or "not for diagnostic use" (any case)."""
    text = " ".join(description.lower().split())
    return any(p in text for p in ("not for clinical use", "not for diagnostic use", "research use only"))


def source_list(paths: Sequence[object]) -> tuple[str, ...]:
    return tuple(str(p) for p in paths)
