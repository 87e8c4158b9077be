"""Pull client against a REAL HTTP server on loopback serving a registry built here (Ed25519 keys
from cryptography, manifests in agent.core.manifest's schema): install + current switch, resume with
HTTP Range after an interrupted transfer, tampered files, bad signatures, server down, disk full,
rollback. Every failure must leave ``current`` as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core.config import RegistryConfig
from agent.core.errors import RegistryError
from agent.core.manifest import Manifest, canonical_json
from agent.device.probe import (
    BackendProbe,
    CpuInfo,
    DiskInfo,
    MemoryInfo,
    NvidiaInfo,
    OsInfo,
    Probe,
    _gpu,
)
from agent.updates import client as client_mod
from agent.updates.client import RegistryClient
from agent.updates.store import ModelStore

MODEL = "ct-test"

# --------------------------------------------------------------------------- registry builder


class Signer:
    """An Ed25519 key pair as ``edge-deploy keygen`` makes them (PEM public key on disk)."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.pub = tmp / f"{name}.pub"
        self.pub.write_bytes(self.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def _variant(vid: str, backend: str, precision: str, payload: bytes, requires: dict[str, Any] | None = None,
             speedup: float | None = None, selftest: bytes | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    file = f"{vid}.onnx"
    doc: dict[str, Any] = {
        "id": vid, "backend": backend, "precision": precision, "file": file,
        "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
        "execution_precision": precision, "requires": requires or {},
        "gate": {"passed": True, "validated_with": "onnxruntime", "n_samples": 4, "metrics": {"dice": 0.9}},
    }
    if precision == "int8" and backend != "tensorrt":  # proven by the publisher wherever it may run
        doc["isa_gates"] = {f: {"passed": True, "method": "native"} for f in ("x86-vnni", "x86-avx2", "arm-dotprod")}
    files = {file: payload}
    if speedup is not None:
        doc["bench"] = {"device": "test", "threads": 2, "speedup_vs_fp32": speedup}
    if selftest is not None:
        st = f"selftest/{vid}.npz"
        doc["selftest"] = {"file": st, "sha256": hashlib.sha256(selftest).hexdigest(), "size": len(selftest),
                           "input_shape": [1, 1, 8, 8, 8], "atol": 0.1, "rtol": 0.1}
        files[st] = selftest
    return doc, files


def default_variants(version: str) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
    tag = version.encode()
    return [
        _variant("fp32", "onnxruntime", "fp32", b"F" * 300_000 + tag, selftest=b"selftest-fp32" + tag),
        _variant("int8-vnni", "onnxruntime", "int8", b"V" * 120_000 + tag,
                 {"arch": ["x86_64"], "cpu_features": ["avx512_vnni"]}, speedup=2.1, selftest=b"st-vnni" + tag),
        _variant("int8-avx2", "onnxruntime", "int8", b"A" * 120_000 + tag,
                 {"arch": ["x86_64"], "cpu_features": ["avx2"]}, speedup=1.4),
        _variant("int8-arm", "onnxruntime", "int8", b"R" * 120_000 + tag,
                 {"arch": ["aarch64"], "cpu_features": ["asimddp"]}, speedup=1.9),
        _variant("ov-int8", "openvino", "int8", b"O" * 1000 + tag, {"arch": ["x86_64"]}, speedup=3.0),
        _variant("trt-fp8", "tensorrt", "fp8", b"T" * 1000 + tag,
                 {"gpu": True, "gpu_compute_capability_min": "8.9", "tensorrt_min": "10.0"}),
        _variant("trt-int8", "tensorrt", "int8", b"I" * 1000 + tag,
                 {"gpu": True, "gpu_compute_capability_min": "7.5", "tensorrt_min": "10.0"}),
    ]


def publish(root: Path, signer: Signer, version: str,
            variants: list[tuple[dict[str, Any], dict[str, bytes]]] | None = None,
            *, model: str = MODEL, fallback: str = "fp32") -> Path:
    """Write ``<model>/<version>/`` (files, manifest.json, manifest.json.sig) and re-sign index.json."""
    variants = variants if variants is not None else default_variants(version)
    vdir = root / model / version
    vdir.mkdir(parents=True, exist_ok=True)
    for _doc, files in variants:
        for rel, data in files.items():
            (vdir / rel).parent.mkdir(parents=True, exist_ok=True)
            (vdir / rel).write_bytes(data)
    doc = {"schema_version": 1, "name": model, "version": version, "created_at": "2025-01-01T00:00:00Z",
           "task": "segmentation", "spec": {"name": model}, "fallback": fallback,
           "variants": [d for d, _f in variants]}
    Manifest.model_validate(doc)  # the test registry must be in the documented shape
    raw = canonical_json(doc)
    (vdir / "manifest.json").write_bytes(raw)
    (vdir / "manifest.json.sig").write_bytes(signer.sign(raw))
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schema_version": 1, "updated_at": "2025-01-01T00:00:00Z", "models": {}}
    entry = index["models"].setdefault(model, {"latest": version, "versions": {}})
    entry["latest"] = version
    entry["versions"][version] = {"manifest": f"{model}/{version}/manifest.json",
                                  "sha256": hashlib.sha256(raw).hexdigest(),
                                  "created_at": "2025-01-01T00:00:00Z",
                                  "variants": [d["id"] for d, _f in variants]}
    index_raw = canonical_json(index)
    index_path.write_bytes(index_raw)
    (root / "index.json.sig").write_bytes(signer.sign(index_raw))
    return vdir


# ------------------------------------------------------------------------------- HTTP server


class RegistryHandler(BaseHTTPRequestHandler):
    """Static files with HTTP Range support; ``server.cut[path] = n`` sends only n bytes of the next
    response for that path and drops the connection (an interrupted download)."""

    server: RegistryServer

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        rng = self.headers.get("Range")
        self.server.requests.append((rel, rng))
        path = self.server.root / rel
        if not path.is_file() or ".." in rel.split("/"):
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data) - 1, 200
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            status = 206
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        cut = self.server.cut.pop(rel, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep pytest output clean
        return


class RegistryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), RegistryHandler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


def serve(root: Path) -> Iterator[RegistryServer]:
    """Serve ``root`` over HTTP on a loopback port until the generator is closed."""
    srv = RegistryServer(root)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RegistryServer]:
    root = tmp_path / "registry"
    root.mkdir()
    yield from serve(root)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer(tmp_path, "publisher")


