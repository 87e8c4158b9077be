"""Export objects (agent/export): DICOM SEG and TID 1500 SR built with highdicom from real results.

The segmentation comes from the real ct-abdomen-seg model on a synthetic CT series (the same
pipeline the worker runs, label map included), the classification from mr-brain-cls's labels on a
synthetic MR slice. Each object is read back with highdicom, its SEG voxel counts compared with the
result's label statistics, and validated with ``dciodvfy`` (Debian's dicom3tools): no "Error"
line. The queue, the loop and the acceptance against Orthanc are in tests/test_export_pacs.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import IN_CI, REPO

from agent.core.labelmap import read_label_map, save_label_map
from agent.core.modelspec import load_spec
from agent.core.types import ModelRef
from agent.export import ExportRequest, ObjectRefusedError, build_objects, object_uids, write_object
from agent.export.request import LabelFigures, derived_uid, figures_of, not_for_diagnostic_use
from agent.export.sources import read_sources
from agent.imaging.volume import load_series
from agent.inference import catalog, pipeline
from deploy.synth import make_ct_phantom, make_mr_slice, write_ct_series, write_mr_series

CT_LABELS = ("background", "liver", "spleen", "kidney_left", "kidney_right")


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for ``path`` (fails in CI, skips elsewhere when missing)."""
    import shutil

    binary = shutil.which("dciodvfy")
    if binary is None:
        msg = "dciodvfy not installed (apt-get install dicom3tools)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    out = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


def seg_voxels(seg: pydicom.Dataset) -> dict[int, int]:
    """Foreground pixels per segment number of a BINARY SEG, frame by frame."""
    px = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    out: dict[int, int] = {}
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        n = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[n] = out.get(n, 0) + int(px[i].sum())
    return out


@pytest.fixture(scope="module")
def ct_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportRequest, dict[str, int]]:
    """The real model's result on a synthetic CT: the request and the published voxel counts."""
    tmp = tmp_path_factory.mktemp("ct")
    folder = write_ct_series(make_ct_phantom(777_001, size=256, slice_thickness=3.0), tmp / "ct")
    paths = sorted(folder.glob("*.dcm"))
    spec = load_spec(REPO / "models" / "ct-abdomen-seg")
    backend = catalog.create("onnxruntime")
    backend.load(REPO / "models" / "ct-abdomen-seg" / "model.onnx", precision="fp32", threads=2, options={})
    run = pipeline.run_model_detailed(paths, spec, backend, ModelRef(spec.name, spec.version))
    assert run.label_map is not None
    save_label_map(tmp / "lm.npz", run.label_map)
    figures, _, _ = figures_of(run.prediction.outputs)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    req = ExportRequest(
        result_id="0b0c5c38-6a55-5a34-9d0b-4f3d1c2e7a10", revision=1, device_id="test-device", model=spec.name,
        version=spec.version, variant="fp32", backend="onnxruntime", precision="fp32", task="segmentation",
        labels=spec.labels, study_uid=str(first.StudyInstanceUID), series_uid=str(first.SeriesInstanceUID),
        sources=tuple(str(p) for p in paths[::-1]),  # file order must not matter
        created_at="2024-05-01T12:00:00.000Z", not_for_diagnostic_use=not_for_diagnostic_use(spec.description),
        label_map=str(tmp / "lm.npz"), figures=figures)
    return req, {k: v.voxels for k, v in figures.items()}


@pytest.fixture(scope="module")
def mr_request(tmp_path_factory: pytest.TempPathFactory) -> ExportRequest:
    tmp = tmp_path_factory.mktemp("mr")
    folder = write_mr_series(make_mr_slice(777_100, cls="glioma"), tmp / "mr")
    paths = sorted(folder.glob("*.dcm"))
    spec = load_spec(REPO / "models" / "mr-brain-cls")
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return ExportRequest(
        result_id="5d2f8e6e-0c8f-5b55-a3c9-7b1e2f3a4c5d", revision=1, device_id="test-device", model=spec.name,
        version=spec.version, variant="fp32", backend="onnxruntime", precision="fp32", task="classification",
        labels=spec.labels, study_uid=str(first.StudyInstanceUID), series_uid=str(first.SeriesInstanceUID),
        sources=tuple(str(p) for p in paths), created_at="2024-05-01T12:00:00.000Z",
        not_for_diagnostic_use=not_for_diagnostic_use(spec.description), predicted="glioma", probability=0.875)


