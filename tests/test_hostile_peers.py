"""Hostile or broken DICOM peers against the real agent process (issue #13): slow-loris and
oversized association requests, decompression bombs, floods of refused traffic with the broker down.

Peers are told apart by source address (loopback takes any 127.x.y.z): the attackers bind to
127.0.0.2 and up, the allowed PACS talks from 127.0.0.1. RSS is the agent process's own (the
inference worker is a separate process), read with psutil; the bound is documented in
docs/security.md.
"""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path

import psutil
import pydicom
import pytest
from conftest import AgentProcess, Mosquitto, ResultCollector, storescu
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config

from agent.core.events import REFUSAL_KINDS
from agent.core.types import Event
from agent.mqtt.payloads import parse_event, parse_result
from agent.service.event_sink import RefusalLimiter
from deploy.synth import make_mr_slice, write_mr_series

pytestmark = pytest.mark.slow

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
#: growth of the agent's RSS under attack that the tests accept (docs/security.md)
RSS_GROWTH_BOUND = 96 * 1024 * 1024


def _rss(agent: AgentProcess) -> int:
    assert agent.proc is not None
    return int(psutil.Process(agent.proc.pid).memory_info().rss)


def _echo(port: int, *, aet: str = "STORESCU", timeout: float = 5.0) -> float:
    """Seconds an allowed peer took to associate and C-ECHO; raises when it could not."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = timeout
    t0 = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    assert assoc.is_established, "the allowed peer could not associate"
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000
    return time.monotonic() - t0


def _events(collector: ResultCollector) -> list[dict]:
    return [parse_event(p) for t, p in list(collector.messages) if t.endswith("/events")]


def _connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


class _Attack:
    """Keeps slow-loris sockets (header + a byte now and then) and 2 GB request PDUs open,
    reopening whatever the agent closes, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.opened = 0
        self.threads = [threading.Thread(target=self._loris, args=(f"127.0.0.{2 + i % 4}",), daemon=True)
                        for i in range(20)]
        self.threads += [threading.Thread(target=self._huge, args=("127.0.0.9",), daemon=True) for _ in range(3)]

    def __enter__(self) -> _Attack:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _hold(self, source: str, header: bytes, trickle: bool) -> None:
        while not self.stop.is_set():
            try:
                s = _connect_from(source, self.port)
                s.sendall(header + b"\x00\x01")
                self.opened += 1
                while not self.stop.wait(2.0):
                    s.sendall(b"\x00" if trickle else b"\x00" * 4)
            except OSError:
                time.sleep(0.2)  # closed by the agent: come back
                continue
            finally:
                try:
                    s.close()
                except (OSError, UnboundLocalError):
                    pass

    def _loris(self, source: str) -> None:
        self._hold(source, struct.pack(">BBL", 0x01, 0, 4000), trickle=True)

    def _huge(self, source: str) -> None:
        self._hold(source, struct.pack(">BBL", 0x01, 0, 2_000_000_000), trickle=False)


def test_slow_loris_and_2gb_requests_do_not_lock_out_the_pacs(tmp_path: Path, mosquitto: Mosquitto) -> None:
    collector = ResultCollector(mosquitto.port, "edge/+/events")
    agent = AgentProcess(tmp_path, mosquitto.port, extra_toml="[dicom.limits]\nassociation_request_timeout_s = 5\n")
    agent.start()
    try:
        _echo(agent.dicom_port)
        baseline = _rss(agent)
        with _Attack(agent.dicom_port) as attack:
            time.sleep(3)
            waits = []
            for _ in range(4):  # across the 5 s deadline, while the attackers keep reconnecting
                waits.append(_echo(agent.dicom_port))
                time.sleep(2)
            peak = max(_rss(agent) for _ in range(3))
            opened = attack.opened
        time.sleep(2)
        kinds = {e["fields"].get("limit") for e in _events(collector) if e["kind"] == "connection.refused"}
        log = agent.log_text()
    finally:
        agent.stop()
        collector.close()
    print(f"\nslow-loris: allowed peer associated in {max(waits):.2f} s (max of {len(waits)}); agent RSS "
          f"{baseline / 2**20:.0f} -> {peak / 2**20:.0f} MiB; attacker connections opened: {opened}")
    assert max(waits) < 3.0, waits
    assert peak - baseline < RSS_GROWTH_BOUND, (baseline, peak)
    assert opened > 23  # the attackers were closed and came back
    # published (the first of each minute; the rest are summarised) and logged, every one
    assert {"pending_peer", "pdu_size"} <= kinds, kinds
    assert "limit=timeout" in log and "limit=pending_peer" in log


