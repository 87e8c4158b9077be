"""DICOM ingest against real peers: DCMTK storescu/echoscu and pynetdicom SCUs on loopback.

Every listener binds 127.0.0.1 on port 0 (a free ephemeral port chosen by the kernel). Data are
synthetic or pydicom's bundled test files; no patient data.
"""

from __future__ import annotations

import datetime
import errno
import gc
import io
import ipaddress
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from conftest import require_binary
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from agent.core.config import DicomConfig, TlsConfig
from agent.core.db import connect
from agent.core.errors import (
    ConfigError,
    DicomError,
    MalformedDicomError,
    OutOfSpaceError,
    StorageError,
    UnsupportedDicomError,
)
from agent.core.log import KeyValueFormatter
from agent.core.types import Event, Instance, SpooledSeries
from agent.ingest import (
    ALL_STORAGE_SOP_CLASSES,
    DEFAULT_STORAGE_SOP_CLASSES,
    DicomListener,
    QuarantinedError,
    Spool,
    send_files,
)
from agent.ingest.sopclasses import (
    CT_IMAGE,
    MR_IMAGE,
    SC_IMAGE,
    TRANSFER_SYNTAXES,
    is_image_storage,
    resolve_sop_class,
)
from agent.ingest.spool import dataset_offset
from agent.ingest.spool.pool import write_marked

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.1"
AET = "EDGE_AGENT"
# synthetic identifiers that must never leave the DICOM files
PHI_NAME = "Zzyzxqua^Vortigern"
PHI_ID = "SYN-PID-771942"
PHI_BIRTH = "19020304"
GB = 1024**3


# --------------------------------------------------------------------------- rig


@dataclass
class Rig:
    """A started listener with its spool, and what it told the service."""

    listener: DicomListener
    spool: Spool
    tmp: Path
    events: list[Event] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.listener.port

    def rows(self) -> list[Any]:
        return self.spool._journal.conn.execute("SELECT * FROM instances").fetchall()

    def spooled_files(self) -> list[Path]:
        return sorted(p for p in self.spool.root.rglob("*")
                      if p.is_file() and ".tmp" not in p.parts and ".pool" not in p.parts)

    def temp_files(self) -> list[Path]:
        """Leftovers of stores: temp files, and pool files holding bytes (the pool's own are empty)."""
        return [*self.spool.tmp_dir.iterdir(), *pool_leftovers(self.spool)]


def pool_leftovers(spool: Spool) -> list[Path]:
    return [p for p in spool.pool_dir.iterdir() if p.stat().st_size > 0]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    started: list[Rig] = []

    def make(
        sop_classes: Sequence[str] = (CT_IMAGE, MR_IMAGE, SC_IMAGE),
        *,
        min_free_mb: int = 0,
        disk_usage: Callable[[Path], Any] | None = None,
        chunked_receive: bool = False,
        name: str = "rig",
        **cfg: Any,
    ) -> Rig:
        base = tmp_path / name
        conn = connect(base / "state.db")
        kwargs = {"disk_usage": disk_usage} if disk_usage is not None else {}
        spool = Spool(base / "spool", base / "quarantine", conn, min_free_mb, **kwargs)
        dicom = DicomConfig(ae_title=AET, port=0, bind=HOST, **cfg)
        rig_ref: list[Rig] = []
        listener = DicomListener(
            dicom, spool, sop_classes,
            on_instance=lambda i: rig_ref[0].instances.append(i),
            on_event=lambda e: rig_ref[0].events.append(e),
            chunked_receive=chunked_receive,
        )
        rig = Rig(listener=listener, spool=spool, tmp=base)
        rig_ref.append(rig)
        listener.start()
        started.append(rig)
        return rig

    yield make
    for rig in started:
        rig.listener.stop()
        rig.spool.close()


def ct_series(dst: Path, n: int = 4, *, patient_name: str = PHI_NAME) -> list[Path]:
    """``n`` synthetic CT slices (CT_small with fresh UIDs), one series, explicit VR LE."""
    dst.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        # DCMTK drops DataSetTrailingPadding when it re-encodes for sending; without it the data
        # set storescu puts on the wire is byte-identical to the file
        del ds[0xFFFCFFFC]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, PHI_ID, PHI_BIRTH
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-158.0, -180.0, -200.0 + 5.0 * k]
        path = dst / f"ct{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def data_set_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[dataset_offset(io.BytesIO(raw)):]


def with_fresh_uid(src: Path, dst_dir: Path, k: int) -> Path:
    """Copy of a bundled file with its own SOP Instance UID (several MR_small variants share one).

    The UID is patched in place to one of the same length, so the encoded data set is otherwise
    untouched (a pydicom round trip could re-encode it). The deflated file is copied as is.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    raw = src.read_bytes()
    meta = file_meta(src)
    if str(meta.TransferSyntaxUID) != "1.2.840.10008.1.2.1.99":
        old = str(meta.MediaStorageSOPInstanceUID).encode()
        raw = raw.replace(old, old[:-3] + f"{101 + k:03d}".encode())
    dst = dst_dir / src.name
    dst.write_bytes(raw)
    return dst


def file_meta(path: Path) -> Dataset:
    with open(path, "rb") as f:
        return read_partial(f, stop_when=lambda tag, vr, length: int(tag) >> 16 != 0x0002).file_meta


def scu_store(
    port: int,
    files: Sequence[Path],
    *,
    calling: str = "TEST_SCU",
    called: str = AET,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> list[int | None]:
    """Send files with pynetdicom exactly as they are on disk; one status per file."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    for pair in dict.fromkeys(
        (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in map(file_meta, files)
    ):
        ae.add_requested_context(*pair)
    assoc = ae.associate(HOST, port, ae_title=called, tls_args=tls)
    assert assoc.is_established, "association not established"
    saved, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        statuses = []
        for f in files:
            rsp = assoc.send_c_store(f)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
        assoc.release()
    return statuses