def test_seg_and_sr_of_a_ct_result_read_back_and_validate(ct_result, tmp_path: Path) -> None:
    req, voxels = ct_result
    objs = build_objects(req, ["seg", "sr"])
    seg_path = write_object(objs["seg"], tmp_path / "seg.dcm")
    sr_path = write_object(objs["sr"], tmp_path / "sr.dcm")

    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(CT_LABELS[1:])
    # SEG voxel counts equal the label statistics the result message publishes
    assert seg_voxels(seg) == {i: voxels[label] for i, label in enumerate(CT_LABELS[1:], start=1)}
    assert all(v > 1000 for v in voxels.values())  # the model found every organ: the test has teeth
    codes = {s.SegmentLabel: (s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                              s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence}
    assert codes == {"liver": ("91723000", "10200004"), "spleen": ("91723000", "78961009"),
                     "kidney_left": ("91723000", "64033007"), "kidney_right": ("91723000", "64033007")}
    left = seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (left.CodeValue, left.CodingSchemeDesignator) == ("7771000", "SCT")
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("ct-abdomen-seg", "1.0.0")
    assert "precision=fp32" in algo.AlgorithmParameters and "variant=fp32" in algo.AlgorithmParameters
    # joins the source study; references the source series; deterministic UIDs
    source = pydicom.dcmread(req.sources[0], stop_before_pixels=True)
    for ds in (seg, pydicom.dcmread(sr_path)):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == req.series_uid
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == tuple(vars(object_uids(req.result_id, "seg")).values())
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID

    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    volumes = {g.tracking_identifier: g.get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)[0].value
               for g in groups}
    assert volumes == pytest.approx({k: round(v.volume_ml, 3) for k, v in req.figures.items()})
    for g, number in zip(groups, range(1, 5), strict=True):
        ref = g.referenced_segment
        assert ref is not None and ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [number] if hasattr(ref, "referenced_segment_numbers") else True
    observer = sr.content.get_observer_contexts(observer_type=pydicom.sr.codedict.codes.DCM.Device)
    assert observer, "the device is the observer"

    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []


def test_objects_are_the_same_on_every_build(ct_result) -> None:
    """Deterministic UIDs: a retry or a restart rebuilds the very same instances."""
    req, _ = ct_result
    a, b = build_objects(req, ["seg", "sr"]), build_objects(req, ["seg", "sr"])
    for kind in ("seg", "sr"):
        assert a[kind].SOPInstanceUID == b[kind].SOPInstanceUID
        assert a[kind].SeriesInstanceUID == b[kind].SeriesInstanceUID
    assert a["seg"].PixelData == b["seg"].PixelData
    # a new revision of the same result keeps the UIDs (it replaces) and says which revision it is
    from dataclasses import replace

    c = build_objects(replace(req, revision=2), ["seg"])["seg"]
    assert c.SOPInstanceUID == a["seg"].SOPInstanceUID and c.InstanceNumber == 2
    assert object_uids("other", "seg") != object_uids(req.result_id, "seg")
    assert derived_uid("x").startswith("2.25.") and len(derived_uid("x")) <= 64