# ------------------------------------------------------------------------------------- bombs


def _part10(meta_ts: str, dataset_body: bytes, sop_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = meta_ts
    buf = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + buf.getvalue() + dataset_body


def _ct_header(rows: int, columns: int, frames: int | None = None) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, columns
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


def deflate_bomb(folder: Path, inflated: int = 2040 * 2**20) -> Path:
    """A CT instance in Deflated Explicit VR LE whose ~2 MB stream inflates to ~2 GiB of pixels (the
    issue's "2 MB deflated bomb")."""
    rows = 32768
    columns = inflated // (rows * 2)
    ds = _ct_header(rows, columns)
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, ds)
    pixel_len = rows * columns * 2
    element = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", pixel_len)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(fp.getvalue() + element)]
    zeros = bytes(16 * 2**20)
    left = pixel_len
    while left:
        n = min(left, len(zeros))
        out.append(comp.compress(zeros[:n]))
        left -= n
    out.append(comp.flush())
    path = folder / "deflate-bomb.dcm"
    path.write_bytes(_part10(DeflatedExplicitVRLittleEndian, b"".join(out), ds.SOPInstanceUID))
    return path


def rle_bomb(folder: Path) -> Path:
    """RLE Lossless declaring 1000 frames of 512 x 512 x 16 bit (500 MiB) in a few KB."""
    frames = 1000
    ds = _ct_header(512, 512, frames)
    # one frame: 2 segments (high, low bytes), each all zeros: replicate runs of 128
    segment = b"\x81\x00" * (512 * 512 // 128)
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    frame = header + segment + segment
    ds.PixelData = encapsulate([frame] * 4)  # far fewer frames than declared: the bomb is in the header
    ds["PixelData"].VR = "OB"
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, ds)
    path = folder / "rle-bomb.dcm"
    path.write_bytes(_part10(RLELossless, fp.getvalue(), ds.SOPInstanceUID))
    return path


def _store_file(port: int, path: Path, ts: str) -> int:
    """C-STORE a file as is (pynetdicom streams it from disk; nothing decoded here)."""
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CT, [ts])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


