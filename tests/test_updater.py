"""ModelUpdater against a REAL HTTP server on loopback serving a registry that ``edge-deploy build``
produced (mr-brain-cls: fp32, ort-int8-u8s8, ort-int8-u8s8-rr, ort-int8-s8s8, ov-int8, with self-test vectors).

Activation is a real function (``OrtActivator``): it loads the installed variants with ONNX Runtime
and checks the manifest's self-test vectors; FP32 failing its self-test fails the activation.
Every failure (flipped byte, wrong signature, interrupted download, full disk, unreachable
registry, failed self-test, downgrade) must leave the running version current, say why, and emit
an event.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_pull import RegistryServer, serve

from agent.core.config import Config, RegistryConfig
from agent.core.errors import ActivationError, RegistryError
from agent.core.events import UpdateOutcome
from agent.core.manifest import canonical_json, parse_manifest
from agent.core.types import Event
from agent.core.util import sha256_bytes, sha256_file
from agent.updates import client as client_mod
from agent.updates.client import RegistryClient
from agent.updates.store import ModelStore, version_key
from agent.updates.updater import ModelUpdater, updater_from_config

MODEL = "mr-brain-cls"
REPO = Path(__file__).resolve().parents[1]
VARIANTS = "fp32,ort-int8-u8s8,ort-int8-u8s8-rr,ort-int8-s8s8,ov-int8"


# ------------------------------------------------------------------------ registry from edge-deploy


@dataclass(frozen=True)
class Built:
    """One ``edge-deploy build`` of mr-brain-cls: its build folder, keys and a registry holding 1.0.0."""

    build: Path
    key: Path
    pub: Path
    registry: Path


def built_registry(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build once per test session (about 8 s), shared by test_updater and test_commands through
    a folder under the session's base temp dir."""
    root = tmp_path_factory.getbasetemp() / "edge-deploy-mr-brain-cls"
    done = root / "done"
    if not done.exists():
        from deploy.cli import main as deploy_main
        from deploy.sign import keygen

        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        key, _pub = keygen(root / "keys")
        # the real model, published as 1.0.0 whatever its model.toml says, so these tests can bump it
        model_dir = root / "model"
        model_dir.mkdir()
        shutil.copy2(REPO / "models" / MODEL / "model.onnx", model_dir / "model.onnx")
        toml = (REPO / "models" / MODEL / "model.toml").read_text()
        (model_dir / "model.toml").write_text(re.sub(r'(?m)^version = ".*"$', 'version = "1.0.0"', toml))
        rc = deploy_main(["build", str(model_dir), "--key", str(key), "--out", str(root / "registry"),
                          "--build", str(root / "build"), "--samples", "16", "--val-n", "40", "--skip-bench",
                          "--variants", VARIANTS])
        assert rc == 0
        done.write_text("ok")
    return Built(root / "build", root / "keys" / "signing.key", root / "keys" / "signing.pub", root / "registry")


def publish_version(built: Built, registry: Path, version: str) -> Path:
    """Publish the same gated build again as ``version`` (the model.toml in a copy of the build
    folder is bumped), with edge-deploy's own publisher: manifest signed, index merged and re-signed."""
    from deploy.publish import publish_build

    copy = registry.parent / f"build-{version}"
    if not copy.exists():
        shutil.copytree(built.build, copy)
        toml = copy / "model.toml"
        toml.write_text(toml.read_text().replace('version = "1.0.0"', f'version = "{version}"', 1))
    publish_build(copy, registry, built.key)
    return registry / MODEL / version


def break_selftest(built: Built, vdir: Path, variant: str = "fp32") -> None:
    """Make ``variant``'s self-test expect other outputs and sign the result properly (a model the
    publisher signed but that does not compute what it claims on this device)."""
    from deploy.publish import update_index
    from deploy.sign import load_private_key, public_pem, sign

    key = load_private_key(built.key)
    doc = json.loads((vdir / "manifest.json").read_text())
    entry = next(v for v in doc["variants"] if v["id"] == variant)
    npz = vdir / entry["selftest"]["file"]
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z}
    arrays["expected"] = arrays["expected"] + 50.0
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
    entry["selftest"]["sha256"] = sha256_file(npz)
    entry["selftest"]["size"] = npz.stat().st_size
    raw = canonical_json(doc)
    (vdir / "manifest.json").write_bytes(raw)
    (vdir / "manifest.json.sig").write_bytes(sign(key, raw))
    update_index(vdir.parents[1], key, public_pem(key), MODEL, doc["version"], sha256_bytes(raw),
                 doc["created_at"], [v["id"] for v in doc["variants"]])