def x86_vnni_probe(**gpu: Any) -> Probe:
    ccs = gpu.get("ccs", ())
    return Probe(
        cpu=CpuInfo(arch="x86_64", model="test", logical_cores=2, physical_cores=2, usable_cores=2,
                    features=("avx2", "avx512f", "avx512_vnni"), flags=("avx2", "avx512_vnni", "avx512f"),
                    int8_path="vnni", bf16=False),
        nvidia=NvidiaInfo(gpus=tuple(_gpu(i, f"gpu{i}", cc, 16000) for i, cc in enumerate(ccs)),
                          tensorrt_version=gpu.get("trt")),
        memory=MemoryInfo(1000, 1000), disk=DiskInfo(".", 1000, 1000), os=OsInfo("Linux", "", "", "3.11"),
        backends=(BackendProbe("onnxruntime", True, "1.20.0"), BackendProbe("openvino", False),
                  BackendProbe("tensorrt", gpu.get("trt") is not None, gpu.get("trt"))),
    )


def make_client(server: RegistryServer | str, signer: Signer | list[Path], state: Path, **kw: Any) -> RegistryClient:
    url = server if isinstance(server, str) else server.url
    keys = signer if isinstance(signer, list) else [signer.pub]
    kw.setdefault("retry_wait_s", 0)
    kw.setdefault("min_free_mb", 0)
    return RegistryClient(url, keys, state, kw.pop("probe", None) or x86_vnni_probe(), **kw)


def read_current(state: Path) -> str | None:
    return ModelStore(state).current_version(MODEL)


# -------------------------------------------------------------------------------------- tests


