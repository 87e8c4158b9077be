"""Result / event / status / drift payloads: schema, privacy, deterministic ids (telemetry's message
is tested with its snapshot in test_telemetry.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from agent.core.drift import DriftReport, DriftSignal
from agent.core.errors import PublishError
from agent.core.events import (
    CATALOG,
    DicomRejected,
    EngineActivated,
    EngineDeviceGate,
    EngineFallback,
    EngineSelftest,
    JobFailed,
    ModelUpdated,
    TypedEvent,
    UpdateOutcome,
)
from agent.core.status import SelfTestReport
from agent.core.topics import Topics
from agent.core.types import (
    ClassificationOutput,
    Event,
    LabelStats,
    ModelRef,
    Prediction,
    Result,
    SegmentationOutput,
)
from agent.mqtt.payloads import (
    DRIFT_SCHEMA,
    RESULT_SCHEMA,
    drift_payload,
    event_payload,
    parse_drift,
    parse_event,
    parse_result,
    parse_status,
    restamp_status,
    result_id,
    result_payload,
    status_payload,
)

SERIES = "1.2.826.0.1.3680043.8.498.11111111111111111111"
STUDY = "1.2.826.0.1.3680043.8.498.22222222222222222222"
# Distinctive synthetic identifiers: they must never appear in a payload unless enabled.
PATIENT = {"name": "Zyxwvut^Qorblemania", "id": "PID-987654321-XQ", "birth_date": "19310417"}


def seg_result(version: str = "1.0.0", revision: int = 1) -> Result:
    model = ModelRef("ct-abdomen-seg", version, variant="int8", backend="onnxruntime", precision="int8")
    outputs = SegmentationOutput(labels={
        "liver": LabelStats(voxels=190425, volume_ml=1523.4049, bbox=(10, 40, 50, 80, 200, 210)),
        "spleen": LabelStats(voxels=25212, volume_ml=201.7, bbox=(20, 60, 250, 60, 140, 310)),
    })
    pred = Prediction(model, "segmentation", outputs, {"preprocess": 120.25, "infer": 800.0})
    return Result(result_id(SERIES, model.name, version), revision, "edge-01", STUDY, SERIES, pred,
                  "2024-05-01T12:00:00.000Z")


def cls_result() -> Result:
    model = ModelRef("mr-brain-cls", "2.1.0")
    probs = {"no_tumour": 0.02, "glioma": 0.912, "meningioma": 0.05, "pituitary": 0.018}
    pred = Prediction(model, "classification", ClassificationOutput("glioma", 0.912, probs), {"infer": 18.6})
    return Result(result_id(SERIES, model.name, "2.1.0"), 2, "edge-01", STUDY, SERIES, pred,
                  "2024-05-01T12:00:01.000Z")


def test_segmentation_payload_validates_and_has_contract_fields() -> None:
    data = result_payload(seg_result())
    doc = parse_result(data)
    assert data == data.strip() and b"\n" not in data and b": " not in data  # compact JSON
    assert set(doc) == {"schema", "result_id", "revision", "device_id", "study_uid", "series_uid", "model",
                        "task", "outputs", "timings_ms", "created_at"}
    assert doc["schema"] == RESULT_SCHEMA
    assert doc["model"] == {"name": "ct-abdomen-seg", "version": "1.0.0", "variant": "int8",
                            "backend": "onnxruntime", "precision": "int8"}
    assert doc["outputs"]["labels"]["liver"] == {"voxels": 190425, "volume_ml": 1523.405,
                                                 "bbox": [10, 40, 50, 80, 200, 210]}
    assert doc["timings_ms"] == {"preprocess": 120.25, "infer": 800.0}


def test_classification_payload_validates() -> None:
    doc = parse_result(result_payload(cls_result()))
    assert doc["task"] == "classification" and doc["revision"] == 2
    assert doc["outputs"]["label"] == "glioma"
    assert doc["outputs"]["confidence"] == pytest.approx(0.912)
    assert set(doc["outputs"]["probabilities"]) == {"no_tumour", "glioma", "meningioma", "pituitary"}


def test_patient_identifiers_absent_by_default() -> None:
    for data in (result_payload(seg_result(), patient=PATIENT),
                 result_payload(seg_result(), patient=PATIENT, include_patient_identifiers=False)):
        assert b"patient" not in data
        for value in PATIENT.values():
            assert value.encode() not in data


def test_patient_identifiers_present_only_when_enabled() -> None:
    data = result_payload(seg_result(), patient=PATIENT, include_patient_identifiers=True)
    doc = parse_result(data)
    assert doc["patient"] == PATIENT
    # DICOM keywords are accepted as aliases
    dicom = {"PatientName": PATIENT["name"], "PatientID": PATIENT["id"], "PatientBirthDate": PATIENT["birth_date"]}
    assert parse_result(result_payload(seg_result(), patient=dicom, include_patient_identifiers=True))[
        "patient"] == PATIENT


def test_result_id_deterministic_and_version_specific() -> None:
    a = result_id(SERIES, "ct-abdomen-seg", "1.0.0")
    assert a == result_id(SERIES, "ct-abdomen-seg", "1.0.0")
    assert a != result_id(SERIES, "ct-abdomen-seg", "1.0.1")
    assert a != result_id(SERIES + "9", "ct-abdomen-seg", "1.0.0")
    assert a != result_id(SERIES, "mr-brain-cls", "1.0.0")
    # pinned: consumers may recompute it; changing the namespace would break de-duplication
    assert a == "449799b6-b131-5492-9490-b6a6e0f79e22"


def test_parse_result_rejects_bad_messages() -> None:
    good = json.loads(result_payload(seg_result()))
    with pytest.raises(PublishError):
        parse_result(b"not json")
    for mutate in (
        lambda d: d.pop("result_id"),
        lambda d: d.update(schema="edge-agent/result/2"),
        lambda d: d.update(task="classification"),  # outputs do not match the task
        lambda d: d["outputs"]["labels"]["liver"].update(bbox=[1, 2, 3]),
        lambda d: d.update(revision=0),
    ):
        doc = json.loads(json.dumps(good))
        mutate(doc)
        with pytest.raises(PublishError):
            parse_result(json.dumps(doc))


def test_nan_is_refused() -> None:
    r = cls_result()
    bad = Prediction(r.prediction.model, "classification",
                     ClassificationOutput("glioma", float("nan"), {"glioma": 1.0}), {})
    with pytest.raises(PublishError, match="confidence"):
        result_payload(Result(r.result_id, 1, "d", STUDY, SERIES, bad, r.created_at))


def test_event_payload() -> None:
    ev = Event("job.failed", "error", "inference failed: timeout", {"series_uid": "1.2.3", "count": 2, "ratio": 0.5})
    doc = parse_event(event_payload(ev, "edge-01"))
    assert doc["schema"] == "edge-agent/event/1"
    assert doc["kind"] == "job.failed" and doc["severity"] == "error"
    assert doc["fields"] == {"series_uid": "1.2.3", "count": 2, "ratio": 0.5}
    assert doc["device_id"] == "edge-01" and doc["created_at"].endswith("Z")
    assert parse_event(event_payload(Event("x", "info", "m", created_at=0.0), "d"))["created_at"] > "2020"


# ----------------------------------------------------------------------- typed event kinds

#: a value for every field type used in agent/core/events/ (a new type needs a line here)
SAMPLES: dict[str, object] = {
    "str": "s-1", "str | None": "s-2", "int": 7, "int | None": 3, "float": 1.25, "bool": False,
    "Severity": "error", "DriftState": "warn", "tuple[str, ...]": ("int8", "fp32"),
    "tuple[SelfTestReport, ...]": (SelfTestReport("m", "1.0.0", "int8", True, "", 0.01),
                                   SelfTestReport("m", "1.0.0", "fp32", False, "mismatch")),
    "tuple[DataclassInstance, ...]": (SelfTestReport("m", "1.0.0", "fp32", True),),
    "CommandResult": [UpdateOutcome("m", True, "installed", "1.1.0", "1.1.0", "1.0.0", "int8")],
    "dict[str, int]": {"association.rejected": 4, "dicom.rejected": 1},
}


def sample(cls: type[TypedEvent], **values: object) -> TypedEvent:
    args = {f.name: values.get(f.name, SAMPLES[str(f.type)]) for f in dataclasses.fields(cls)}
    return cls(**args)


@pytest.mark.parametrize("kind", sorted(CATALOG))
def test_every_event_kind_makes_a_valid_message(kind: str) -> None:
    cls = CATALOG[kind]
    ev = sample(cls)
    generic = ev.to_event(created_at=1714564805.25)
    assert (generic.kind, generic.created_at) == (kind, 1714564805.25)
    assert generic.severity in cls.severities()
    assert generic.message and "\n" not in generic.message
    doc = parse_event(event_payload(ev, "edge-01"))  # typed events are accepted as they are
    same = parse_event(event_payload(ev.to_event(), "edge-01"))
    assert {**doc, "created_at": ""} == {**same, "created_at": ""}
    assert (doc["kind"], doc["severity"], doc["message"]) == (kind, generic.severity, generic.message)
    assert list(doc["fields"]) == list(cls.field_names())  # every field, in order; details stay out
    json.dumps(doc["fields"])
    # optional fields are left out when None, and only those
    if cls.optional_field_names():
        bare = sample(cls, **dict.fromkeys(cls.optional_field_names()))
        assert list(bare.fields()) == [n for n in cls.field_names() if n not in cls.optional_field_names()]


def test_typed_events_say_what_the_emitters_said() -> None:
    """Messages, severities and fields are those the emitters built by hand before (wire unchanged)."""
    rj = DicomRejected(sop_instance_uid="1.2.3", calling_ae="CT1", reason="SOP class x not accepted",
                       status=0xC211).to_event()
    assert (rj.severity, rj.message) == ("warning", "C-STORE refused with 0xC211: SOP class x not accepted")
    assert rj.fields == {"sop_instance_uid": "1.2.3", "calling_ae": "CT1", "reason": "SOP class x not accepted",
                         "status": 0xC211}
    assert DicomRejected(sop_instance_uid="", calling_ae="", reason="disk", status=0xA700,
                         level="error").to_event().severity == "error"
    gate = EngineDeviceGate(model="m", version="1", variant="int8", passed=False, family="x86-avx2",
                            result="accuracy 0.5", seconds=2.0).to_event()
    assert (gate.severity, gate.message) == (
        "warning", "m 1: int8 refused by the device accuracy gate on x86-avx2: accuracy 0.5")
    fb = EngineFallback(model="m", version="1", variant="int8", job_id="j", kind="crash",
                        fallback_variant="fp32", error="signal 11").to_event()
    assert fb.message == "m 1: int8 failed, job re-run on fp32: signal 11"
    assert fb.fields == {"model": "m", "version": "1", "variant": "int8", "job_id": "j", "kind": "crash"}
    act = EngineActivated(model="m", version="1", variant="int8", backend="onnxruntime", precision="int8",
                          measured=True, reason="fastest", correlation_id="op-1").to_event()
    assert act.message == "m 1: int8 (fastest)" and act.fields["correlation_id"] == "op-1"
    assert "correlation_id" not in EngineActivated(model="m", version="1", variant="int8", backend="b",
                                                   precision="p", measured=False, reason="r").fields()
    st = EngineSelftest(results=SAMPLES["tuple[SelfTestReport, ...]"]).to_event()  # type: ignore[arg-type]
    assert (st.severity, st.message) == ("warning", "1 of 2 variant self-test(s) passed")
    assert st.fields["results"] == [  # type: ignore[index]
        {"model": "m", "version": "1.0.0", "variant": "int8", "passed": True, "error": "", "max_abs_err": 0.01},
        {"model": "m", "version": "1.0.0", "variant": "fp32", "passed": False, "error": "mismatch",
         "max_abs_err": None}]
    up = ModelUpdated(model="m", version="1.1.0", previous=None, variant=None, reason="", variants=("fp32",),
                      downloaded_bytes=0, correlation_id=None).to_event()
    assert up.message == "m 1.1.0 is active (?)" and up.fields["variants"] == ["fp32"]
    assert up.fields["correlation_id"] is None  # always sent by the updater, null for polls
    assert JobFailed(series_uid="1.2", model="m", kind="timeout", attempts=3,
                     error="timed out").to_event().message == "inference failed: timed out"


def test_status_payload_and_restamp() -> None:
    birth = status_payload(device_id="edge-01", version="0.1.0", started_at=1714564800.0,
                           capabilities={"backends": ["onnxruntime"], "avx512": True},
                           models=[ModelRef("ct-abdomen-seg", "1.0.0", "int8")])
    doc = parse_status(birth)
    assert doc["state"] == "online" and doc["started_at"] == "2024-05-01T12:00:00.000Z"
    assert doc["models"] == [{"name": "ct-abdomen-seg", "version": "1.0.0", "variant": "int8",
                              "backend": "onnxruntime", "accuracy": ""}]
    off = parse_status(restamp_status(birth, seq=7, state="offline", reason="shutdown"))
    assert (off["state"], off["seq"], off["reason"]) == ("offline", 7, "shutdown")
    on = parse_status(restamp_status(restamp_status(birth, seq=7, state="offline", reason="x"), seq=8,
                                     state="online"))
    assert on["seq"] == 8 and "reason" not in on


def test_topics() -> None:
    t = Topics("edge", "dev1")
    assert (t.results, t.status, t.events, t.cmd) == (
        "edge/dev1/results", "edge/dev1/status", "edge/dev1/events", "edge/dev1/cmd/#")
    assert (t.telemetry, t.drift) == ("edge/dev1/telemetry", "edge/dev1/drift")
    assert Topics("hospital/ct", "+").results == "hospital/ct/+/results"
    for prefix, dev in (("edge/#", "d"), ("", "d"), ("edge", "a/b"), ("edge", "a+")):
        with pytest.raises(ValueError):
            Topics(prefix, dev)


# ---------------------------------------------------------------------------------------- drift


def drift_report(**changes: object) -> DriftReport:
    signals = (
        DriftSignal("input.intensity", "alert", "psi", 0.41, 0.12, 0.25,
                    {"window_counts": [3, 10, 20, 17], "out_of_range": 0}),
        DriftSignal("metadata.kvp", "warn", "ks", 0.2, 0.15, 0.3),
        DriftSignal("metadata.manufacturer", "alert", "unseen", 1.0, 1.0, math.inf, {"other": 6}),
        DriftSignal("output.confidence", "ok", "ks", 0.05, 0.15, 0.3),
    )
    report = DriftReport(model="mr-brain-cls", version="1.0.0", state="alert", phase="monitoring", window_size=50,
                         series_in_window=50, min_series=20, signals=signals, since=1714564800.0)
    return dataclasses.replace(report, **changes)  # type: ignore[arg-type]


def test_drift_payload() -> None:
    doc = parse_drift(drift_payload(drift_report(), "edge-01", 12, created_at=1714564860.5))
    assert doc["schema"] == DRIFT_SCHEMA == "edge-agent/drift/1"
    assert (doc["device_id"], doc["model"], doc["version"], doc["state"], doc["phase"]) == (
        "edge-01", "mr-brain-cls", "1.0.0", "alert", "monitoring")
    assert doc["window"] == {"size": 50, "series": 50} and doc["min_series"] == 20
    assert doc["since"] == "2024-05-01T12:00:00.000Z" and doc["created_at"] == "2024-05-01T12:01:00.500Z"
    assert doc["responsible"] == ["input.intensity", "metadata.manufacturer"] and doc["seq"] == 12
    assert [s["name"] for s in doc["signals"]] == ["input.intensity", "metadata.kvp", "metadata.manufacturer",
                                                   "output.confidence"]
    assert doc["signals"][0] == {"name": "input.intensity", "state": "alert", "statistic": "psi", "value": 0.41,
                                 "warn": 0.12, "alert": 0.25,
                                 "detail": {"window_counts": [3, 10, 20, 17], "out_of_range": 0}}
    assert doc["signals"][2]["alert"] is None  # an infinite threshold: JSON has no Infinity
    assert "detail" not in doc["signals"][1]
    collecting = parse_drift(drift_payload(drift_report(state="ok", phase="collecting", series_in_window=4,
                                                        signals=()), "edge-01", 1))
    assert collecting["responsible"] == [] and collecting["signals"] == [] and collecting["created_at"] > "2024"


def test_drift_payload_refuses_what_json_cannot_carry() -> None:
    bad = drift_report(signals=(DriftSignal("input.intensity", "ok", "psi", math.nan, 0.1, 0.2),))
    with pytest.raises(PublishError):
        drift_payload(bad, "edge-01", 1)
    for broken in (b'{"schema": "edge-agent/drift/1"}', b"[]"):
        with pytest.raises(PublishError):
            parse_drift(broken)
    doc = json.loads(drift_payload(drift_report(), "edge-01", 3))
    doc["signals"][0]["typo"] = 1  # nested objects are strict: a builder's typo is caught
    with pytest.raises(PublishError):
        parse_drift(json.dumps(doc))