def proven_here(registry: Path, version: str = "1.0.0") -> set[str]:
    """The quantized variants of ``version`` whose published verdict for this host's instruction-set
    family is a native pass: what a device of this family installs and may run without its own gate
    (the build ran on this host, so its family's verdicts are native)."""
    from deploy.variants import host

    manifest = parse_manifest((registry / MODEL / version / "manifest.json").read_bytes())
    family = host().isa_family
    return {v.id for v in manifest.variants if v.id != manifest.fallback and family in v.isa_gates
            and v.isa_gates[family].passed and v.isa_gates[family].method == "native"}


# ------------------------------------------------------------------------------ activation


@dataclass(frozen=True)
class Activation:
    model: str
    version: str
    variant: str
    reason: str


class OrtActivator:
    """A real activation: every installed ONNX Runtime variant of the version is loaded and run on
    its self-test input; the fastest-ranked one that passes is chosen. Records what it was asked and
    which version was current at that moment (to prove ``current`` switches only afterwards)."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.calls: list[tuple[str, str, str | None, str | None]] = []

    def __call__(self, model: str, version: str, *, correlation_id: str | None = None) -> Activation:
        import onnxruntime as ort

        self.calls.append((model, version, correlation_id, self.store.current_version(model)))
        installed = self.store.installed(model, version)
        if installed is None:
            raise ActivationError(f"{model} {version} is not installed")
        manifest = parse_manifest(installed.manifest_path.read_bytes())
        passed: list[str] = []
        failures: dict[str, str] = {}
        for v in sorted(manifest.variants, key=lambda v: v.priority):
            if v.id not in installed.variants or v.backend != "onnxruntime" or v.selftest is None:
                continue
            with np.load(installed.path / v.selftest.file) as z:
                x, expected = z["input"], z["expected"]
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(str(installed.path / v.file), opts, providers=["CPUExecutionProvider"])
            out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            close = np.isclose(out, expected, atol=v.selftest.atol, rtol=v.selftest.rtol).mean()
            if close >= v.selftest.min_close_fraction:
                passed.append(v.id)
            else:
                failures[v.id] = f"{close:.3f} of outputs within tolerance"
        if manifest.fallback not in passed:
            raise ActivationError(f"{model} {version}: fallback {manifest.fallback} failed its self-test "
                                  f"({failures.get(manifest.fallback, 'not installed')})")
        return Activation(model, version, passed[0], f"passed: {', '.join(passed)}")


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_registry(tmp_path_factory)


@pytest.fixture
def server(tmp_path: Path, built: Built) -> Iterator[RegistryServer]:
    yield from serve_copy(tmp_path, built)


def serve_copy(tmp_path: Path, built: Built) -> Iterator[RegistryServer]:
    """A copy of the built registry (tests modify it) served over HTTP on a loopback port."""
    root = tmp_path / "registry"
    shutil.copytree(built.registry, root)
    yield from serve(root)


@dataclass
class Rig:
    updater: ModelUpdater
    store: ModelStore
    client: RegistryClient
    activator: OrtActivator
    events: list[Event]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


@pytest.fixture
def make_rig(tmp_path: Path, built: Built) -> Callable[..., Rig]:
    def make(url: str, *, keys: list[Path] | None = None, state: Path | None = None, retries: int = 2,
             poll_interval_s: float = 0, models: list[str] | None = None, min_free_mb: int = 0) -> Rig:
        state = state or tmp_path / "state"
        cfg = RegistryConfig(url=url, public_key=keys or [built.pub], poll_interval_s=poll_interval_s,
                             models=models or [])
        client = RegistryClient(url, cfg.public_key, state, retries=retries, retry_wait_s=0,
                                min_free_mb=min_free_mb)  # probe: this machine, for real
        store = ModelStore(state)
        activator = OrtActivator(store)
        events: list[Event] = []
        return Rig(ModelUpdater(cfg, store, client, activator, events.append), store, client, activator, events)

    return make


def only(outcomes: list[UpdateOutcome]) -> UpdateOutcome:
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


def installed_v1(rig: Rig) -> None:
    o = only(rig.updater.pull_now())
    assert o.ok and o.action == "installed" and o.version == "1.0.0", o
    rig.events.clear()


# ----------------------------------------------------------------------------------- tests


def test_pull_selects_the_vnni_int8_variants_and_activates(server: RegistryServer, make_rig: Callable[..., Rig],
                                                           tmp_path: Path) -> None:
    rig = make_rig(server.url)
    o = only(rig.updater.pull_now(correlation_id="c-1"))
    assert (o.model, o.ok, o.action, o.version, o.previous) == (MODEL, True, "installed", "1.0.0", None)
    installed = rig.store.current(MODEL)
    assert installed is not None
    # what this host's family may run: the INT8 variants the build (on this host) proved natively
    # for it, and FP32; the ARM s8s8 variant is not even downloaded, nor a variant refused here
    proven = proven_here(server.root)
    assert set(installed.variants) == proven | {"fp32"}
    assert "ort-int8-u8s8-rr" in proven  # 7-bit weights: exact on every x86 family
    assert not (installed.path / "model.int8-s8s8.qdq.onnx").exists()
    assert o.variant in proven and o.variant.startswith("ort-int8")  # INT8, not the FP32 fallback
    # current switched only after activation: it was still unset while the self-tests ran
    assert rig.activator.calls == [(MODEL, "1.0.0", "c-1", None)]
    (ev,) = rig.events
    assert ev.kind == "model.updated" and ev.fields["version"] == "1.0.0"
    assert ev.fields["variant"] == o.variant and ev.fields["correlation_id"] == "c-1"
    # nothing new: up to date, no download, no activation
    server.requests.clear()
    o = only(rig.updater.pull_now())
    assert (o.ok, o.action, o.version) == (True, "up-to-date", "1.0.0")
    assert [r[0] for r in server.requests] == ["index.json", "index.json.sig"]
    assert len(rig.activator.calls) == 1


def test_new_version_keeps_the_previous_for_rollback(server: RegistryServer, built: Built,
                                                     make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(server.url)
    installed_v1(rig)
    publish_version(built, server.root, "1.1.0")
    o = only(rig.updater.pull_now())
    assert (o.ok, o.version, o.previous) == (True, "1.1.0", "1.0.0")
    assert rig.activator.calls[-1] == (MODEL, "1.1.0", None, "1.0.0")  # self-tested while 1.0.0 ran
    assert (rig.store.current_version(MODEL), rig.store.previous_version(MODEL)) == ("1.1.0", "1.0.0")

    back = rig.updater.rollback(MODEL, correlation_id="rb-1")
    assert (back.version, back.from_version) == ("1.0.0", "1.1.0")
    assert rig.activator.calls[-1][:3] == (MODEL, "1.0.0", "rb-1")  # the old version is self-tested first
    assert rig.store.current_version(MODEL) == "1.0.0"
    assert rig.events[-1].kind == "model.rolled_back" and rig.events[-1].fields["correlation_id"] == "rb-1"
    # the next automatic poll does not undo the operator's rollback ...
    o = only(rig.updater.pull_now(automatic=True))
    assert (o.action, o.version, o.target) == ("skipped", "1.0.0", "1.1.0")
    assert rig.store.current_version(MODEL) == "1.0.0"
    # the same when the engine manager rolled back by itself (store.rollback, no updater involved)
    assert only(rig.updater.pull_now()).version == "1.1.0"
    rig.store.rollback(MODEL)
    assert only(rig.updater.pull_now(automatic=True)).action == "skipped"
    assert rig.store.current_version(MODEL) == "1.0.0"
    # ... an explicit update does (roll forward, nothing downloaded again)
    server.requests.clear()
    o = only(rig.updater.pull_now())
    assert (o.ok, o.version, o.downloaded_bytes) == (True, "1.1.0", 0)
    assert not [r for r in server.requests if r[0].endswith(".onnx")]


def test_rollback_without_previous_version_is_refused(server: RegistryServer, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(server.url)
    with pytest.raises(RegistryError, match="name the model to roll back .installed: none"):
        rig.updater.rollback(None)
    installed_v1(rig)
    with pytest.raises(RegistryError, match="no previous version"):
        rig.updater.rollback(None)  # the only installed model is taken
    assert rig.kinds() == ["model.rollback_failed"]
    assert rig.store.current_version(MODEL) == "1.0.0"


def test_flipped_byte_in_a_variant_file(server: RegistryServer, built: Built, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(server.url)
    installed_v1(rig)
    vdir = publish_version(built, server.root, "1.1.0")
    target = vdir / "model.int8-u8s8.qdq.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    o = only(rig.updater.pull_now(correlation_id="c-2"))
    assert (o.ok, o.stage, o.version, o.target) == (False, "download", "1.0.0", "1.1.0")
    assert "model.int8-u8s8.qdq.onnx: sha256" in o.error and "does not match the signed manifest" in o.error
    assert rig.store.current_version(MODEL) == "1.0.0"
    assert not (rig.store.model_dir(MODEL) / "1.1.0").exists()
    assert [c[1] for c in rig.activator.calls] == ["1.0.0"]  # never activated
    (ev,) = rig.events
    assert ev.kind == "model.update_failed" and ev.severity == "error"
    assert ev.fields["stage"] == "download" and ev.fields["current"] == "1.0.0"
    assert ev.fields["correlation_id"] == "c-2"


def test_wrong_signatures_and_key_rotation(server: RegistryServer, built: Built, make_rig: Callable[..., Rig],
                                           tmp_path: Path) -> None:
    from deploy.sign import keygen, load_private_key, sign

    rig = make_rig(server.url)
    installed_v1(rig)
    other_key, other_pub = keygen(tmp_path / "other")
    vdir = publish_version(built, server.root, "1.1.0")
    good_sig = (vdir / "manifest.json.sig").read_bytes()
    # the manifest signed by a key this device does not trust
    (vdir / "manifest.json.sig").write_bytes(sign(load_private_key(other_key), (vdir / "manifest.json").read_bytes()))
    o = only(rig.updater.pull_now())
    assert (o.ok, o.stage, o.version) == (False, "manifest", "1.0.0")
    assert "signature does not verify with any of the 1 trusted key(s)" in o.error
    assert not [r for r in server.requests if r[0].endswith(".onnx") and "1.1.0" in r[0]]
    # a tampered index signature: refused before the index is read
    (vdir / "manifest.json.sig").write_bytes(good_sig)
    sig = bytearray((server.root / "index.json.sig").read_bytes())
    sig[0] ^= 0xFF
    (server.root / "index.json.sig").write_bytes(bytes(sig))
    o = only(rig.updater.pull_now())
    assert (o.ok, o.stage, o.version) == (False, "index", "1.0.0")
    assert "signature does not verify" in o.error
    assert rig.kinds() == ["model.update_failed", "model.update_failed"]
    assert rig.store.current_version(MODEL) == "1.0.0"
    # key rotation: the device pins the new key and the old one; a registry signed by either works
    from deploy.publish import update_index
    from deploy.sign import public_pem

    key = load_private_key(other_key)
    raw = (vdir / "manifest.json").read_bytes()
    (vdir / "manifest.json.sig").write_bytes(sign(key, raw))
    doc = json.loads(raw)
    update_index(server.root, key, public_pem(key), MODEL, "1.1.0", sha256_bytes(raw), doc["created_at"],
                 [v["id"] for v in doc["variants"]])
    rotated = make_rig(server.url, keys=[other_pub, built.pub])
    o = only(rotated.updater.pull_now())
    assert (o.ok, o.version) == (True, "1.1.0")


def test_interrupted_download_resumes_on_the_next_pull(server: RegistryServer, built: Built,
                                                       make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(server.url, retries=1)
    installed_v1(rig)
    publish_version(built, server.root, "1.1.0")
    rel = f"{MODEL}/1.1.0/model.fp32.onnx"
    server.cut[rel] = 300_000  # the server drops the connection 300 kB into the file
    o = only(rig.updater.pull_now())
    assert (o.ok, o.stage, o.version) == (False, "download", "1.0.0")
    assert "incomplete after 1 attempt" in o.error and "300000 of" in o.error and "the next pull resumes" in o.error
    assert rig.store.current_version(MODEL) == "1.0.0"
    assert rig.events[-1].kind == "model.update_failed"
    server.requests.clear()
    o = only(rig.updater.pull_now())
    assert (o.ok, o.version, o.previous) == (True, "1.1.0", "1.0.0")
    assert [r for r in server.requests if r[0] == rel] == [(rel, "bytes=300000-")]
    got = rig.store.version_dir(MODEL, "1.1.0") / "model.fp32.onnx"
    assert got.read_bytes() == (server.root / rel).read_bytes()


def test_disk_full(server: RegistryServer, built: Built, make_rig: Callable[..., Rig],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(server.url)
    installed_v1(rig)
    publish_version(built, server.root, "1.1.0")
    # min_free_mb: refused before a byte is downloaded
    rig.client.min_free_mb = 1 << 30
    server.requests.clear()
    o = only(rig.updater.pull_now())
    assert (o.ok, o.stage, o.version) == (False, "download", "1.0.0")
    assert "not enough disk space" in o.error
    assert not [r for r in server.requests if r[0].endswith(".onnx")]
    # the disk fills up while writing
    rig.client.min_free_mb = 0

    def enospc(f: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(client_mod, "_write", enospc)
    o = only(rig.updater.pull_now())
    assert (o.ok, o.stage, o.version) == (False, "download", "1.0.0")
    assert "disk full while writing" in o.error and "the installed model is untouched" in o.error
    assert rig.kinds() == ["model.update_failed", "model.update_failed"]
    assert rig.store.current_version(MODEL) == "1.0.0"


def test_registry_unreachable(server: RegistryServer, make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(server.url)
    installed_v1(rig)
    from conftest import free_port

    down = make_rig(f"http://127.0.0.1:{free_port()}/", state=tmp_path / "state")
    o = only(down.updater.pull_now(correlation_id="c-3"))
    assert (o.ok, o.stage, o.version, o.model) == (False, "index", "1.0.0", MODEL)  # the installed model
    assert "registry unreachable" in o.error
    (ev,) = down.events
    assert ev.kind == "model.update_failed" and ev.fields["correlation_id"] == "c-3"
    # a followed model the registry does not have
    o = only(make_rig(server.url, models=["ct-nope"]).updater.pull_now())
    assert (o.ok, o.stage) == (False, "index") and "registry has no model 'ct-nope'" in o.error
    assert down.store.current_version(MODEL) == "1.0.0"


def test_failed_selftest_keeps_the_running_version(server: RegistryServer, built: Built,
                                                   make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(server.url)
    installed_v1(rig)
    vdir = publish_version(built, server.root, "1.1.0")
    break_selftest(built, vdir)
    o = only(rig.updater.pull_now(correlation_id="c-4"))
    assert (o.ok, o.stage, o.version, o.target) == (False, "activate", "1.0.0", "1.1.0")
    assert "fallback fp32 failed its self-test" in o.error
    assert rig.store.current_version(MODEL) == "1.0.0"
    assert not (rig.store.model_dir(MODEL) / "1.1.0").exists()  # a rejected version does not keep disk
    assert rig.events[-1].kind == "model.update_failed" and rig.events[-1].fields["stage"] == "activate"
    # automatic polls leave it alone; an operator's explicit update tries again (and fails again)
    calls = len(rig.activator.calls)
    assert only(rig.updater.pull_now(automatic=True)).action == "skipped"
    assert len(rig.activator.calls) == calls
    assert only(rig.updater.pull_now()).stage == "activate"
    assert rig.store.current_version(MODEL) == "1.0.0"


def test_an_older_signed_index_cannot_downgrade(server: RegistryServer, built: Built,
                                                make_rig: Callable[..., Rig]) -> None:
    def snapshot() -> tuple[bytes, bytes]:
        return (server.root / "index.json").read_bytes(), (server.root / "index.json.sig").read_bytes()

    def serve(index: tuple[bytes, bytes]) -> None:
        (server.root / "index.json").write_bytes(index[0])
        (server.root / "index.json.sig").write_bytes(index[1])

    rig = make_rig(server.url)
    installed_v1(rig)
    index_100 = snapshot()
    publish_version(built, server.root, "1.0.5")
    index_105 = snapshot()  # validly signed, latest 1.0.5; this device never pulls it
    publish_version(built, server.root, "1.1.0")
    assert only(rig.updater.pull_now()).version == "1.1.0"
    # an attacker (or a stale mirror) serves an older, validly signed index: latest 1.0.0
    serve(index_100)
    o = only(rig.updater.pull_now(correlation_id="c-5"))
    assert (o.ok, o.stage, o.version, o.target) == (False, "downgrade", "1.1.0", "1.0.0")
    assert "refusing the downgrade" in o.error
    assert rig.store.current_version(MODEL) == "1.1.0"
    assert rig.events[-1].kind == "model.downgrade_refused"
    assert rig.events[-1].fields["correlation_id"] == "c-5"
    n = len(rig.events)
    only(rig.updater.pull_now(automatic=True))
    assert len(rig.events) == n  # repeated polls do not repeat the event
    # an explicit rollback is the way back ...
    assert rig.updater.rollback(MODEL).version == "1.0.0"
    # ... and does not open the door to other old versions: 1.0.5 is newer than what runs now but
    # older than 1.1.0, which this device already ran
    serve(index_105)
    o = only(rig.updater.pull_now())
    assert (o.ok, o.stage, o.version, o.target) == (False, "downgrade", "1.0.0", "1.0.5")
    assert rig.store.current_version(MODEL) == "1.0.0"
    assert not (rig.store.model_dir(MODEL) / "1.0.5").exists()
    assert version_key("1.10.0") > version_key("1.9.0")  # versions compare numerically


def test_polling_installs_new_versions(server: RegistryServer, built: Built, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(server.url, poll_interval_s=0.2)
    rig.updater.start_polling()
    try:
        assert wait_until(lambda: rig.store.current_version(MODEL) == "1.0.0", 30)
        publish_version(built, server.root, "1.1.0")
        assert wait_until(lambda: rig.store.current_version(MODEL) == "1.1.0", 30)
    finally:
        rig.updater.stop()
    assert rig.kinds() == ["model.updated", "model.updated"]  # polls of an up-to-date model are quiet


def test_updater_from_config(built: Built, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="needs registry.url and registry.public_key"):
        updater_from_config(Config(), lambda *a, **k: None, lambda e: None)
    cfg = Config.model_validate({"storage": {"dir": str(tmp_path / "s")},
                                 "registry": {"url": built.registry.as_uri(), "public_key": str(built.pub)}})
    updater = updater_from_config(cfg, OrtActivator(ModelStore(tmp_path / "s")), lambda e: None)
    o = only(updater.pull_now())
    assert (o.ok, o.version) == (True, "1.0.0") and o.variant in proven_here(built.registry)  # file:// works too
    assert o.variant.startswith("ort-int8")


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_cli_pull(server: RegistryServer, built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``edge-agent pull`` with the real VariantManager: exit 0 and what is active; exit 1 and why not."""
    from agent.cli import main

    state = tmp_path / "cli-state"
    conf = tmp_path / "agent.toml"

    def write(url: str) -> None:
        conf.write_text(f'[storage]\ndir = "{state}"\n[registry]\nurl = "{url}"\npublic_key = "{built.pub}"\n'
                        "retries = 1\nmin_free_mb = 0\n")

    write(server.url)
    assert main(["pull", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{MODEL}: 1.0.0 active, variant ")
    assert ModelStore(state).current_version(MODEL) == "1.0.0"

    publish_version(built, server.root, "1.1.0")
    server.cut[f"{MODEL}/1.1.0/model.fp32.onnx"] = 1000
    assert main(["pull", "--config", str(conf), "--model", MODEL]) == 1
    err = capsys.readouterr().err
    assert f"{MODEL}: not updated (download): download of {MODEL}/1.1.0/model.fp32.onnx incomplete" in err
    assert err.rstrip().endswith("current stays 1.0.0")
    assert ModelStore(state).current_version(MODEL) == "1.0.0"

    conf.write_text(f'[storage]\ndir = "{state}"\n')
    assert main(["pull", "--config", str(conf)]) == 2
    assert "pulling needs registry.url and registry.public_key" in capsys.readouterr().err