def test_happy_path_pull_installs_and_switches_current(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    client = make_client(server, signer, state)

    index = client.fetch_index()
    assert index.models[MODEL].latest == "1.0.0"
    manifest = client.fetch_manifest(MODEL)
    assert [v.id for v in client.select_variants(manifest)] == ["int8-vnni", "int8-avx2", "fp32"]
    reasons = {c.variant.id: c.reason for c in client.explain_variants(manifest) if not c.ok}
    assert reasons == {"int8-arm": "needs arch aarch64, this is x86_64",
                       "ov-int8": "backend openvino is not installed",
                       "trt-fp8": "needs an NVIDIA GPU, none found",
                       "trt-int8": "needs an NVIDIA GPU, none found"}

    result = client.pull(MODEL)
    assert result.previous is None
    assert set(result.variants) == {"int8-vnni", "int8-avx2", "fp32"}
    vdir = state / "models" / MODEL / "1.0.0"
    assert os.readlink(state / "models" / MODEL / "current") == "1.0.0"
    assert (vdir / "int8-vnni.onnx").read_bytes() == (server.root / MODEL / "1.0.0" / "int8-vnni.onnx").read_bytes()
    assert (vdir / "selftest" / "int8-vnni.npz").is_file() and (vdir / "selftest" / "fp32.npz").is_file()
    assert not (vdir / "int8-arm.onnx").exists()
    assert (vdir / "manifest.json").read_bytes() == (server.root / MODEL / "1.0.0" / "manifest.json").read_bytes()
    installed = ModelStore(state).current(MODEL)
    assert installed is not None and installed.version == "1.0.0"
    assert set(installed.variants) == {"int8-vnni", "int8-avx2", "fp32"}
    assert not list((state / "models" / MODEL).glob("*.partial"))
    assert not list(vdir.rglob("*.partial"))


def test_gpu_device_prefers_tensorrt_and_orders_int8_before_fp8(server: RegistryServer, signer: Signer,
                                                               tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    h100 = make_client(server, signer, tmp_path / "h100", probe=x86_vnni_probe(ccs=("9.0",), trt="10.3.0"))
    m = h100.fetch_manifest(MODEL, "1.0.0")
    assert [v.id for v in h100.select_variants(m)] == ["trt-int8", "trt-fp8", "int8-vnni", "int8-avx2", "fp32"]
    orin_like = make_client(server, signer, tmp_path / "a100", probe=x86_vnni_probe(ccs=("8.7",), trt="10.3.0"))
    ids = [v.id for v in orin_like.select_variants(m)]
    assert "trt-fp8" not in ids and ids[0] == "trt-int8"


def test_resume_after_an_interrupted_transfer(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    server.cut[f"{MODEL}/1.0.0/fp32.onnx"] = 100_000  # drop the connection after 100 kB
    state = tmp_path / "state"
    result = make_client(server, signer, state, retries=2).pull(MODEL)
    assert "fp32" in result.variants
    fp32 = [r for r in server.requests if r[0] == f"{MODEL}/1.0.0/fp32.onnx"]
    assert fp32 == [(f"{MODEL}/1.0.0/fp32.onnx", None), (f"{MODEL}/1.0.0/fp32.onnx", "bytes=100000-")]
    got = (state / "models" / MODEL / "1.0.0" / "fp32.onnx").read_bytes()
    assert got == (server.root / MODEL / "1.0.0" / "fp32.onnx").read_bytes()


def test_resume_across_pulls_keeps_the_partial_file(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    server.cut[f"{MODEL}/1.0.0/fp32.onnx"] = 50_000
    with pytest.raises(RegistryError, match=r"fp32.onnx incomplete after 1 attempt.*50000 of 300005 bytes kept"):
        make_client(server, signer, state, retries=1).pull(MODEL)
    assert read_current(state) is None
    partial = state / "models" / MODEL / "1.0.0.partial" / "fp32.onnx.partial"
    assert partial.stat().st_size == 50_000

    server.requests.clear()
    make_client(server, signer, state, retries=1).pull(MODEL)  # a later poll, e.g. after a restart
    assert (f"{MODEL}/1.0.0/fp32.onnx", "bytes=50000-") in server.requests
    assert read_current(state) == "1.0.0"


def test_flipped_byte_is_refused_and_current_untouched(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    make_client(server, signer, state).pull(MODEL)
    publish(server.root, signer, "2.0.0")
    target = server.root / MODEL / "2.0.0" / "int8-vnni.onnx"
    data = bytearray(target.read_bytes())
    data[5000] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"int8-vnni.onnx: sha256 .* does not match the signed manifest"):
        make_client(server, signer, state).pull(MODEL)
    assert read_current(state) == "1.0.0"
    assert not (state / "models" / MODEL / "2.0.0").exists()
    # the tampered bytes are not kept for a later resume
    assert not (state / "models" / MODEL / "2.0.0.partial" / "int8-vnni.onnx.partial").exists()


def test_signature_from_another_key_is_refused(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    intruder = Signer(tmp_path, "intruder")
    publish(server.root, intruder, "1.0.0")
    state = tmp_path / "state"
    with pytest.raises(RegistryError, match="does not verify with any of the 1 trusted key"):
        make_client(server, signer, state).fetch_index()
    with pytest.raises(RegistryError, match="does not verify"):
        make_client(server, signer, state).fetch_manifest(MODEL, "1.0.0")
    with pytest.raises(RegistryError):
        make_client(server, signer, state).pull(MODEL)
    assert read_current(state) is None and not (state / "models" / MODEL / "1.0.0").exists()


def test_modified_manifest_breaks_the_signature(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    make_client(server, signer, state).pull(MODEL, "1.0.0")
    publish(server.root, signer, "2.0.0")
    mpath = server.root / MODEL / "2.0.0" / "manifest.json"
    evil = b"F" * 300_000 + b"evil"
    (server.root / MODEL / "2.0.0" / "fp32.onnx").write_bytes(evil)
    doc = json.loads(mpath.read_text())
    doc["variants"][0]["sha256"] = hashlib.sha256(evil).hexdigest()  # re-pointed, not re-signed
    mpath.write_bytes(canonical_json(doc))
    with pytest.raises(RegistryError, match="signature does not verify"):
        make_client(server, signer, state).pull(MODEL, "2.0.0")
    (server.root / MODEL / "2.0.0" / "manifest.json.sig").write_bytes(b"short")
    with pytest.raises(RegistryError, match="signature is 5 bytes"):
        make_client(server, signer, state).pull(MODEL, "2.0.0")
    assert read_current(state) == "1.0.0"


def test_key_rotation_accepts_either_pinned_key(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    new = Signer(tmp_path, "next")
    publish(server.root, new, "1.0.0")
    client = make_client(server, [signer.pub, new.pub], tmp_path / "state")
    assert client.pull(MODEL).installed.key_id  # verified by the second key


def test_replayed_manifest_of_another_version_is_refused(server: RegistryServer, signer: Signer,
                                                         tmp_path: Path) -> None:
    v1 = publish(server.root, signer, "1.0.0")
    v2 = publish(server.root, signer, "2.0.0")
    for name in ("manifest.json", "manifest.json.sig"):  # an attacker serves the old signed manifest as 2.0.0
        (v2 / name).write_bytes((v1 / name).read_bytes())
    with pytest.raises(RegistryError, match="describes ct-test 1.0.0, not ct-test 2.0.0"):
        make_client(server, signer, tmp_path / "state").fetch_manifest(MODEL, "2.0.0")


def test_server_down_is_a_registry_error(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    make_client(server, signer, state).pull(MODEL)
    url = server.url
    server.shutdown()
    server.server_close()
    with pytest.raises(RegistryError, match="registry unreachable at http://127.0.0.1:"):
        make_client(url, signer, state, timeout_s=2).pull(MODEL)
    assert read_current(state) == "1.0.0"


def test_server_down_during_a_download_is_a_registry_error(server: RegistryServer, signer: Signer,
                                                           tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    client = make_client(server, signer, state, retries=2, timeout_s=2)
    manifest = client.fetch_manifest(MODEL, "1.0.0")
    server.shutdown()
    server.server_close()
    with pytest.raises(RegistryError, match="incomplete after 2 attempt.*unreachable"):
        client.install(MODEL, "1.0.0", client.select_variants(manifest))
    assert read_current(state) is None


def test_missing_file_on_the_registry(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    (server.root / MODEL / "1.0.0" / "int8-avx2.onnx").unlink()
    with pytest.raises(RegistryError, match="int8-avx2.onnx answered HTTP 404"):
        make_client(server, signer, tmp_path / "state").pull(MODEL)
    with pytest.raises(RegistryError, match="no model 'other'"):
        make_client(server, signer, tmp_path / "state").pull("other")


def test_truncated_file_on_the_registry(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    target = server.root / MODEL / "1.0.0" / "fp32.onnx"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(RegistryError, match="fp32.onnx incomplete after 2 attempt"):
        make_client(server, signer, tmp_path / "state", retries=2).pull(MODEL)
    assert read_current(tmp_path / "state") is None


def test_disk_space_check_refuses_before_downloading(server: RegistryServer, signer: Signer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    make_client(server, signer, state).pull(MODEL)
    publish(server.root, signer, "2.0.0")
    real = client_mod.shutil.disk_usage

    def tiny(path: Any) -> Any:
        usage = real(path)
        return usage._replace(free=100 * 1024 * 1024)

    monkeypatch.setattr(client_mod.shutil, "disk_usage", tiny)
    server.requests.clear()
    with pytest.raises(RegistryError, match="not enough disk space.*200 MB must stay free, 100 MB are free"):
        make_client(server, signer, state, min_free_mb=200).pull(MODEL)
    assert not [r for r in server.requests if r[0].endswith(".onnx")]
    assert read_current(state) == "1.0.0"


def test_disk_full_while_writing(server: RegistryServer, signer: Signer, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    make_client(server, signer, state).pull(MODEL)
    publish(server.root, signer, "2.0.0")

    def enospc(f: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(client_mod, "_write", enospc)
    with pytest.raises(RegistryError, match="disk full while writing .*No space left on device"):
        make_client(server, signer, state).pull(MODEL)
    assert read_current(state) == "1.0.0"


def test_rollback_restores_the_previous_version(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(RegistryError, match="no previous version"):
        make_client(server, signer, state).rollback(MODEL)
    publish(server.root, signer, "1.0.0")
    make_client(server, signer, state).pull(MODEL)
    publish(server.root, signer, "2.0.0")
    result = make_client(server, signer, state).pull(MODEL)
    assert result.previous == "1.0.0"
    store = ModelStore(state)
    assert (store.current_version(MODEL), store.previous_version(MODEL)) == ("2.0.0", "1.0.0")

    client = make_client(server, signer, state)
    assert client.rollback(MODEL) == "1.0.0"
    assert (store.current_version(MODEL), store.previous_version(MODEL)) == ("1.0.0", "2.0.0")
    assert (state / "models" / MODEL / "current" / "fp32.onnx").read_bytes().endswith(b"1.0.0")
    assert client.rollback(MODEL) == "2.0.0"  # and forward again

    publish(server.root, signer, "3.0.0")
    make_client(server, signer, state).pull(MODEL)
    assert store.versions(MODEL) == ["2.0.0", "3.0.0"]  # 1.0.0 pruned: current + previous are kept
    with pytest.raises(RegistryError, match="is current"):
        store.remove(MODEL, "3.0.0")


def test_reinstall_same_version_adds_variants_without_touching_existing_files(
        server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    client = make_client(server, signer, state)
    client.fetch_manifest(MODEL, "1.0.0")
    client.install(MODEL, "1.0.0", ["fp32"])
    vdir = state / "models" / MODEL / "1.0.0"
    inode = (vdir / "fp32.onnx").stat().st_ino
    server.requests.clear()
    client.install(MODEL, "1.0.0", ["int8-vnni"])
    assert (vdir / "fp32.onnx").stat().st_ino == inode
    assert [r[0] for r in server.requests if r[0].endswith(".onnx")] == [f"{MODEL}/1.0.0/int8-vnni.onnx"]
    installed = ModelStore(state).current(MODEL)
    assert installed is not None and set(installed.variants) == {"fp32", "int8-vnni"}
    assert ModelStore(state).previous_version(MODEL) is None


def test_nothing_runnable_is_an_error(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    arm_only = [_variant("fp32-arm", "onnxruntime", "fp32", b"x" * 10, {"arch": ["aarch64"]})]
    publish(server.root, signer, "1.0.0", arm_only, fallback="fp32-arm")
    with pytest.raises(RegistryError, match="no variant can run on this device.*fp32-arm: needs arch aarch64"):
        make_client(server, signer, tmp_path / "state").pull(MODEL)


def test_file_registry(signer: Signer, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    publish(root, signer, "1.0.0")
    state = tmp_path / "state"
    result = make_client(root.as_uri(), signer, state).pull(MODEL)
    assert result.installed.version == "1.0.0" and read_current(state) == "1.0.0"


def test_bad_configuration(signer: Signer, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="expected http"):
        RegistryClient("ftp://x", [signer.pub], tmp_path)
    with pytest.raises(RegistryError, match="cannot read registry public key"):
        RegistryClient("http://127.0.0.1:9", [tmp_path / "missing.pub"], tmp_path)
    with pytest.raises(RegistryError, match="no trusted registry public key"):
        RegistryClient("http://127.0.0.1:9", [], tmp_path)
    cfg = RegistryConfig(url="https://models.example.org/r", public_key="/etc/edge-agent/registry.pub")
    assert cfg.public_key == [Path("/etc/edge-agent/registry.pub")] and cfg.enabled()
    with pytest.raises(ValueError, match="http"):
        RegistryConfig(url="models.example.org")


def test_concurrent_install_is_refused(server: RegistryServer, signer: Signer, tmp_path: Path) -> None:
    publish(server.root, signer, "1.0.0")
    state = tmp_path / "state"
    store = ModelStore(state)
    with store.lock(MODEL), pytest.raises(RegistryError, match="in progress"):
        make_client(server, signer, state).pull(MODEL)
    make_client(server, signer, state).pull(MODEL)  # released: goes through
    assert read_current(state) == "1.0.0"