def storescu(port: int, *args: str, calling: str = "STORESCU", called: str = AET) -> subprocess.CompletedProcess[str]:
    exe = require_binary("storescu")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", called, "-to", "10", "-ta", "10", "-td", "20", HOST, str(port), *args],
        capture_output=True, text=True, timeout=60,
    )


def echoscu(port: int, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    exe = require_binary("echoscu")
    return subprocess.run([exe, "-aet", calling, "-aec", AET, "-to", "10", HOST, str(port)],
                          capture_output=True, text=True, timeout=30)


def associate(port: int, calling: str = "TEST_SCU", called: str = AET) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate(HOST, port, ae_title=called)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def close_client_socket(assoc: Any) -> None:
    """Close the socket of an association the peer dropped.

    pynetdicom's ``AssociationSocket._shutdown_socket`` calls ``shutdown()`` and ``close()`` in one
    try block; when the peer is already gone ``shutdown()`` raises ENOTCONN and the socket is never
    closed (a ResourceWarning, an error under this test suite).
    """
    sock = getattr(assoc.dul.socket, "socket", None) if assoc.dul.socket is not None else None
    if sock is not None:
        sock.close()


def rejection(assoc: Any) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


# --------------------------------------------------------------------------- storescu, bytes


def test_storescu_ct_series_is_durable_and_byte_exact(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig()
    files = ct_series(tmp_path / "in")

    proc = storescu(rig.port, *map(str, files))

    assert proc.returncode == 0, proc.stderr
    rows = {r["sop_instance_uid"]: r for r in rig.rows()}
    assert len(rows) == len(files)
    assert sorted(i.sop_instance_uid for i in rig.instances) == sorted(rows)  # once each
    for f in files:
        uid = str(file_meta(f).MediaStorageSOPInstanceUID)
        row = rows[uid]
        stored = Path(row["path"])
        assert stored == rig.spool.root / row["study_uid"] / row["series_uid"] / f"{uid}.dcm"
        assert data_set_bytes(stored) == data_set_bytes(f)  # the data set as sent, not re-encoded
        assert row["transfer_syntax"] == "1.2.840.10008.1.2.1"
        assert row["size"] == stored.stat().st_size
        assert row["calling_ae"] == "STORESCU" and row["modality"] == "CT"
    assert [i.instance_number for i in rig.spool.instances_for_series(rig.instances[0].series_uid)] == [1, 2, 3, 4]
    assert rig.temp_files() == []
    assert rig.events == []


def test_compressed_syntaxes_are_stored_as_sent(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    """RLE and JPEG lossless made by DCMTK (sent by storescu) and pydicom's bundled JPEG, JPEG-LS,
    JPEG 2000, RLE, deflated and big endian files (sent raw by pynetdicom) keep their syntax."""
    rig = make_rig()
    src = ct_series(tmp_path / "in", n=2)
    rle, jpeg = tmp_path / "rle.dcm", tmp_path / "jpeg70.dcm"
    subprocess.run([require_binary("dcmcrle"), str(src[0]), str(rle)], check=True, capture_output=True)
    subprocess.run([require_binary("dcmcjpeg"), str(src[1]), str(jpeg)], check=True, capture_output=True)
    # storescu only sends a compressed file on a context proposing its syntax: -xr RLE, -xs JPEG .70
    assert storescu(rig.port, "-xr", str(rle)).returncode == 0
    assert storescu(rig.port, "-xs", str(jpeg)).returncode == 0

    bundled = [with_fresh_uid(Path(get_testdata_file(n)), tmp_path / "bundled", k) for k, n in enumerate((
        "MR_small_RLE.dcm",  # .5
        "MR_small_jp2klossless.dcm",  # .4.90
        "JPEG2000.dcm",  # .4.91
        "MR_small_jpeg_ls_lossless.dcm",  # .4.80
        "SC_rgb_jpeg_dcmtk.dcm",  # .4.50
        "JPGExtended.dcm",  # .4.51
        "SC_rgb_jpeg_gdcm.dcm",  # .4.70
        "MR_small_bigendian.dcm",  # .2.2
        "image_dfl.dcm",  # .1.99 deflated
    ))]
    statuses = scu_store(rig.port, bundled)
    assert statuses == [0x0000] * len(bundled)

    by_uid = {r["sop_instance_uid"]: r for r in rig.rows()}
    for f in [rle, jpeg, *bundled]:
        meta = file_meta(f)
        row = by_uid[str(meta.MediaStorageSOPInstanceUID)]
        assert row["transfer_syntax"] == str(meta.TransferSyntaxUID)
        stored = Path(row["path"])
        assert str(file_meta(stored).TransferSyntaxUID) == str(meta.TransferSyntaxUID)
        assert data_set_bytes(stored) == data_set_bytes(f), f.name


def test_chunked_receive_mode_stores_the_same_bytes(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    before = _config.STORE_RECV_CHUNKED_DATASET
    rig = make_rig(chunked_receive=True)
    assert _config.STORE_RECV_CHUNKED_DATASET is True
    files = [*ct_series(tmp_path / "in", n=2), Path(get_testdata_file("MR_small_jp2klossless.dcm"))]
    assert scu_store(rig.port, files) == [0, 0, 0]
    for f in files:
        stored = rig.spool.get(str(file_meta(f).MediaStorageSOPInstanceUID))
        assert stored is not None and data_set_bytes(stored.path) == data_set_bytes(f)
    rig.listener.stop()
    assert _config.STORE_RECV_CHUNKED_DATASET is before


def test_duplicate_sop_instance_uid_keeps_the_first(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig()
    [f] = ct_series(tmp_path / "in", n=1)
    assert scu_store(rig.port, [f]) == [0]
    assert storescu(rig.port, str(f)).returncode == 0
    assert scu_store(rig.port, [f, f]) == [0, 0]
    assert len(rig.rows()) == 1
    assert len(rig.spooled_files()) == 1
    assert len(rig.instances) == 1  # on_instance only for the new one
    assert rig.rows()[0]["calling_ae"] == "TEST_SCU"
    assert rig.temp_files() == []


# --------------------------------------------------------------------------- association control


def test_calling_and_called_ae_title_control(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(allowed_callers=["STORESCU", "TEST_SCU", "IPAE@127.0.0.1", "NETAE@127.0.0.0/8",
                                    "FARAE@10.9.9.9"])
    [f] = ct_series(tmp_path / "in", n=1)

    # unknown calling AE: storescu fails, pynetdicom sees rejected-permanent / service-user / reason 3
    proc = storescu(rig.port, str(f), calling="INTRUDER")
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr
    assoc = associate(rig.port, calling="INTRUDER")
    assert assoc.is_rejected and rejection(assoc) == (0x01, 0x01, 0x03)
    # allowed title, but only from another address
    assoc = associate(rig.port, calling="FARAE")
    assert assoc.is_rejected and rejection(assoc) == (0x01, 0x01, 0x03)
    # wrong called AE: reason 7
    proc = storescu(rig.port, str(f), called="NOT_US")
    assert proc.returncode != 0 and "Called AE Title Not Recognized" in proc.stderr
    assoc = associate(rig.port, called="NOT_US")
    assert assoc.is_rejected and rejection(assoc) == (0x01, 0x01, 0x07)
    assert rig.rows() == []

    # IP-qualified entries work from 127.0.0.1 (exact address and network)
    for aet in ("IPAE", "NETAE", "TEST_SCU"):
        assoc = associate(rig.port, calling=aet)
        assert assoc.is_established, aet
        assoc.release()
    assert storescu(rig.port, str(f)).returncode == 0
    assert len(rig.rows()) == 1

    # pynetdicom reports its own rejections (reason 7) after sending the A-ASSOCIATE-RJ: the peer
    # may see it before the event is recorded, so wait, and compare without order
    wait_for(lambda: len(rig.events) >= 5)
    kinds = sorted((e.kind, e.fields["calling_ae"], e.fields["diagnostic"]) for e in rig.events)
    assert kinds == sorted([
        ("association.rejected", "INTRUDER", 3),
        ("association.rejected", "INTRUDER", 3),
        ("association.rejected", "FARAE", 3),
        ("association.rejected", "STORESCU", 7),
        ("association.rejected", "TEST_SCU", 7),
    ])
    assert [e.fields["reason"] for e in rig.events if e.fields["calling_ae"] == "FARAE"] == [
        "calling AE title not allowed from this address"]


def test_open_listener_warns_once_and_max_associations(make_rig: Callable[..., Rig],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    rig = make_rig(max_associations=1)
    assert [r.getMessage() for r in caplog.records].count("listener.open_to_any_caller") == 1
    first = associate(rig.port)
    assert first.is_established
    try:
        second = associate(rig.port)
        # rejected-transient, service-provider (presentation), local limit exceeded
        assert second.is_rejected and rejection(second) == (0x02, 0x03, 0x02)
    finally:
        first.release()
    wait_for(lambda: any(e.kind == "association.rejected" and e.fields["diagnostic"] == 2 for e in rig.events))


def test_bad_allowed_caller_address_is_a_config_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", tmp_path / "q", connect(tmp_path / "db"), 0)
    with pytest.raises(ConfigError, match="allowed_callers"):
        DicomListener(DicomConfig(allowed_callers=["PACS@not-an-ip"]), spool, [CT_IMAGE], print, print)


# --------------------------------------------------------------------------- everything pydicom ships


def _bundled_files() -> list[tuple[Path, str, str]]:
    # glob DATA_ROOT, not get_testdata_files(): that one also looks for the external pydicom-data
    # files and, offline, retries downloads for about a minute
    out = []
    for p in sorted((Path(DATA_ROOT) / "test_files").rglob("*.dcm")):
        try:
            meta = file_meta(p)
        except Exception:  # noqa: BLE001 - not a Part 10 file: not one "with a SOP class"
            continue
        sop, ts = meta.get("MediaStorageSOPClassUID"), meta.get("TransferSyntaxUID")
        if sop and ts and meta.get("MediaStorageSOPInstanceUID"):
            out.append((p, str(sop), str(ts)))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")  # odd files are pydicom's point
def test_every_bundled_file_gets_a_proper_status(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(ALL_STORAGE_SOP_CLASSES)
    files = _bundled_files()
    assert len(files) > 50
    # a storescu profile proposing each file's own (SOP class, transfer syntax) pair
    syntaxes = sorted({ts for _, _, ts in files})
    pairs = list(dict.fromkeys((sop, ts) for _, sop, ts in files))
    assert len(pairs) <= 128
    cfg = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        cfg += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    cfg += ["[[PresentationContexts]]", "[Files]"]
    cfg += [f"PresentationContext{k} = {sop}\\TS{syntaxes.index(ts)}" for k, (sop, ts) in enumerate(pairs, 1)]
    cfg += ["[[Profiles]]", "[Files]", "PresentationContexts = Files"]
    (tmp_path / "scu.cfg").write_text("\n".join(cfg) + "\n")

    # -nh: go on after a failed store; storescu itself refuses to read a few broken files
    proc = storescu(rig.port, "-nh", "-xf", str(tmp_path / "scu.cfg"), "Files", *(str(p) for p, _, _ in files))
    assert "Association Abort" not in proc.stderr, proc.stderr[-2000:]
    assert len(rig.rows()) > 25

    # per-file statuses through our own SCU (raw bytes, so broken headers reach the listener too)
    report = send_files([p for p, _, _ in files], HOST, rig.port)
    assert set(report.statuses.values()) <= {0x0000, 0xC210, 0xC211, None}, report.errors
    assert report.sent > 50
    for event in rig.events:
        assert event.fields["status"] in (0xC210, 0xC211), event
        if event.kind == "instance.quarantined":
            q = rig.spool.quarantine_dir / f"{event.fields['quarantine_id']}.dcm"
            assert q.exists() and q.with_suffix(".json").exists()
    # every stored row points at a file with its own syntax, and the listener still answers
    for row in rig.rows():
        assert str(file_meta(Path(row["path"])).TransferSyntaxUID) == row["transfer_syntax"]
    assert echoscu(rig.port).returncode == 0
    assert rig.temp_files() == []


# --------------------------------------------------------------------------- failures


def test_free_space_floor_answers_a700_and_keeps_nothing(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    free = {"bytes": 600 * 1024 * 1024}
    rig = make_rig(min_free_mb=500, disk_usage=lambda p: SimpleNamespace(free=free["bytes"]))
    files = ct_series(tmp_path / "in", n=2)

    free["bytes"] = 400 * 1024 * 1024  # below the floor
    assert scu_store(rig.port, files[:1]) == [0xA700]
    # 500.02 MB free, floor 500 MB, a 39 KB instance would cross it: refused too
    free["bytes"] = 500 * 1024 * 1024 + 20 * 1024
    assert scu_store(rig.port, files[:1]) == [0xA700]
    # DCMTK 3.6.7 storescu prints nothing about a refused store unless -v; it exits 167
    proc = storescu(rig.port, "-v", str(files[0]))
    assert proc.returncode != 0 and "Refused: OutOfResources" in proc.stderr, proc.stderr
    assert rig.rows() == [] and rig.spooled_files() == [] and rig.temp_files() == []
    assert list(rig.spool.quarantine_dir.iterdir()) == []
    assert [(e.kind, e.severity, e.fields["status"]) for e in rig.events] == [("dicom.rejected", "error", 0xA700)] * 3

    free["bytes"] = 2 * GB  # space freed: the next store goes through
    assert scu_store(rig.port, files) == [0, 0]
    assert len(rig.rows()) == 2


def _broken_file(dst: Path, *, drop: Sequence[str] = (), garbage: bytes | None = None,
                 sop_class: str = CT_IMAGE) -> Path:
    """A Part 10 file with valid file meta whose data set lacks ``drop`` or is ``garbage``."""
    [src] = ct_series(dst.parent / f"src-{dst.stem}", n=1)
    ds = pydicom.dcmread(src)
    for kw in drop:
        delattr(ds, kw)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(dst, enforce_file_format=True)
    if garbage is not None:
        raw = dst.read_bytes()
        dst.write_bytes(raw[: dataset_offset(io.BytesIO(raw))] + garbage)
    return dst


def test_malformed_instances_are_quarantined_and_the_next_store_succeeds(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = make_rig()
    no_series = _broken_file(tmp_path / "noseries.dcm", drop=["SeriesInstanceUID"])
    no_pixels = _broken_file(tmp_path / "nopixels.dcm", drop=["PixelData"])
    garbage = _broken_file(tmp_path / "garbage.dcm", garbage=b"\xde\xad\xbe\xef" * 64 + b"\x01")
    bad = [no_series, no_pixels, garbage]

    assert scu_store(rig.port, bad) == [0xC210] * 3
    assert rig.rows() == [] and rig.spooled_files() == []
    quarantined = [e for e in rig.events if e.kind == "instance.quarantined"]
    assert len(quarantined) == 3
    for f, event in zip(bad, quarantined, strict=True):
        qid = event.fields["quarantine_id"]
        q = rig.spool.quarantine_dir / f"{qid}.dcm"
        assert data_set_bytes(q) == data_set_bytes(f)  # the raw bytes as received
        sidecar = json.loads(q.with_suffix(".json").read_text())
        assert sidecar["reason"] == event.fields["reason"] and sidecar["calling_ae"] == "TEST_SCU"
        assert sidecar["media_storage_sop_instance_uid"] == str(file_meta(f).MediaStorageSOPInstanceUID)
        assert event.fields["status"] == 0xC210
    reasons = [e.fields["reason"] for e in quarantined]
    assert "missing SeriesInstanceUID" in reasons[0]
    assert "no pixel data" in reasons[1]
    qrows = rig.spool._journal.conn.execute("SELECT * FROM quarantine").fetchall()
    assert len(qrows) == 3 and all(Path(r["path"]).exists() for r in qrows)

    [good] = ct_series(tmp_path / "good", n=1)
    assert scu_store(rig.port, [good]) == [0]
    assert len(rig.rows()) == 1 and rig.temp_files() == []


def test_sop_class_not_accepted_answers_c211(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    # the presentation context (from the file meta) says CT, the data set says Secondary Capture
    rig = make_rig([CT_IMAGE])
    [src] = ct_series(tmp_path / "in", n=1)
    ds = pydicom.dcmread(src)
    ds.SOPClassUID = SC_IMAGE
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    f = tmp_path / "sc_as_ct.dcm"
    ds.save_as(f, enforce_file_format=False)  # True would "fix" the meta from the data set
    assert str(file_meta(f).MediaStorageSOPClassUID) == CT_IMAGE
    assert scu_store(rig.port, [f]) == [0xC211]
    assert rig.rows() == [] and rig.temp_files() == []
    assert [(e.kind, e.fields["status"]) for e in rig.events] == [("dicom.rejected", 0xC211)]


def test_unexpected_error_answers_c001_and_the_server_keeps_serving(
    make_rig: Callable[..., Rig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = make_rig()
    files = ct_series(tmp_path / "in", n=2)
    real = rig.spool.store_bytes
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(rig.spool, "store_bytes", flaky)
    caplog.set_level(logging.ERROR, logger="agent")
    assert scu_store(rig.port, files) == [0xC001, 0x0000]
    assert [(e.kind, e.severity, e.fields["status"]) for e in rig.events] == [("dicom.rejected", "error", 0xC001)]
    assert "RuntimeError" in rig.events[0].fields["reason"]
    assert any(r.getMessage() == "store.failed" and r.exc_info for r in caplog.records)
    assert echoscu(rig.port).returncode == 0


def test_failing_observers_do_not_change_the_answer(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig()

    def boom(_: object) -> None:
        raise RuntimeError("observer bug")

    rig.listener.state.on_instance = boom
    rig.listener.state.on_event = boom
    files = ct_series(tmp_path / "in", n=1)
    assert scu_store(rig.port, files) == [0]
    assert scu_store(rig.port, [_broken_file(tmp_path / "b.dcm", drop=["StudyInstanceUID"])]) == [0xC210]
    assert len(rig.rows()) == 1


# --------------------------------------------------------------------------- privacy


def test_no_patient_fields_in_logs_events_journal_or_sidecars(
    make_rig: Callable[..., Rig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, pynetdicom included
    rig = make_rig()
    good = ct_series(tmp_path / "in", n=2)
    bad = _broken_file(tmp_path / "bad.dcm", drop=["SeriesInstanceUID"])
    assert scu_store(rig.port, [*good, bad]) == [0, 0, 0xC210]
    assert storescu(rig.port, str(good[0])).returncode == 0
    rig.listener.stop()  # association summaries are logged on close

    assert PHI_NAME in good[0].read_bytes().decode("latin-1")  # the data do carry it
    fmt = KeyValueFormatter()
    text = "\n".join(
        [fmt.format(r) for r in caplog.records]
        + [repr(e) for e in rig.events]
        + [repr(i) for i in rig.instances]
        + list(rig.spool._journal.conn.iterdump())
        + [p.read_text() for p in rig.spool.quarantine_dir.glob("*.json")]
    )
    assert "instance.quarantined" in text and "association.closed" in text
    for needle in (PHI_NAME, "Zzyzxqua", "Vortigern", PHI_ID, PHI_BIRTH):
        assert needle not in text


# --------------------------------------------------------------------------- TLS


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp / f"{name}.crt", tmp / f"{name}.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def test_tls_store_with_client_certificates(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    server_crt, server_key = _self_signed(tmp_path, "server")
    client_crt, client_key = _self_signed(tmp_path, "client")
    tls = TlsConfig(enabled=True, certfile=server_crt, keyfile=server_key, cafile=client_crt,
                    require_client_cert=True)
    rig = make_rig(tls=tls, acse_timeout_s=5, network_timeout_s=5)
    files = ct_series(tmp_path / "in", n=2)

    def client_ctx(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_crt))
        if with_cert:
            ctx.load_cert_chain(str(client_crt), str(client_key))
        return ctx

    # a peer that connects and says nothing must not hold up the others: pynetdicom does the
    # server handshake in its accept loop unless the handshake is deferred (see scp.py)
    silent = socket.create_connection((HOST, rig.port))
    try:
        t0 = time.monotonic()
        assert scu_store(rig.port, files, tls=(client_ctx(True), "localhost")) == [0, 0]
        assert time.monotonic() - t0 < 4
    finally:
        silent.close()
    assert len(rig.rows()) == 2

    # plain TCP to the TLS port, and TLS without a client certificate: no association
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ae.add_requested_context(CTImageStorage)
    plain = ae.associate(HOST, rig.port, ae_title=AET)
    assert not plain.is_established
    no_cert = ae.associate(HOST, rig.port, ae_title=AET, tls_args=(client_ctx(False), "localhost"))
    assert not no_cert.is_established
    for failed in (plain, no_cert):
        close_client_socket(failed)
    assert len(rig.rows()) == 2
    assert echoscu(rig.port).returncode != 0  # DCMTK without TLS cannot talk to it either


def test_tls_config_errors_name_the_key(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", tmp_path / "q", connect(tmp_path / "db"), 0)
    with pytest.raises(ConfigError, match="certfile and keyfile"):
        DicomListener(DicomConfig(tls=TlsConfig(enabled=True)), spool, [CT_IMAGE], print, print)
    crt, key = _self_signed(tmp_path, "srv")
    with pytest.raises(ConfigError, match="cafile"):
        DicomListener(DicomConfig(tls=TlsConfig(enabled=True, certfile=crt, keyfile=key, require_client_cert=True)),
                      spool, [CT_IMAGE], print, print)
    with pytest.raises(ConfigError, match="cannot load"):
        DicomListener(DicomConfig(tls=TlsConfig(enabled=True, certfile=key, keyfile=key)),
                      spool, [CT_IMAGE], print, print)


# --------------------------------------------------------------------------- SCU


def test_send_files_expands_directories_and_reports_per_file(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(allowed_callers=["EDGE_SCU"])
    ct = ct_series(tmp_path / "send" / "ct", n=3)
    nested = tmp_path / "send" / "deep" / "er"
    nested.mkdir(parents=True)
    rle = nested / "mr_rle.dcm"
    rle.write_bytes(Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes())
    readme = tmp_path / "send" / "README.txt"
    readme.write_text("not dicom")

    report = send_files([tmp_path / "send"], HOST, rig.port)

    # found by the directory scan: skipped with its reason, not a failure
    assert report.sent == 4 and report.failed == 0 and report.ok
    assert readme not in report.statuses and "not a DICOM" in report.skipped[readme]
    assert all(report.statuses[p] == 0 for p in [*ct, rle])
    # named explicitly: a failure
    named = send_files([readme, ct[0]], HOST, rig.port)
    assert named.failed == 1 and not named.ok and named.statuses[readme] is None
    assert "not a DICOM" in named.errors[readme] and not named.skipped
    assert report.elapsed_s > 0
    stored = rig.spool.get(str(file_meta(rle).MediaStorageSOPInstanceUID))
    assert stored is not None and stored.transfer_syntax == "1.2.840.10008.1.2.5"
    assert data_set_bytes(stored.path) == data_set_bytes(rle)


def test_send_files_names_the_rejection_reason(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(allowed_callers=["PACS"])
    files = ct_series(tmp_path / "in", n=1)
    with pytest.raises(DicomError, match="Calling AE title not recognised"):
        send_files(files, HOST, rig.port)
    with pytest.raises(DicomError, match="Called AE title not recognised"):
        send_files(files, HOST, rig.port, calling_aet="PACS", called_aet="SOMEONE")
    port = rig.port
    rig.listener.stop()
    with warnings.catch_warnings():
        # pynetdicom 3.0 drops (without closing) its socket when the connection is refused:
        # AssociationSocket.connect -> _shutdown_socket raises ENOTCONN before close()
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(DicomError, match="could not associate"):
            send_files(files, HOST, port, calling_aet="PACS", timeout=2)
        gc.collect()


# --------------------------------------------------------------------------- spool units


def _ct_bytes(tmp_path: Path, n: int = 1) -> list[bytes]:
    return [p.read_bytes() for p in ct_series(tmp_path / f"b{n}", n=n)]


def test_spool_restart_removes_temps_and_reconcile_indexes_orphans(tmp_path: Path) -> None:
    conn = connect(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool", tmp_path / "q", conn, 0)
    a, b = _ct_bytes(tmp_path, 2)
    inst, created = spool.store_bytes(a, calling_ae="X")
    assert created
    # crash leftovers: a temp (never acknowledged) and a renamed file whose row never landed
    (spool.tmp_dir / "dead.part").write_bytes(b"partial")
    orphan_ds = pydicom.dcmread(io.BytesIO(b))
    orphan = spool.root / orphan_ds.StudyInstanceUID / orphan_ds.SeriesInstanceUID / f"{orphan_ds.SOPInstanceUID}.dcm"
    orphan.write_bytes(b)

    spool2 = Spool(tmp_path / "spool", tmp_path / "q", conn, 0)
    assert list(spool2.tmp_dir.iterdir()) == []
    assert spool2.reconcile() == 1
    assert spool2.reconcile() == 0
    assert {i.sop_instance_uid for i in spool2.instances_for_series(inst.series_uid)} == {
        inst.sop_instance_uid, orphan_ds.SOPInstanceUID}


def test_spool_delete_series_removes_rows_files_and_dirs(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "db"), 0)
    blobs = _ct_bytes(tmp_path, 3)
    insts = [spool.store_bytes(b)[0] for b in blobs]
    series = insts[0].series_uid
    assert spool.delete_series(series) == 3
    assert spool.instances_for_series(series) == [] and spool.count() == 0
    assert not (spool.root / insts[0].study_uid).exists()
    assert spool.delete_series(series) == 0


def test_retention_spares_an_instance_stored_after_the_janitor_chose_the_series(tmp_path: Path) -> None:
    """The janitor reads the newest arrival, forgets the series, then deletes: an instance
    acknowledged in between keeps its row and its file."""
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "db"), 0)
    blobs = _ct_bytes(tmp_path, 4)
    insts = [spool.store_bytes(b)[0] for b in blobs[:3]]
    series = insts[0].series_uid
    newest = spool.last_received_at(series)
    assert newest == max(i.received_at for i in insts)
    time.sleep(0.01)
    late = spool.store_bytes(blobs[3])[0]  # acknowledged to the PACS after the janitor's choice
    assert spool.delete_series(series, received_at_or_before=newest) == 3
    left = spool.instances_for_series(series)
    assert [i.sop_instance_uid for i in left] == [late.sop_instance_uid] and late.path.exists()
    assert all(not i.path.exists() for i in insts)
    assert spool.last_received_at("1.2.3.unknown") is None


def test_series_summary_gives_one_record_per_series_and_reads_safely_during_stores(tmp_path: Path) -> None:
    ticks = iter(range(1000, 1100))
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "db"), 0,
                  clock=lambda: float(next(ticks)))
    assert spool.series_summary() == []
    three = _ct_bytes(tmp_path, 3)
    ds = pydicom.dcmread(io.BytesIO(_ct_bytes(tmp_path, 1)[0]))
    ds.SeriesDescription, ds.BodyPartExamined = "AXIAL 5mm", "CHEST"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    first = [spool.store_bytes(b)[0] for b in three]
    single, _ = spool.store_bytes(buf.getvalue())
    assert spool.store_bytes(three[0])[1] is False  # a duplicate is not counted twice
    by_size = sorted(spool.series_summary(), key=lambda s: s.instances)
    assert by_size == [
        SpooledSeries(single.series_uid, single.study_uid, "CT", "AXIAL 5mm", "CHEST", 1, 1003.0),
        SpooledSeries(first[0].series_uid, first[0].study_uid, "CT", "", "", 3, 1002.0),
    ]

    # the listener's threads store while the service reads: both go through the spool's lock
    more = _ct_bytes(tmp_path, 8)
    with ThreadPoolExecutor(max_workers=5) as pool:
        reader = pool.submit(lambda: [spool.series_summary() for _ in range(200)])
        stored = list(pool.map(spool.store_bytes, more))
        reader.result()
    assert all(created for _, created in stored)
    assert sorted(s.instances for s in spool.series_summary()) == [1, 3, 8]
    spool.close()


def test_spool_copies_when_it_cannot_link_and_maps_enospc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "db"), 0)
    [src] = ct_series(tmp_path / "in", n=1)

    def no_link(*_: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    inst, created = spool.store_file(src, calling_ae="X")
    assert created and src.exists() and inst.path.read_bytes() == src.read_bytes()

    def full(_: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # the store path's only flush is the pool file's fdatasync; fsync covers directories
    monkeypatch.setattr(os, "fdatasync", full)
    monkeypatch.setattr(os, "fsync", full)
    blob = _ct_bytes(tmp_path, 1)[0]
    with pytest.raises(OutOfSpaceError):
        spool.store_bytes(blob)
    assert list(spool.tmp_dir.iterdir()) == [] and pool_leftovers(spool) == []
    assert spool.count() == 1
    monkeypatch.undo()
    spool.close()


def test_spool_rejects_non_dicom_and_hashes_unsafe_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "db"), 0)
    with pytest.raises(QuarantinedError) as info:
        spool.store_bytes(b"this is not DICOM at all", calling_ae="X")
    assert isinstance(info.value, MalformedDicomError) and info.value.status == 0xC210
    assert info.value.path.read_bytes() == b"this is not DICOM at all"

    [src] = ct_series(tmp_path / "in", n=1)
    ds = pydicom.dcmread(src)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly objects to this UID; we want it anyway
        ds.SeriesInstanceUID = "../../escape"
        ds.save_as(buf, enforce_file_format=True)
    inst, _ = spool.store_bytes(buf.getvalue())
    assert inst.series_uid == "../../escape"
    assert inst.path.parent.parent.parent == spool.root and ".." not in inst.path.parts


def test_fast_file_meta_matches_pynetdicom_byte_for_byte() -> None:
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from agent.ingest.scp import part10_bytes

    stream = b"\x08\x00\x16\x00UI\x04\x001.2\x00"
    for sop_class, sop_instance, ts in (
        (CT_IMAGE, generate_uid(), "1.2.840.10008.1.2.1"),  # odd / even lengths both ways
        (MR_IMAGE, "1.2.3.44", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5", "1.2.840.10008.1.2.4.50"),
    ):
        event = SimpleNamespace(
            request=SimpleNamespace(AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop_instance,
                                    DataSet=io.BytesIO(stream)),
            context=SimpleNamespace(transfer_syntax=ts),
        )
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=ts)
        assert part10_bytes(event) == bytes(128) + b"DICM" + encode_file_meta(meta) + stream  # type: ignore[arg-type]
    # anything but a plain UID goes through pynetdicom (and pydicom's handling of odd values)
    odd = SimpleNamespace(request=SimpleNamespace(AffectedSOPClassUID=CT_IMAGE, AffectedSOPInstanceUID="1.2.x",
                                                  DataSet=io.BytesIO(stream)),
                          context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"),
                          encoded_dataset=lambda include_meta: b"via pynetdicom")
    assert part10_bytes(odd) == b"via pynetdicom"  # type: ignore[arg-type]


def test_sop_class_helpers() -> None:
    assert resolve_sop_class("EnhancedCTImageStorage") == "1.2.840.10008.5.1.4.1.1.2.1"
    assert resolve_sop_class(CT_IMAGE) == CT_IMAGE
    with pytest.raises(ValueError):
        resolve_sop_class("NoSuchStorage")
    assert is_image_storage(CT_IMAGE) and not is_image_storage("1.2.840.10008.5.1.4.1.1.481.5")
    assert set(DEFAULT_STORAGE_SOP_CLASSES) <= set(ALL_STORAGE_SOP_CLASSES)
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
               "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
               "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
               "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"):
        assert ts in TRANSFER_SYNTAXES


def test_address_rejections_reach_the_peer_and_leak_no_threads(make_rig: Callable[..., Rig]) -> None:
    # the rejection sent from EVT_REQUESTED must arrive as an A-ASSOCIATE-RJ (see handle_requested)
    rig = make_rig(allowed_callers=["TEST_SCU", "FAR@192.0.2.1"])
    before = threading.active_count()
    for aet in ("NOPE", "FAR") * 3:
        assert rejection(associate(rig.port, calling=aet)) == (0x01, 0x01, 0x03)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


# --------------------------------------------------------------------------- spool crash recovery


def _restart(tmp_path: Path, spool: Spool) -> Spool:
    """The spool as a new process would open it after a crash: new connection, then reconcile()."""
    spool.close()
    return Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0)


def _final_path(spool: Spool, blob: bytes) -> tuple[Path, str]:
    ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
    return spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm", ds.SOPInstanceUID


def test_reconcile_moves_a_filled_pool_file_into_place_and_journals_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0)
    a, b = _ct_bytes(tmp_path, 2)
    spool.store_bytes(a)
    # a crash after fdatasync (the peer may have had its Success) but before the rename
    pooled = spool._take_pool_file()
    write_marked(pooled, memoryview(b))
    final, uid = _final_path(spool, b)

    spool2 = _restart(tmp_path, spool)
    assert spool2.get(uid) is None
    assert spool2.reconcile() == 1
    inst = spool2.get(uid)
    assert inst is not None and inst.path == final and final.is_file() and not pooled.exists()
    assert data_set_bytes(final) == data_set_bytes(tmp_path / "b2" / "ct1.dcm")
    assert inst.size == final.stat().st_size == len(b)
    assert spool2.reconcile() == 0 and spool2.count() == 2
    spool2.close()


def test_reconcile_drops_torn_pool_files_and_keeps_empty_ones(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0, pool_size=4)
    a, b = _ct_bytes(tmp_path, 2)
    # crashes during the write, before fdatasync returned (never acknowledged): a marked file cut
    # short, a marked file with a zeroed page (writeback out of order), and bytes with no mark
    short, holed, unmarked = (spool._take_pool_file() for _ in range(3))
    write_marked(short, memoryview(a))
    os.truncate(short, len(a) // 2)
    write_marked(holed, memoryview(b))
    with open(holed, "r+b") as f:
        f.seek(len(b) - 8192)
        f.write(bytes(4096))
    unmarked.write_bytes(a)
    empty = [p for p in spool.pool_dir.iterdir() if p.stat().st_size == 0]
    assert empty

    spool2 = _restart(tmp_path, spool)
    assert spool2.reconcile() == 0
    assert spool2.count() == 0 and not any(spool2.root.glob("1*"))  # nothing placed, no study dir
    assert not short.exists() and not holed.exists() and not unmarked.exists()
    assert all(p.exists() and p.stat().st_size == 0 for p in empty)  # left for reuse
    # the pool still serves stores afterwards
    inst, created = spool2.store_bytes(a)
    assert created and data_set_bytes(inst.path) == data_set_bytes(tmp_path / "b2" / "ct0.dcm")
    spool2.close()


def test_reconcile_journals_a_spooled_file_whose_row_was_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0)
    a, b = _ct_bytes(tmp_path, 2)
    kept, _ = spool.store_bytes(a)
    lost, _ = spool.store_bytes(b, calling_ae="PACS")
    # synchronous=NORMAL: the last commits may be gone after a power loss, the renamed file is not
    spool._journal.conn.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (lost.sop_instance_uid,))

    spool2 = _restart(tmp_path, spool)
    assert spool2.reconcile() == 1
    again = spool2.get(lost.sop_instance_uid)
    assert again is not None and again.path == lost.path and again.size == lost.size
    assert again.series_uid == lost.series_uid and again.instance_number == lost.instance_number
    assert spool2.get(kept.sop_instance_uid) == kept
    spool2.close()


def test_spool_journal_is_normal_sync_and_store_writes_one_marked_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0)
    assert spool._journal.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    [blob] = _ct_bytes(tmp_path, 1)
    inst, created = spool.store_bytes(blob)
    stored = inst.path.read_bytes()
    assert created and stored[:16] == b"edge-agent:spool" and stored[128:] == blob[128:]
    assert pydicom.dcmread(inst.path).SOPInstanceUID == inst.sop_instance_uid  # readers skip the mark
    # a duplicate is answered from the journal; its pool copy is dropped
    assert spool.store_bytes(blob) == (inst, False)
    assert pool_leftovers(spool) == [] and spool.count() == 1 and inst.path.read_bytes() == stored
    spool.close()


def test_refused_sop_class_is_unmarked_so_a_crash_cannot_resurrect_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.ingest.spool import pool as pool_mod

    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0)
    [blob] = _ct_bytes(tmp_path, 1)
    # the crash comes before the refused pool file's removal reaches the disk
    monkeypatch.setattr(pool_mod, "remove_quietly", lambda p: None)
    with pytest.raises(UnsupportedDicomError):
        spool.store_bytes(blob, sop_classes={MR_IMAGE})
    [left] = pool_leftovers(spool)
    assert left.read_bytes()[:16] == bytes(16) and left.read_bytes()[128:] == blob[128:]
    monkeypatch.undo()

    spool2 = _restart(tmp_path, spool)
    assert spool2.reconcile() == 0 and spool2.count() == 0 and not left.exists()
    spool2.close()


def test_pool_refills_in_the_background_and_directories_get_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.core import util

    synced: list[Path] = []
    real = util.fsync_dir

    def recording_fsync_dir(d: Path | str) -> None:
        synced.append(Path(d))
        real(d)

    # every part of the spool looks util.fsync_dir up at call time
    monkeypatch.setattr(util, "fsync_dir", recording_fsync_dir)
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0,
                  pool_size=4, sync_interval_s=0.05)

    def free() -> int:
        return sum(1 for p in spool.pool_dir.iterdir() if p.stat().st_size == 0)

    assert free() == 4
    insts = [spool.store_bytes(b)[0] for b in _ct_bytes(tmp_path, 7)]
    series_dir = insts[0].path.parent
    # the first store had to create the series directory (and fsync its parent) itself; the
    # renames into it are made durable by the background thread, as is the refill
    wait_for(lambda: free() >= 2 and series_dir in synced and spool._sync.pending() == 0)
    assert spool.pool_dir in synced
    assert pool_leftovers(spool) == [] and spool.count() == 7
    spool.close()
    assert not spool._sync.running
    # after close() a store syncs its own directory
    synced.clear()
    spool.store_bytes(_ct_bytes(tmp_path, 1)[0])
    assert spool.pool_dir in synced


def test_failed_pool_write_leaves_nothing_and_pool_survives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0, pool_size=2)
    a, b = _ct_bytes(tmp_path, 2)

    def eio(_: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(StorageError) as info:
        spool.store_bytes(a)
    assert not isinstance(info.value, OutOfSpaceError)
    assert pool_leftovers(spool) == [] and spool.count() == 0
    monkeypatch.undo()
    # the failed file was dropped, not reused; the next stores still work (created inline if need be)
    assert [spool.store_bytes(x)[1] for x in (a, b)] == [True, True]
    spool.close()


_CRASH_CHILD = """
import os, signal, sys
from pathlib import Path
from agent.core.db import connect
from agent.ingest.spool import Spool
root = Path(sys.argv[1])
spool = Spool(root / "spool", root / "q", connect(root / "state.db"), 0)
blobs = [Path(p).read_bytes() for p in sys.argv[2:]]
spool.store_bytes(blobs[0])
def die(*_a):
    # the process dies between fdatasync and rename: the spool never got to answer
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die
spool.store_bytes(blobs[1])
"""


def test_killed_between_fdatasync_and_rename_recovers_on_restart(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "in", n=2)
    proc = subprocess.run([sys.executable, "-c", _CRASH_CHILD, str(tmp_path), *map(str, files)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9, proc.stderr[-2000:]
    spool = Spool(tmp_path / "spool", tmp_path / "q", connect(tmp_path / "state.db"), 0)
    assert spool.count() == 1 and len(pool_leftovers(spool)) == 1
    assert spool.reconcile() == 1
    assert pool_leftovers(spool) == []
    for f in files:
        inst = spool.get(str(file_meta(f).MediaStorageSOPInstanceUID))
        assert inst is not None and data_set_bytes(inst.path) == data_set_bytes(f)
    spool.close()

