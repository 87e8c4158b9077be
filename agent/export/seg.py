"""A segmentation result -> a DICOM Segmentation (highdicom), BINARY, on the source images' grid.

One segment per foreground label, in label order (segment number = label value), each with its
coded property category and type (``LABEL_CODES``: SNOMED CT; a kidney carries its laterality as a
type modifier), the algorithm (model name, version, and the variant, backend and precision it ran as),
and a display colour. The frames are the label map's slices on the source images sorted as the
volume builder sorts them (``sources.read_sources``), so the geometry is exactly the source's;
highdicom writes the plane positions, the shared orientation and pixel measures and references
every source image. Empty frames are left out (``omit_empty_frames``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from agent import __version__
from agent.export.request import ExportRequest, derived_uid, object_uids
from agent.export.sources import ObjectRefusedError

#: SEG and SR series numbers (fixed: the series UIDs say which result an object belongs to)
SEG_SERIES_NUMBER = 9101
SR_SERIES_NUMBER = 9102
MANUFACTURER = "edge-agent"


@dataclass(frozen=True)
class LabelCode:
    category: Code
    type: Code
    modifier: Code | None = None  # laterality
    colour: tuple[int, int, int] = (128, 128, 128)  # sRGB, for viewers


#: label name (model.toml ``labels``) -> codes (DICOM PS3.16 CID 7150 / 7151 / 244)
LABEL_CODES: dict[str, LabelCode] = {
    "liver": LabelCode(codes.SCT.AnatomicalStructure, codes.SCT.Liver, colour=(221, 130, 101)),
    "spleen": LabelCode(codes.SCT.AnatomicalStructure, codes.SCT.Spleen, colour=(157, 108, 162)),
    "kidney_left": LabelCode(codes.SCT.AnatomicalStructure, codes.SCT.Kidney, codes.SCT.Left, (185, 102, 83)),
    "kidney_right": LabelCode(codes.SCT.AnatomicalStructure, codes.SCT.Kidney, codes.SCT.Right, (185, 102, 83)),
}


def series_description(req: ExportRequest, what: str) -> str:
    """At most 64 characters: the model, what the object is, and the restriction when there is one."""
    text = f"{req.model} {req.version} {what}"
    if req.not_for_diagnostic_use:
        text += " - NOT FOR DIAGNOSTIC USE"
    return text[:64]


def qualification(req: ExportRequest) -> hd.ContentQualificationValues:
    """RESEARCH for a model that is not for diagnostic use, else PRODUCT."""
    return hd.ContentQualificationValues.RESEARCH if req.not_for_diagnostic_use else hd.ContentQualificationValues.PRODUCT


def algorithm(req: ExportRequest) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=req.model[:64], family=codes.cid7162.ArtificialIntelligence, version=req.version[:64],
        source=f"edge-agent {__version__}"[:64],
        parameters={"variant": req.variant, "backend": req.backend, "precision": req.precision})


def segment_descriptions(req: ExportRequest) -> list[hd.seg.SegmentDescription]:
    """One description per foreground label; a label without a code refuses the object."""
    algo = algorithm(req)
    out = []
    for number, label in enumerate(req.labels[1:], start=1):
        code = LABEL_CODES.get(label)
        if code is None:
            raise ObjectRefusedError(f"label {label!r} has no coded property type (agent/export/seg.py LABEL_CODES)")
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label[:64], segmented_property_category=code.category,
            segmented_property_type=code.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, tracking_uid=derived_uid(req.result_id, "segment", label),
            tracking_id=label[:64], display_color=hd.color.CIELabColor.from_rgb(*code.colour))
        if code.modifier is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(code.modifier.value, code.modifier.scheme_designator, code.modifier.meaning)]
        out.append(desc)
    return out


def build_seg(req: ExportRequest, sources: Sequence[Dataset], label_map: npt.NDArray[np.uint8]) -> Dataset:
    """The Segmentation of ``req``'s ``label_map`` (uint8 (z, y, x), value = label index) on
    ``sources`` (sorted by ``read_sources``). Raises ObjectRefusedError when they do not match."""
    if req.task != "segmentation":
        raise ObjectRefusedError(f"a {req.task} result has no segmentation")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if label_map.shape != (len(sources), rows, cols):
        raise ObjectRefusedError(f"label map {label_map.shape} does not match {len(sources)} source images of "
                                 f"{rows}x{cols}")
    if label_map.size and int(label_map.max()) >= len(req.labels):
        raise ObjectRefusedError(f"label map holds value {int(label_map.max())}; the model has {len(req.labels)} labels")
    uids = object_uids(req.result_id, "seg")
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources), pixel_array=np.ascontiguousarray(label_map, dtype=np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segment_descriptions(req),
            series_instance_uid=uids.series_uid, series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=uids.sop_instance_uid, instance_number=req.revision, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=__version__, device_serial_number=req.device_id[:64],
            content_label=f"REV{req.revision}"[:16], content_description=f"{req.model} {req.version} revision {req.revision}"[:64],
            series_description=series_description(req, "segmentation"),
            content_qualification=qualification(req),
        )
    except ObjectRefusedError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ObjectRefusedError(f"highdicom refused the segmentation: {type(exc).__name__}: {exc}"[:300]) from exc
    return seg