def test_classification_report_has_the_class_and_probability(mr_request, tmp_path: Path) -> None:
    objs = build_objects(mr_request, ["sr"])
    assert set(objs) == {"sr"}
    path = write_object(objs["sr"], tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    evaluation = groups[0].get_qualitative_evaluations()[0]
    assert evaluation.name.meaning == "Predicted class"
    assert evaluation.value.meaning == "glioma" and evaluation.value.value == "glioma"
    probability = groups[0].get_measurements()[0]
    assert probability.name.value == "122157" and probability.value == pytest.approx(0.875)
    assert sr.StudyInstanceUID == pydicom.dcmread(mr_request.sources[0]).StudyInstanceUID
    assert dciodvfy_errors(path) == []
    with pytest.raises(ObjectRefusedError, match="no segmentation"):
        build_objects(mr_request, ["seg"])


def _strip(paths: tuple[str, ...], out: Path, *keywords: str) -> tuple[str, ...]:
    out.mkdir(parents=True, exist_ok=True)
    new = []
    for p in paths:
        ds = pydicom.dcmread(p)
        for k in keywords:
            if k in ds:
                delattr(ds, k)
        ds.save_as(out / Path(p).name, enforce_file_format=True)
        new.append(str(out / Path(p).name))
    return tuple(new)


def test_missing_patient_and_study_attributes_still_make_valid_objects(ct_result, tmp_path: Path) -> None:
    from dataclasses import replace

    req, voxels = ct_result
    odd = replace(req, sources=_strip(req.sources, tmp_path / "src", "PatientName", "PatientID", "PatientBirthDate",
                                      "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
                                      "ReferringPhysicianName", "StudyID"))
    objs = build_objects(odd, ["seg", "sr"])
    for kind, ds in objs.items():
        path = write_object(ds, tmp_path / f"{kind}.dcm")
        assert dciodvfy_errors(path) == [], kind
        assert ds.PatientName == "" and ds.StudyInstanceUID == pydicom.dcmread(req.sources[0]).StudyInstanceUID
    assert seg_voxels(objs["seg"]) == {i: voxels[k] for i, k in enumerate(CT_LABELS[1:], start=1)}


def _sagittal_series(out: Path, n: int = 6) -> tuple[str, ...]:
    """A small sagittal CT series (columns along +y, rows along -z), written in shuffled order."""
    out.mkdir(parents=True)
    study, series, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for i in [3, 0, 5, 1, 4, 2][:n]:
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "ODD^SAGITTAL", "ODD1"
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-10.0 + 2.0 * i, -50.0, 80.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 16, 12, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((16, 12), np.int16).tobytes()
        ds.InstanceNumber = i + 1
        ds.save_as(out / f"s{i}.dcm", enforce_file_format=True)
        paths.append(str(out / f"s{i}.dcm"))
    return tuple(paths)


def test_unusual_orientation_puts_each_frame_on_its_source_slice(ct_result, tmp_path: Path) -> None:
    """Sagittal slices sent out of order: frame i of the label map lies on the i-th slice along the
    normal, as the volume builder sorts them."""
    from dataclasses import replace

    req, _ = ct_result
    paths = _sagittal_series(tmp_path / "sag")
    lm = np.zeros((6, 16, 12), np.uint8)
    for z in range(6):
        lm[z, z : z + 3, 2:5] = 1 + (z % 4)  # a different label and rows per slice
    save_label_map(tmp_path / "lm.npz", lm)
    assert (read_label_map(tmp_path / "lm.npz") == lm).all()
    ordered = read_sources(paths)
    # normal = row x column = -x: along it the slices go from x = 0 to x = -10, as the volume builder has them
    assert [float(ds.ImagePositionPatient[0]) for ds in ordered] == [0.0, -2.0, -4.0, -6.0, -8.0, -10.0]
    volume = load_series([Path(p) for p in paths])
    assert volume.origin == pytest.approx([float(v) for v in ordered[0].ImagePositionPatient])
    counts = {label: LabelFigures(int((lm == i).sum()), 0.0) for i, label in enumerate(CT_LABELS) if i}
    sag = replace(req, sources=paths, label_map=str(tmp_path / "lm.npz"), figures=counts,
                  series_uid=str(ordered[0].SeriesInstanceUID), study_uid=str(ordered[0].StudyInstanceUID))
    seg = build_objects(sag, ["seg"])["seg"]
    path = write_object(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    back = hd.seg.segread(path)
    for z, ds in enumerate(ordered):
        label = 1 + (z % 4)
        frames = back.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID],
                                                    segment_numbers=[label])
        assert (frames[0, :, :, 0] == (lm[z] == label)).all()


@pytest.mark.parametrize("strip, reason", [
    (("ImagePositionPatient",), "lacks ImagePositionPatient"),
    (("FrameOfReferenceUID",), "lacks FrameOfReferenceUID"),
    (("SeriesInstanceUID",), "lacks SeriesInstanceUID"),
])
def test_sources_without_what_a_segmentation_needs_are_refused(ct_result, tmp_path: Path, strip, reason) -> None:
    from dataclasses import replace

    req, _ = ct_result
    odd = replace(req, sources=_strip(req.sources[:3], tmp_path / "src", *strip) + req.sources[3:])
    with pytest.raises(ObjectRefusedError, match=reason):
        build_objects(odd, ["seg", "sr"])


def test_other_refusals_name_their_reason(ct_result, tmp_path: Path) -> None:
    from dataclasses import replace

    req, _ = ct_result
    with pytest.raises(ObjectRefusedError, match="does not match"):
        build_objects(replace(req, sources=req.sources[:-1]), ["seg"])
    with pytest.raises(ObjectRefusedError, match="no coded property type"):
        build_objects(replace(req, labels=("background", "liver", "spleen", "kidney_left", "pancreas")), ["seg"])
    with pytest.raises(ObjectRefusedError, match="gone"):
        build_objects(replace(req, label_map=str(tmp_path / "none.npz")), ["seg"])
    with pytest.raises(ObjectRefusedError, match="no longer in the spool"):
        build_objects(replace(req, sources=(str(tmp_path / "gone.dcm"),)), ["sr"])


def test_dciodvfy_reports_a_broken_object(ct_result, tmp_path: Path) -> None:
    """The validator check can fail: a SEG without its SOP Instance UID is an error for dciodvfy."""
    req, _ = ct_result
    seg = build_objects(req, ["seg"])["seg"]
    del seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence
    path = tmp_path / "broken.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path)


# ---- the queue and the loop, on a real state database ----------------------------------------


def _queue_request(req: ExportRequest, revision: int = 1) -> ExportRequest:
    from dataclasses import replace

    return replace(req, revision=revision)


