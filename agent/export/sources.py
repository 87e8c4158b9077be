"""The source images of a result, as the objects that describe them need them.

``read_sources(paths)`` reads the headers of the files the job read (no pixel data), drops a
repeated SOP Instance, and sorts the slices exactly as the volume builder does
(``agent/imaging/volume.py``: by ``ImagePositionPatient . n``, n = row x column direction of
``ImageOrientationPatient``), so frame ``i`` of the label map lies on ``sources[i]`` whatever the
orientation (axial, sagittal, oblique, feet first, prone).

Odd sources never fail silently: a missing Type 2 attribute of the patient and study modules
(``PatientName``, ``PatientID``, ``StudyDate``, ...) is added empty to our in-memory copy (the
standard allows empty values there, so the object is still valid); anything the objects cannot
be made without (the geometry, a UID, a readable file, a single-frame image) raises
``ObjectRefusedError`` with the reason, which the export loop publishes (``export.refused``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from agent.core.errors import EdgeAgentError

#: Type 2 attributes of the Patient and General Study modules: present, possibly empty
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: without these no object can reference the source
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: and without these a segmentation cannot lie on the source grid
_GEOMETRY = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "FrameOfReferenceUID",
             "Rows", "Columns")


class ObjectRefusedError(EdgeAgentError):
    """An export object that cannot be built from its result and sources; the message says why
    (UIDs and attribute names only, never a patient attribute's value)."""


def read_sources(paths: Sequence[str | Path], *, geometry: bool = True) -> list[Dataset]:
    """The source headers, de-duplicated and sorted along the slice normal (see the module
    docstring). ``geometry``: the images must carry their plane geometry (a segmentation);
    without it, one slice or several in file order (a classification's report)."""
    if not paths:
        raise ObjectRefusedError("no source images")
    seen: dict[str, Dataset] = {}
    for i, p in enumerate(paths):
        try:
            ds: Dataset = pydicom.dcmread(p, stop_before_pixels=True)
        except FileNotFoundError as exc:
            raise ObjectRefusedError(f"source image {i} is no longer in the spool") from exc
        except (InvalidDicomError, OSError, ValueError, TypeError) as exc:
            raise ObjectRefusedError(f"source image {i} is unreadable: {type(exc).__name__}") from exc
        missing = [k for k in _REQUIRED if not str(ds.get(k, "") or "")]
        if missing:
            raise ObjectRefusedError(f"source image {i} lacks {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ObjectRefusedError(f"source {ds.SOPInstanceUID} is a multi-frame image: not exported yet")
        seen.setdefault(str(ds.SOPInstanceUID), ds)
    datasets = list(seen.values())
    for item in datasets:
        for keyword in _TYPE2:
            if keyword not in item:
                setattr(item, keyword, "")
    series = {str(item.SeriesInstanceUID) for item in datasets}
    if len(series) != 1:
        raise ObjectRefusedError(f"source images of {len(series)} series mixed")
    if not geometry:
        return datasets
    for item in datasets:
        missing = [k for k in _GEOMETRY if item.get(k) in (None, "")]
        if missing:
            raise ObjectRefusedError(f"source {item.SOPInstanceUID} lacks {', '.join(missing)}: no geometry to "
                                     "place a segmentation on")
    return _sorted_along_normal(datasets)


def _sorted_along_normal(datasets: list[Dataset]) -> list[Dataset]:
    try:
        iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient], dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        depth = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in datasets]
    except (ValueError, TypeError, IndexError) as exc:
        raise ObjectRefusedError(f"unusable ImageOrientationPatient/ImagePositionPatient: {exc}") from exc
    if iop.size != 6 or not np.isfinite(normal).all() or float(np.linalg.norm(normal)) < 0.5:
        raise ObjectRefusedError("ImageOrientationPatient is not two unit direction cosines")
    order = np.argsort(np.asarray(depth), kind="stable")
    return [datasets[int(i)] for i in order]