def test_deflate_and_pixel_codec_bombs_are_refused(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bomb = deflate_bomb(tmp_path)
    rle = rle_bomb(tmp_path)
    assert bomb.stat().st_size < 3 * 2**20 and rle.stat().st_size < 64 * 1024
    collector = ResultCollector(mosquitto.port, "edge/+/events")
    agent = AgentProcess(tmp_path, mosquitto.port)
    agent.start()
    try:
        _echo(agent.dicom_port)
        baseline = _rss(agent)
        statuses = [_store_file(agent.dicom_port, bomb, DeflatedExplicitVRLittleEndian),
                    _store_file(agent.dicom_port, rle, RLELossless)]
        peak = _rss(agent)
        time.sleep(2)
        rejected = [e for e in _events(collector) if e["kind"] == "dicom.rejected"]
        spooled = list((agent.state / "spool").glob("*/*/*.dcm"))
    finally:
        agent.stop()
        collector.close()
    print(f"\nbombs: statuses {[hex(s) for s in statuses]}; agent RSS {baseline / 2**20:.0f} -> {peak / 2**20:.0f} MiB")
    assert statuses == [0xC212, 0xC212]
    assert {e["fields"]["status"] for e in rejected} == {0xC212}
    assert len(rejected) == 2 and any("ratio" in e["fields"]["reason"] for e in rejected)
    assert spooled == []
    assert peak - baseline < RSS_GROWTH_BOUND, (baseline, peak)


# ------------------------------------------------------------------------------------- floods


def _association_request(called: str) -> bytes:
    """The A-ASSOCIATE-RQ pynetdicom sends, captured on a plain socket."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 2
    t = threading.Thread(target=lambda: ae.associate("127.0.0.1", srv.getsockname()[1], ae_title=called))
    t.start()
    conn, _ = srv.accept()
    conn.settimeout(5)
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
        data += conn.recv(65536)
    conn.close()
    srv.close()
    t.join()
    return data


def _flood(port: int, request: bytes, source: str, n: int, answers: list[int]) -> None:
    for _ in range(n):
        try:
            s = _connect_from(source, port)
            s.sendall(request)
            reply = s.recv(16)
            answers.append(reply[0] if reply else 0)
            s.close()
        except OSError:
            answers.append(-1)


def test_5000_refused_associations_with_the_broker_down_stay_bounded(tmp_path: Path, mosquitto: Mosquitto) -> None:
    agent = AgentProcess(tmp_path, mosquitto.port, extra_toml=(
        "[events]\nmax_queued_refusals = 100\n[quarantine]\nmax_files = 10\n"))
    agent.config.write_text(agent.config.read_text().replace("[mqtt]\n", "[mqtt]\nreconnect_max_s = 2\n"))
    agent.start()
    collector = None
    try:
        _echo(agent.dicom_port)
        mosquitto.stop()
        request = _association_request("NOT_THE_AGENT")
        answers: list[int] = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=_flood, args=(agent.dicom_port, request, f"127.0.1.{i}", 1250, answers))
                   for i in range(4)]
        for t in threads:
            t.start()
        # and malformed instances from the PACS: quarantined, the quarantine stays bounded
        bad = _ct_header(4, 4)
        del bad.StudyInstanceUID
        bad.PixelData = bytes(32)
        bad.file_meta = FileMetaDataset()
        bad.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", agent.dicom_port, ae_title="EDGE_AGENT")
        assert assoc.is_established
        quarantined = []
        for _ in range(40):
            bad.SOPInstanceUID = pydicom.uid.generate_uid()
            quarantined.append(int(assoc.send_c_store(bad).Status))
        assoc.release()
        for t in threads:
            t.join()
        flood_s = time.monotonic() - t0
        time.sleep(3)  # the assembly thread drains the events into the outbox
        with sqlite3.connect(agent.state / "state.db", timeout=30) as db:
            rows = dict(db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
            refused = db.execute("SELECT payload FROM outbox WHERE kind = 'refusal'").fetchall()
        quarantine_files = list((agent.state / "quarantine").glob("*.dcm"))

        # a valid series is still accepted and processed, its result delivered once the broker is back
        folder = write_mr_series(make_mr_slice(777_900, difficulty="obvious"), tmp_path / "mr")
        proc = storescu(agent.dicom_port, sorted(folder.glob("*.dcm")))
        assert proc.returncode == 0, proc.stderr
        mosquitto.start()
        collector = ResultCollector(mosquitto.port, "edge/+/#")
        deadline = time.monotonic() + 120
        results: list[dict] = []
        while time.monotonic() < deadline and not results:
            results = [parse_result(p) for t, p in list(collector.messages) if t.endswith("/results")]
            time.sleep(0.5)
    finally:
        agent.stop()
        if collector is not None:
            collector.close()
    kinds = [json.loads(p[0])["kind"] for p in refused]
    print(f"\nflood: {len(answers)} refused associations in {flood_s:.1f} s; outbox rows {rows}; "
          f"quarantine files {len(quarantine_files)}")
    assert len(answers) == 5000 and answers.count(0x03) > 4500, answers[:20]  # A-ASSOCIATE-RJ
    assert set(quarantined) == {0xC210}
    assert len(quarantine_files) <= 10
    assert rows.get("refusal", 0) <= 100
    assert kinds.count("association.rejected") <= 20 + 1  # events.refusals_per_minute (a window may roll)
    assert rows.get("event", 0) < 50
    assert len(results) == 1, agent.log_text()[-3000:]


# ------------------------------------------------------------------------------------- units


def test_refusal_limiter_passes_n_per_minute_and_summarises_the_rest() -> None:
    now = [0.0]
    limiter = RefusalLimiter(3, clock=lambda: now[0])

    def ev(kind: str, reason: str, ae: str) -> Event:
        return Event(kind, "warning", "x", {"reason": reason, "calling_ae": ae, "peer": "10.0.0.9"}, 1.0)

    passed = [limiter.admit(ev("association.rejected", "called AE title not recognised", "X"))[0] for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limiter.admit(Event("job.failed", "error", "x", {}, 1.0)) == (True, None)  # not a refusal
    assert limiter.flush() is None  # the minute is not over
    now[0] = 61.0
    summary = limiter.flush()
    assert summary is not None and summary.kind == "events.suppressed"
    assert summary.fields["total"] == 7 and summary.fields["counts"] == {"association.rejected": 7}
    assert summary.fields["peers"] == {"X@10.0.0.9": 7}
    assert limiter.admit(ev("association.rejected", "r", "X")) == (True, None)  # a new window
    assert "association.rejected" in REFUSAL_KINDS


# ------------------------------------------------------------------------- unit: the gate, the caps

def _rq(length: int, body: bytes = b"") -> bytes:
    return struct.pack(">BBL", 0x01, 0, length) + body


@pytest.mark.parametrize(("sent", "close", "expect"), [
    (_rq(68, bytes(68)), False, None),                      # whole request: let pynetdicom read it
    (_rq(68, bytes(10)), False, ("timeout", "timeout")),    # slow-loris: header and a few bytes
    (b"\x01\x00", False, ("timeout", "timeout")),           # not even a whole header
    (_rq(2**31), False, "pdu_size"),                        # a 2 GB request: refused from its header
    (struct.pack(">BBL", 0x04, 0, 10) + bytes(10), False, "pdu_type"),  # P-DATA before association
    (_rq(68, bytes(10)), True, "closed"),                   # the peer went away
])
def test_the_gate_waits_for_a_whole_small_request_without_consuming_it(
    sent: bytes, close: bool, expect: object
) -> None:
    from agent.ingest.guard import await_request

    ours, peer = socket.socketpair()
    try:
        peer.sendall(sent)
        if close:
            peer.close()
        t0 = time.monotonic()
        verdict = await_request(ours, time.monotonic() + 0.6, 64 * 1024)
        if expect is None:
            assert verdict is None and ours.recv(1024) == sent  # peeked, not read
        elif isinstance(expect, tuple):
            assert verdict == expect and 0.5 <= time.monotonic() - t0 < 5
        else:
            assert verdict is not None and verdict[1] == expect, verdict
    finally:
        ours.close()
        if not close:
            peer.close()


def test_refusal_rows_are_capped_in_the_outbox_and_results_never_are(tmp_path: Path) -> None:
    from agent.core import db
    from agent.mqtt.outbox import Outbox

    outbox = Outbox(db.connect(tmp_path / "state.db"))
    for i in range(5):
        outbox.put("edge/d/results", f"r{i}".encode(), qos=1, kind="result", dedup_key=f"r{i}")
    for i in range(50):
        outbox.put("edge/d/events", f"x{i}".encode(), qos=1, kind="refusal", max_queued=10)
    rows = outbox.pending(1000)
    kinds = [r.kind for r in rows]
    assert kinds.count("result") == 5 and kinds.count("refusal") == 10
    assert [r.payload for r in rows if r.kind == "refusal"] == [f"x{i}".encode() for i in range(40, 50)]
    assert outbox.dropped()["refusal"] == 40
