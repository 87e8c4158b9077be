"""The agent end to end, as a real subprocess, with real peers: DCMTK storescu/echoscu in,
Mosquitto out. These are the acceptance tests of the daemon's data path."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import AgentProcess, Mosquitto, ResultCollector, require_binary, storescu
from pydicom.uid import JPEG2000Lossless, RLELossless

from agent.mqtt.payloads import parse_event, parse_result
from deploy.synth import make_ct_phantom, make_mr_slice, write_ct_series, write_mr_series

pytestmark = pytest.mark.slow

CT_SEED = 777_001  # seeds the models were never trained or evaluated on
MR_SEED = 777_100


def _copy_series(src: Path, dst: Path, syntax: str | None, tag: str) -> Path:
    """A copy of a series with fresh UIDs, optionally re-encoded in another transfer syntax."""
    dst.mkdir(parents=True)
    new_series = pydicom.uid.generate_uid()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = new_series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = f"{ds.SeriesDescription} {tag}"
        if syntax is not None:
            ds.compress(syntax)
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def _results(collector: ResultCollector) -> list[dict]:
    return [parse_result(p) for t, p in collector.messages if t.endswith("/results")]


def _wait_results(collector: ResultCollector, n: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        docs = _results(collector)
        if len(docs) >= n:
            return docs
        time.sleep(0.2)
    return _results(collector)


@pytest.fixture
def ct_series(tmp_path: Path) -> tuple[Path, dict]:
    phantom = make_ct_phantom(CT_SEED, size=256, slice_thickness=3.0)
    folder = write_ct_series(phantom, tmp_path / "ct")
    return folder, phantom.truth


def _mr_series(tmp_path: Path, i: int) -> tuple[Path, dict]:
    phantom = make_mr_slice(MR_SEED + i, difficulty="obvious")
    return write_mr_series(phantom, tmp_path / f"mr{i}"), phantom.truth


def test_ct_native_jpeg2000_and_rle_each_give_one_accurate_result(
    tmp_path: Path, mosquitto: Mosquitto, ct_series: tuple[Path, dict]
) -> None:
    folder, truth = ct_series
    j2k = _copy_series(folder, tmp_path / "ct-j2k", JPEG2000Lossless, "J2K")
    rle = _copy_series(folder, tmp_path / "ct-rle", RLELossless, "RLE")
    collector = ResultCollector(mosquitto.port, "edge/+/#")
    agent = AgentProcess(tmp_path, mosquitto.port)
    agent.start()
    try:
        for series, syntax in ((folder, ""), (j2k, "-xv"), (rle, "-xr")):
            files = sorted(series.glob("*.dcm"))
            proc = storescu(agent.dicom_port, files, syntax=syntax)
            assert proc.returncode == 0, proc.stderr[-2000:]
        docs = _wait_results(collector, 3, timeout=600)
        time.sleep(3)  # anything extra (a duplicate) would arrive now
        docs = _results(collector)
    finally:
        rc = agent.stop()
        collector.close()
    assert rc == 0
    assert len(docs) == 3, f"expected one result per series, got {len(docs)}:\n{agent.log_text()[-3000:]}"
    assert len({d["series_uid"] for d in docs}) == 3
    assert len({d["result_id"] for d in docs}) == 3
    for doc in docs:
        assert doc["task"] == "segmentation" and doc["model"]["name"] == "ct-abdomen-seg"
        for name, t in truth["labels"].items():
            got = doc["outputs"]["labels"][name]["volume_ml"]
            assert abs(got - t["volume_ml"]) <= 0.10 * t["volume_ml"], (name, got, t["volume_ml"])
    # no patient identifiers anywhere: messages or logs
    patient_name = str(pydicom.dcmread(next(folder.glob("*.dcm"))).PatientName)
    assert patient_name and patient_name not in agent.log_text()
    assert all(patient_name.encode() not in p for _, p in collector.messages)
    assert all("patient" not in d for d in docs)


def test_broker_outage_delays_but_loses_nothing(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistence=True)
    broker.start()
    collector = ResultCollector(broker.port, "edge/+/results", persistent_id="outage-collector")
    agent = AgentProcess(tmp_path, broker.port, extra_toml="")
    agent.config.write_text(agent.config.read_text().replace("[mqtt]\n", "[mqtt]\nreconnect_max_s = 4\n"))
    agent.start()
    try:
        broker.stop()
        series = [_mr_series(tmp_path, i) for i in range(5)]
        for folder, _ in series:
            proc = storescu(agent.dicom_port, sorted(folder.glob("*.dcm")))
            assert proc.returncode == 0, proc.stderr
        time.sleep(30)
        assert _results(collector) == []
        broker.start()
        docs = _wait_results(collector, 5, timeout=120)
        time.sleep(3)
        docs = _results(collector)
    finally:
        agent.stop()
        collector.close()
        broker.stop()
    ids = [d["result_id"] for d in docs]
    assert len(set(ids)) == 5, f"{len(ids)} results:\n{agent.log_text()[-3000:]}"
    assert len(ids) == 5, f"a result_id arrived twice: {ids}"
    truths = {t["series_uid"]: t for _, t in series}
    for d in docs:
        assert d["outputs"]["label"] == truths[d["series_uid"]]["class"]


def test_sigkill_right_after_store_then_restart_still_delivers(tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/results")
    agent = AgentProcess(tmp_path, mosquitto.port, stable_age_s=2.0)
    agent.start()
    folder, truth = _mr_series(tmp_path, 0)
    proc = storescu(agent.dicom_port, sorted(folder.glob("*.dcm")))
    assert proc.returncode == 0, proc.stderr
    agent.kill()  # acknowledged, not yet inferred: only the disk knows about it
    assert _results(collector) == []
    agent.start()
    try:
        docs = _wait_results(collector, 1, timeout=120)
        time.sleep(2)
        docs = _results(collector)
    finally:
        agent.stop()
        collector.close()
    assert len(docs) == 1, agent.log_text()[-3000:]
    assert docs[0]["series_uid"] == truth["series_uid"]
    assert docs[0]["outputs"]["label"] == truth["class"]


def test_late_instance_supersedes_with_same_result_id(tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/results")
    agent = AgentProcess(tmp_path, mosquitto.port, stable_age_s=1.0)
    agent.start()
    folder, truth = _mr_series(tmp_path, 3)
    first = sorted(folder.glob("*.dcm"))[0]
    try:
        assert storescu(agent.dicom_port, [first]).returncode == 0
        docs = _wait_results(collector, 1, timeout=120)
        assert len(docs) == 1
        # a late instance of the same series: same position plane, next slice
        late = tmp_path / "late.dcm"
        ds = pydicom.dcmread(first)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 2
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + float(ds.get("SliceThickness", 5) or 5)]
        ds.save_as(late, enforce_file_format=True)
        assert storescu(agent.dicom_port, [late]).returncode == 0
        docs = _wait_results(collector, 2, timeout=120)
    finally:
        agent.stop()
        collector.close()
    assert len(docs) == 2, agent.log_text()[-3000:]
    assert docs[0]["result_id"] == docs[1]["result_id"]
    assert [d["revision"] for d in docs] == [1, 2]


def test_association_rules_free_space_floor_and_echo(tmp_path: Path, mosquitto: Mosquitto) -> None:
    events = ResultCollector(mosquitto.port, "edge/+/events")
    agent = AgentProcess(tmp_path, mosquitto.port)
    agent.config.write_text(agent.config.read_text().replace("min_free_mb = 50", "min_free_mb = 100000000"))
    agent.start()
    folder, _ = _mr_series(tmp_path, 1)
    files = sorted(folder.glob("*.dcm"))
    try:
        rejected = storescu(agent.dicom_port, files, aet="UNKNOWN_AE")
        assert rejected.returncode != 0
        assert "reject" in (rejected.stderr + rejected.stdout).lower()
        full = storescu(agent.dicom_port, files)
        out = (full.stderr + full.stdout).lower()
        assert full.returncode != 0 and ("a700" in out or "outofresources" in out), out[-2000:]
        spool = agent.state / "spool"
        # only the pre-created (empty) pool files may exist: nothing half-written, nothing stored
        leftovers = [p for p in spool.rglob("*") if p.is_file() and (p.parent.name != ".pool" or p.stat().st_size)]
        assert not leftovers, f"nothing may be half-written: {leftovers}"
        echo = subprocess.run([require_binary("echoscu"), "-aet", "STORESCU", "-aec", "EDGE_AGENT",
                               "127.0.0.1", str(agent.dicom_port)], capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        got = events.wait_for(2, timeout=30)
    finally:
        agent.stop()
        events.close()
    kinds = [parse_event(p)["kind"] for _, p in got]
    assert any("association" in k for k in kinds), kinds
    assert any(json.loads(p).get("fields", {}).get("status") in (0xA700, "0xA700", "A700") or "space" in
               json.loads(p)["message"].lower() for _, p in got), kinds


def test_spool_ages_out_unrouted_and_published_series(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # retention shrunk to seconds: an unrouted series (no model reads knees) goes after ~1 s, a
    # published one after ~2.6 s (Service._janitor; the assembler's part is in test_assembly)
    collector = ResultCollector(mosquitto.port, "edge/+/results")
    agent = AgentProcess(tmp_path, mosquitto.port, stable_age_s=0.5)
    cfg = agent.config.read_text().replace(
        "min_free_mb = 50\n",
        "min_free_mb = 50\nunrouted_retention_h = 0.0003\nretention_days = 0.00003\njanitor_interval_s = 0.5\n")
    agent.config.write_text(cfg)
    brain, _ = _mr_series(tmp_path, 7)
    knee_dir = tmp_path / "knee"
    knee_dir.mkdir()
    for f in sorted(brain.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.BodyPartExamined = "KNEE"
        ds.SeriesInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(knee_dir / f.name, enforce_file_format=True)
    spool = agent.state / "spool"
    agent.start()
    try:
        assert storescu(agent.dicom_port, sorted(knee_dir.glob("*.dcm"))).returncode == 0
        assert storescu(agent.dicom_port, sorted(brain.glob("*.dcm"))).returncode == 0
        assert len(_wait_results(collector, 1, timeout=120)) == 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and list(spool.rglob("*.dcm")):
            time.sleep(0.2)
        left = list(spool.rglob("*.dcm"))
    finally:
        agent.stop()
        collector.close()
    log = agent.log_text()
    assert left == [], log[-3000:]
    assert "event=spool.aged_out" in log and "reason=unrouted" in log and "reason=retention" in log
