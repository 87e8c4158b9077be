"""A result -> a TID 1500 Measurement Report (highdicom ``Comprehensive3DSR`` + ``MeasurementReport``).

The device is the observer (TID 1004: its UID derived from ``device_id``, its name the device id,
the agent as manufacturer and model); each group names the model (TID 4019 algorithm
identification: name, version, and variant/backend/precision as parameters).

* Segmentation: one TID 1411 volumetric group per foreground label, referencing the SEG's segment
  (same number as the label) and the source series, with its volume in mL (SCT 118565006, the
  result's ``volume_ml``, on the source grid; the voxels are the SEG's).
* Classification: one TID 1501 group referencing the source images, with the predicted class as a
  qualitative evaluation ("Predicted class" = the class, both coded in the local scheme
  ``99EDGEAI``: the class's code value = the label name) and its probability (DCM 122157, unit UCUM ``1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from agent import __version__
from agent.export.request import ExportRequest, derived_uid, device_uid, object_uids
from agent.export.seg import MANUFACTURER, SR_SERIES_NUMBER, qualification, series_description
from agent.export.sources import ObjectRefusedError

#: the local coding scheme of class labels (PS3.16 8.2: private schemes start with "99")
CLASS_SCHEME = "99EDGEAI"
_ML = Code("mL", "UCUM", "milliliter")
_ONE = Code("1", "UCUM", "no units")
_PREDICTED_CLASS = Code("predicted-class", CLASS_SCHEME, "Predicted class")
_IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=CLASS_SCHEME, name="edge-agent model labels", responsible_organization="edge-agent")


def _algorithm(req: ExportRequest) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=req.model[:64], version=req.version[:64],
        parameters=[f"variant={req.variant}", f"backend={req.backend}", f"precision={req.precision}"])


def _observer(req: ExportRequest) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(req.device_id), name=req.device_id[:64], manufacturer_name=MANUFACTURER,
        model_name=f"edge-agent {__version__}"[:64])
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _tracking(req: ExportRequest, what: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derived_uid(req.result_id, "tracking", what), identifier=what[:64])


def _segment_groups(req: ExportRequest, seg: Dataset
                    ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    algo = _algorithm(req)
    source = hd.sr.SourceSeriesForSegmentation(req.series_uid)
    groups = []
    for number, label in enumerate(req.labels[1:], start=1):
        fig = req.figures.get(label)
        if fig is None:
            raise ObjectRefusedError(f"the result has no figures for label {label!r}")
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(req, label),
            referenced_segment=hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                                       segment_number=number, source_series=source),
            algorithm_id=algo,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=round(fig.volume_ml, 3), unit=_ML, algorithm_id=algo),
            ]))
    return groups


def _class_group(req: ExportRequest, sources: Sequence[Dataset]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    if not req.predicted or req.predicted not in req.labels:
        raise ObjectRefusedError(f"the result's class {req.predicted!r} is not one of the model's labels")
    if not 0.0 <= req.probability <= 1.0:
        raise ObjectRefusedError(f"probability {req.probability} outside [0, 1]")
    algo = _algorithm(req)
    finding = Code(req.predicted[:16], CLASS_SCHEME, req.predicted[:64])
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(req, "classification"),
        algorithm_id=algo,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_PREDICTED_CLASS, value=finding)],
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=round(req.probability, 6), unit=_ONE,
                                        algorithm_id=algo)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources])


def build_sr(req: ExportRequest, sources: Sequence[Dataset], seg: Dataset | None) -> Dataset:
    """The report of ``req``: segmentation results reference ``seg`` (required for them), a
    classification the ``sources``. Raises ObjectRefusedError when it cannot be built."""
    uids = object_uids(req.result_id, "sr")
    try:
        if req.task == "segmentation":
            if seg is None:
                raise ObjectRefusedError("a segmentation's report needs its SEG")
            groups: list[object] = list(_segment_groups(req, seg))
            evidence = [*sources, seg]
        else:
            groups = [_class_group(req, sources)]
            evidence = list(sources)
        report = hd.sr.MeasurementReport(observation_context=_observer(req), procedure_reported=_IMAGING_PROCEDURE,
                                         imaging_measurements=groups)  # type: ignore[arg-type]
        return hd.sr.Comprehensive3DSR(
            evidence=evidence, content=report, series_instance_uid=uids.series_uid, series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids.sop_instance_uid, instance_number=req.revision, manufacturer=MANUFACTURER,
            is_complete=True, series_description=series_description(req, "report"),
            manufacturer_model_name=MANUFACTURER, software_versions=__version__,
            device_serial_number=req.device_id[:64], content_qualification=qualification(req),
            coding_schemes=None if req.task == "segmentation" else [_SCHEME])
    except ObjectRefusedError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ObjectRefusedError(f"highdicom refused the report: {type(exc).__name__}: {exc}"[:300]) from exc