def test_export_rows_commit_or_roll_back_with_the_result(ct_result, tmp_path: Path) -> None:
    from agent.core import db
    from agent.export.queue import ExportQueue
    from agent.mqtt.outbox import Outbox

    req, _ = ct_result
    conn = db.connect(tmp_path / "state.db")
    queue, outbox = ExportQueue(conn), Outbox(conn)
    with pytest.raises(RuntimeError):
        with db.transaction(conn):
            outbox.put("edge/d/results", b"{}", qos=1, kind="result", dedup_key="k", in_transaction=True)
            queue.enqueue(req, [("pacs", "seg"), ("pacs", "sr")], in_transaction=True)
            raise RuntimeError("crash before the commit")
    other = db.connect(tmp_path / "state.db")  # another connection sees neither
    assert other.execute("SELECT COUNT(*) FROM export_items").fetchone()[0] == 0
    assert outbox.count() == 0
    with db.transaction(conn):
        outbox.put("edge/d/results", b"{}", qos=1, kind="result", dedup_key="k", in_transaction=True)
        queue.enqueue(req, [("pacs", "seg"), ("pacs", "sr")], in_transaction=True)
    assert other.execute("SELECT COUNT(*) FROM export_items WHERE state = 'queued'").fetchone()[0] == 2
    assert ExportQueue(other).request(f"{req.result_id}:1") == req


def test_a_newer_revision_supersedes_the_queued_one_and_backoff_grows(ct_result, tmp_path: Path) -> None:
    from agent.core import db
    from agent.export.queue import DEAD, QUEUED, ExportQueue, backoff_s

    req, _ = ct_result
    now = [1000.0]
    queue = ExportQueue(db.connect(tmp_path / "state.db"), clock=lambda: now[0])
    queue.enqueue(_queue_request(req, 1), [("pacs", "seg")])
    queue.enqueue(_queue_request(req, 2), [("pacs", "seg")])
    item = queue.next_due()
    assert item is not None and item.revision == 2
    assert queue.items_of(f"{req.result_id}:1") == []  # superseded: never sent over the newer one
    assert queue.failed(item, "status 0xA700", max_attempts=3, initial_s=10, max_s=100) == QUEUED
    assert queue.next_due() is None and 5.0 <= queue.seconds_to_next() <= 10.0  # type: ignore[operator]
    now[0] += 10
    item = queue.next_due()
    assert item is not None and item.attempts == 1
    assert queue.failed(item, "status 0xA700", max_attempts=2, initial_s=10, max_s=100) == DEAD
    assert queue.next_due() is None and queue.seconds_to_next() is None
    sample = queue.samples(["pacs"])[0]
    assert (sample.queued, sample.dead_lettered) == (0, 1)
    assert [backoff_s(n, 10, 100, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 80, 100]
    assert backoff_s(1, 10, 100, rand=lambda: 0.0) == 5


def test_the_loop_publishes_a_refusal_and_counts_only_stored_statuses(ct_result, tmp_path: Path) -> None:
    from dataclasses import replace

    from agent.core import db
    from agent.core.config import Config
    from agent.export.queue import ExportQueue
    from agent.service.export_loop import ExportLoop

    req, _ = ct_result
    cfg = Config.model_validate({"storage": {"dir": str(tmp_path / "state")}, "export": [
        {"name": "pacs", "host": "127.0.0.1", "port": 104, "called_ae": "PACS", "max_attempts": 2}]})
    queue = ExportQueue(db.connect(tmp_path / "state.db"))
    events: list = []
    answers = iter([0xA700, 0xB007, 0x0000])
    sent: list[str] = []

    def send(dest, calling_ae, path) -> int:  # noqa: ANN001 - the C-STORE peer (tests/test_export_pacs.py has real ones)
        sent.append(pydicom.dcmread(path, stop_before_pixels=True).Modality)
        return next(answers)

    loop = ExportLoop(cfg, queue, events.append, send=send)
    queue.enqueue(req, [("pacs", "seg"), ("pacs", "sr")])
    loop.step()  # seg: 0xA700 -> stays queued
    assert [e.kind for e in events] == [] and queue.samples(["pacs"])[0].queued == 2
    loop.step()  # sr: 0xB007 (a storage warning) -> delivered
    assert [e.kind for e in events] == ["export.delivered"] and events[0].fields["status"] == 0xB007
    assert sent == ["SEG", "SR"]
    queue.enqueue(replace(req, result_id="gone", sources=(str(tmp_path / "gone.dcm"),)), [("pacs", "sr")])
    loop.step()
    refused = [e for e in events if e.kind == "export.refused"]
    assert len(refused) == 1 and "no longer in the spool" in refused[0].fields["reason"]
    assert queue.samples(["pacs"])[0].refused == 1
