"""Core types passed between pipeline stages.

Small, frozen dataclasses: a stage takes one and returns another, never a dict of unknown shape.
Nothing here holds patient identifiers; PHI stays in the DICOM files on the spool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Task = Literal["segmentation", "classification"]


@dataclass(frozen=True)
class Instance:
    """One DICOM instance, durably written to the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    path: Path
    transfer_syntax: str
    modality: str
    received_at: float  # epoch seconds
    size: int  # bytes on disk
    calling_ae: str = ""
    series_description: str = ""  # for routing only; never published
    body_part: str = ""  # BodyPartExamined, for routing
    instance_number: int = 0


@dataclass(frozen=True)
class SpooledSeries:
    """What the spool holds of one series (``Spool.series_summary()``): the assembler re-derives
    its series table from these after a crash. No patient identifiers."""

    series_uid: str
    study_uid: str
    modality: str
    description: str  # SeriesDescription, for routing
    body_part: str  # BodyPartExamined, for routing
    instances: int
    last_received_at: float  # epoch seconds


@dataclass(frozen=True)
class Series:
    """A complete (quiescent) series: the unit the pipeline infers on."""

    study_uid: str
    series_uid: str
    modality: str
    instances: tuple[Instance, ...]
    revision: int = 1  # bumped when a late instance re-opens the series
    description: str = ""  # SeriesDescription (not PHI) for routing
    body_part: str = ""  # BodyPartExamined for routing


@dataclass(frozen=True, eq=False)
class Volume:
    """Pixel data of a series in patient space.

    ``array`` is (z, y, x) float32 in modality units (HU for CT after rescale), z along the slice
    normal in increasing position. ``spacing`` is (z, y, x) in mm, ``origin`` the patient-space
    position (x, y, z, mm) of voxel (0, 0, 0), ``direction`` a 3x3 matrix whose columns are the
    patient-space unit vectors of the array's x, y and z axes (ITK convention).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    modality: str
    study_uid: str = ""
    series_uid: str = ""
    #: non-PHI acquisition metadata (manufacturer, slice_thickness, kvp, ...), for drift and routing
    meta: Mapping[str, object] = field(default_factory=dict)

    @property
    def voxel_volume_ml(self) -> float:
        z, y, x = self.spacing
        return z * y * x / 1000.0


@dataclass(frozen=True)
class LabelStats:
    voxels: int
    volume_ml: float
    bbox: tuple[int, ...]  # (z0, y0, x0, z1, y1, x1) voxel indices on the source grid, end exclusive


@dataclass(frozen=True)
class SegmentationOutput:
    labels: Mapping[str, LabelStats]


@dataclass(frozen=True)
class ClassificationOutput:
    label: str
    confidence: float
    probabilities: Mapping[str, float]


Outputs = SegmentationOutput | ClassificationOutput


@dataclass(frozen=True)
class ModelRef:
    """Which model produced a prediction, and how it ran."""

    name: str
    version: str
    variant: str = "fp32"
    backend: str = "onnxruntime"
    precision: str = "fp32"


@dataclass(frozen=True)
class Prediction:
    """What inference returns for one series and one model."""

    model: ModelRef
    task: Task
    outputs: Outputs
    timings_ms: Mapping[str, float]


@dataclass(frozen=True)
class Result:
    """A prediction addressed for publishing (see docs/mqtt.md)."""

    result_id: str
    revision: int
    device_id: str
    study_uid: str
    series_uid: str
    prediction: Prediction
    created_at: str  # ISO 8601 UTC


@dataclass(frozen=True)
class Event:
    """Something operators should know about, published on ``{prefix}/{device_id}/events``.

    ``kind`` is a dotted name (``dicom.rejected``, ``instance.quarantined``, ``job.failed``, ...);
    ``fields`` holds UIDs, counts and reasons only, never patient identifiers.
    """

    kind: str
    severity: Literal["info", "warning", "error"]
    message: str
    fields: Mapping[str, object] = field(default_factory=dict)
    created_at: float = 0.0  # epoch seconds; 0: stamped when published
