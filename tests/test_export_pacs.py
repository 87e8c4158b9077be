"""Export acceptance (issue 15): the agent process, real Mosquitto, real Orthanc (Debian's package)
as the PACS, its REST API to look. A CT series pushed from Orthanc comes back as one SEG and one SR
in the same study; the MR classifier's result as an SR with the class; a re-sent series (a new
revision) replaces rather than duplicates; Orthanc down while results are produced, with an agent
restart in between: every object arrives once when it returns; a destination that refuses stays
queued (telemetry) and dead-letters with an event. Orthanc runs on ephemeral loopback ports with a
temporary configuration (its DICOM port listens on every interface: Orthanc 1.10 cannot bind it
to one address; nothing but 127.0.0.1 ever talks to it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from conftest import IN_CI, AgentProcess, Mosquitto, ResultCollector, free_port, storescu, wait_port
from test_export import dciodvfy_errors, seg_voxels

from agent.mqtt.payloads import parse_event, parse_result, parse_telemetry
from deploy.synth import make_ct_phantom, make_mr_slice, write_ct_series, write_mr_series

pytestmark = pytest.mark.slow

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        msg = f"{binary} not installed (apt-get install {package})"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


class Orthanc:
    """A real Orthanc on ephemeral loopback ports, temporary storage; stop and start keep its data."""

    def __init__(self, tmp: Path, *, aet: str = "PACS", agent_port: int = 0) -> None:
        self.binary = _require("Orthanc", "orthanc")
        self.http_port, self.dicom_port, self.aet = free_port(), free_port(), aet
        self.config = tmp / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "edge-test", "StorageDirectory": str(tmp / "orthanc-db"), "IndexDirectory": str(tmp / "orthanc-db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "OverwriteInstances": True,  # a second store of a SOP Instance UID replaces it (re-sent revisions)
            "DicomModalities": {"agent": ["EDGE_AGENT", "127.0.0.1", agent_port]},
            "Plugins": [], "HttpTimeout": 30, "DicomScuTimeout": 60, "StableAge": 1,
        }))
        self.log = tmp / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([self.binary, str(self.config)], stdout=logf, stderr=subprocess.STDOUT)
        wait_port(self.http_port, timeout=30)
        wait_port(self.dicom_port, timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def rest(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - loopback, our own Orthanc
            payload = resp.read()
        return payload if raw else json.loads(payload)

    def upload(self, files: list[Path]) -> None:
        for f in files:
            self.rest("POST", "/instances", f.read_bytes())

    def find_series(self, study_uid: str) -> list[dict[str, Any]]:
        return list(self.rest("POST", "/tools/find", {"Level": "Series", "Expand": True,
                                                      "Query": {"StudyInstanceUID": study_uid}}))

    def series_id(self, series_uid: str) -> str:
        found = self.rest("POST", "/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}})
        assert len(found) == 1, found
        return str(found[0])

    def instances_of(self, study_uid: str, modality: str) -> list[str]:
        """Orthanc ids of every instance of ``modality`` in the study."""
        out: list[str] = []
        for s in self.find_series(study_uid):
            if s["MainDicomTags"].get("Modality") == modality:
                out += s["Instances"]
        return out

    def file(self, instance_id: str, dest: Path) -> Path:
        dest.write_bytes(self.rest("GET", f"/instances/{instance_id}/file", raw=True))
        return dest


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


def _export_toml(port: int, *, called_ae: str = "PACS", name: str = "pacs", extra: str = "") -> str:
    return (f'[[export]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\ncalled_ae = "{called_ae}"\n'
            f"retry_initial_s = 1\nretry_max_s = 3\ntimeout_s = 10\n{extra}")


def _wait(what: str, cond: Callable[[], Any], timeout: float, agent: AgentProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    tail = agent.log_text()[-4000:] if agent is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _docs(col: ResultCollector, suffix: str) -> list[dict[str, Any]]:
    parse = {"/results": parse_result, "/events": parse_event, "/telemetry": parse_telemetry}[suffix]
    return [parse(p) for t, p in list(col.messages) if t.endswith(suffix)]


def _events(col: ResultCollector, kind: str) -> list[dict[str, Any]]:
    return [e for e in _docs(col, "/events") if e["kind"] == kind]


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    folder = write_ct_series(make_ct_phantom(777_001, size=256, slice_thickness=3.0), tmp_path / "ct")
    return sorted(folder.glob("*.dcm"))


@pytest.fixture
def mr_files(tmp_path: Path) -> list[Path]:
    return sorted(write_mr_series(make_mr_slice(777_100, cls="meningioma"), tmp_path / "mr").glob("*.dcm"))


def test_ct_and_mr_results_come_back_into_orthanc_and_a_new_revision_replaces(
        tmp_path: Path, broker: Mosquitto, ct_files: list[Path], mr_files: list[Path]) -> None:
    agent = AgentProcess(tmp_path, broker.port, stable_age_s=2.0)
    pacs = Orthanc(tmp_path, agent_port=agent.dicom_port)
    agent.config.write_text(agent.config.read_text() + _export_toml(pacs.dicom_port))
    col = ResultCollector(broker.port, "edge/test-device/#")
    pacs.start()
    agent.start()
    try:
        # all but the last CT slice first; the last one later re-opens the series (revision 2)
        pacs.upload(ct_files[:-1] + mr_files)
        ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
        mr = pydicom.dcmread(mr_files[0], stop_before_pixels=True)
        pacs.rest("POST", "/modalities/agent/store", {"Resources": [pacs.series_id(ct.SeriesInstanceUID)],
                                                      "Synchronous": True})
        pacs.rest("POST", "/modalities/agent/store", {"Resources": [pacs.series_id(mr.SeriesInstanceUID)],
                                                      "Synchronous": True})
        _wait("SEG + SR of the CT and the MR SR delivered",
              lambda: len(_events(col, "export.delivered")) >= 3, 180, agent)
        results = {r["model"]["name"]: r for r in _docs(col, "/results")}
        delivered = {(e["fields"]["result_id"], e["fields"]["object"]): e["fields"]
                     for e in _events(col, "export.delivered")}

        # CT: one SEG and one SR in the source study, listed by Orthanc
        seg_ids = pacs.instances_of(ct.StudyInstanceUID, "SEG")
        sr_ids = _wait("the CT SR in Orthanc", lambda: pacs.instances_of(ct.StudyInstanceUID, "SR"), 30)
        assert len(seg_ids) == 1 and len(sr_ids) == 1
        seg = hd.seg.segread(pacs.file(seg_ids[0], tmp_path / "seg.dcm"))
        sr_path = pacs.file(sr_ids[0], tmp_path / "sr.dcm")
        result = results["ct-abdomen-seg"]
        want = {i: result["outputs"]["labels"][k]["voxels"] for i, k in
                enumerate(["liver", "spleen", "kidney_left", "kidney_right"], start=1)}
        assert seg_voxels(seg) == want  # the SEG's label voxels are the MQTT result's
        assert seg.StudyInstanceUID == ct.StudyInstanceUID and seg.PatientID == ct.PatientID
        ev = delivered[(result["result_id"], "seg")]
        assert (ev["sop_instance_uid"], ev["series_uid"], ev["study_uid"]) == (
            seg.SOPInstanceUID, seg.SeriesInstanceUID, ct.StudyInstanceUID)
        assert ev["sop_class_uid"] == SEG_CLASS and ev["status"] == 0 and ev["revision"] == 1
        assert dciodvfy_errors(tmp_path / "seg.dcm") == [] and dciodvfy_errors(sr_path) == []
        assert hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()

        # MR: an SR with the class and its probability
        mr_result = results["mr-brain-cls"]
        mr_sr_ids = pacs.instances_of(mr.StudyInstanceUID, "SR")
        assert len(mr_sr_ids) == 1 and pacs.instances_of(mr.StudyInstanceUID, "SEG") == []
        group = hd.sr.srread(pacs.file(mr_sr_ids[0], tmp_path / "mr-sr.dcm")).content.get_image_measurement_groups()[0]
        assert group.get_qualitative_evaluations()[0].value.meaning == mr_result["outputs"]["label"]
        assert group.get_measurements()[0].value == pytest.approx(mr_result["outputs"]["confidence"], abs=1e-5)
        assert delivered[(mr_result["result_id"], "sr")]["sop_class_uid"] == SR_CLASS

        # the last slice re-opens the series: revision 2 replaces the SEG and SR, no duplicate
        last = pacs.rest("POST", "/instances", ct_files[-1].read_bytes())
        pacs.rest("POST", "/modalities/agent/store", {"Resources": [last["ID"]], "Synchronous": True})
        _wait("revision 2 delivered", lambda: {(e["fields"]["object"], e["fields"]["revision"])
                                                for e in _events(col, "export.delivered")}
              >= {("seg", 2), ("sr", 2)}, 180, agent)
        seg_ids = pacs.instances_of(ct.StudyInstanceUID, "SEG")
        sr_ids = pacs.instances_of(ct.StudyInstanceUID, "SR")
        assert len(seg_ids) == 1 and len(sr_ids) == 1, "a new revision must replace, not add"
        seg2 = pydicom.dcmread(pacs.file(seg_ids[0], tmp_path / "seg2.dcm"))
        assert seg2.SOPInstanceUID == seg.SOPInstanceUID and seg2.InstanceNumber == 2
        # revision 2 is on every slice, the late one included; revision 1 was on all but it
        assert len(seg2.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(ct_files)
        assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(ct_files) - 1
    finally:
        agent.stop()
        pacs.stop()
        col.close()


def test_orthanc_down_and_an_agent_restart_lose_and_double_nothing(
        tmp_path: Path, broker: Mosquitto, ct_files: list[Path], mr_files: list[Path]) -> None:
    agent = AgentProcess(tmp_path, broker.port, stable_age_s=1.0)
    pacs = Orthanc(tmp_path, agent_port=agent.dicom_port)
    agent.config.write_text(agent.config.read_text().replace("[pipeline]", "[telemetry]\ninterval_s = 1\n[pipeline]")
                            + _export_toml(pacs.dicom_port, extra="max_attempts = 1000\n"))
    col = ResultCollector(broker.port, "edge/test-device/#")
    pacs.start()
    pacs.stop()  # the PACS is down while the results are produced
    down_at = time.monotonic()
    agent.start()
    try:
        for files in (ct_files, mr_files):
            out = storescu(agent.dicom_port, files)
            assert out.returncode == 0, out.stderr
        _wait("both results", lambda: len(_docs(col, "/results")) >= 2, 180, agent)
        queued = _wait("the queue in telemetry", lambda: [
            t for t in _docs(col, "/telemetry") if t["export"] and t["export"][0]["queued"] == 3], 30, agent)
        assert queued[-1]["export"][0]["destination"] == "pacs" and queued[-1]["export"][0]["oldest_age_s"] >= 0
        assert _events(col, "export.delivered") == []
        assert agent.stop() == 0  # a restart in between
        agent.start()
        # about 20 s down in all (the 2 minutes: EXPORT_OUTAGE_S=120; docs/export.md)
        time.sleep(max(0.0, float(os.environ.get("EXPORT_OUTAGE_S", "20")) - (time.monotonic() - down_at)))
        assert _events(col, "export.delivered") == []
        pacs.start()
        _wait("every object after Orthanc returned", lambda: len(_events(col, "export.delivered")) >= 3, 120, agent)
        time.sleep(3)  # time for a doubled send to show
        delivered = [(e["fields"]["result_id"], e["fields"]["object"]) for e in _events(col, "export.delivered")]
        assert len(delivered) == len(set(delivered)) == 3, delivered
        ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
        mr = pydicom.dcmread(mr_files[0], stop_before_pixels=True)
        assert len(pacs.instances_of(ct.StudyInstanceUID, "SEG")) == 1
        assert len(pacs.instances_of(ct.StudyInstanceUID, "SR")) == 1
        assert len(pacs.instances_of(mr.StudyInstanceUID, "SR")) == 1
        assert all(e["fields"]["attempts"] >= 2 for e in _events(col, "export.delivered"))
        assert len(_docs(col, "/results")) == 2  # the restart did not produce the results again
    finally:
        agent.stop()
        pacs.stop()
        col.close()


def test_a_refusing_destination_keeps_the_object_queued_then_dead_letters(
        tmp_path: Path, broker: Mosquitto, mr_files: list[Path]) -> None:
    """Wrong called AE (Orthanc rejects the association) and a peer that answers 0xA700 (out of
    resources): both stay queued, visible in telemetry, and dead-letter after max_attempts."""
    from pynetdicom import AE, evt

    full = AE(ae_title="FULL")
    full.add_supported_context(SR_CLASS, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    stores: list[str] = []

    def out_of_resources(event: evt.Event) -> int:
        stores.append(str(event.request.AffectedSOPInstanceUID))
        return 0xA700

    full_port = free_port()
    server = full.start_server(("127.0.0.1", full_port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, out_of_resources)])
    agent = AgentProcess(tmp_path, broker.port, stable_age_s=1.0)
    pacs = Orthanc(tmp_path, agent_port=agent.dicom_port)
    agent.config.write_text(
        agent.config.read_text().replace("[pipeline]", "[telemetry]\ninterval_s = 0.5\n[pipeline]")
        + _export_toml(pacs.dicom_port, called_ae="WRONG", name="wrong-ae", extra="max_attempts = 3\n")
        + _export_toml(full_port, called_ae="FULL", name="full", extra='max_attempts = 3\nobjects = ["sr"]\n'))
    col = ResultCollector(broker.port, "edge/test-device/#")
    pacs.start()
    agent.start()
    try:
        assert storescu(agent.dicom_port, mr_files).returncode == 0
        _wait("a telemetry message with both objects queued", lambda: [
            t for t in _docs(col, "/telemetry")
            if {e["destination"]: e["queued"] for e in t["export"]} == {"wrong-ae": 1, "full": 1}], 60, agent)
        dead = _wait("two dead letters", lambda: len(_events(col, "export.dead_lettered")) >= 2 and
                     _events(col, "export.dead_lettered"), 60, agent)
        by_dest = {e["fields"]["destination"]: e["fields"] for e in dead}
        assert by_dest["wrong-ae"]["attempts"] == 3 and "rejected" in by_dest["wrong-ae"]["error"]
        assert by_dest["full"]["attempts"] == 3 and "0xA700" in by_dest["full"]["error"]
        assert len(stores) == 3  # the peer was asked three times, and never counted as delivered
        assert _events(col, "export.delivered") == []
        _wait("telemetry with the dead letters", lambda: [
            t for t in _docs(col, "/telemetry")
            if {e["destination"]: (e["queued"], e["dead_lettered"]) for e in t["export"]}
            == {"wrong-ae": (0, 1), "full": (0, 1)}], 30, agent)
        mr = pydicom.dcmread(mr_files[0], stop_before_pixels=True)
        assert pacs.find_series(mr.StudyInstanceUID) == []  # nothing reached Orthanc under a wrong AE
    finally:
        agent.stop()
        pacs.stop()
        server.shutdown()
        col.close()
