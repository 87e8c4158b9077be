"""Keys, signing, the registry tree and its verification (deploy.sign, deploy.publish, agent.core.manifest).

Publishes a real gated build of the tiny classifier (tests/test_gate.py), then attacks it: a
flipped byte in the manifest, a wrong key, a truncated signature, a swapped model file, a
Ctrl-C half way through publishing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.core.accuracy import load_validation_set
from agent.core.errors import RegistryError
from agent.core.manifest import (
    key_id,
    parse_manifest,
    sha256_file,
    verify_file,
    verify_index,
    verify_manifest,
)
from deploy.cli import main as cli
from deploy.publish import PublishError, publish_build
from deploy.sign import SigningError, keygen, load_private_key
from deploy.variants import host
from deploy.verify import VerifyError, verify_registry


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    return keygen(d)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gated build folder: fp32, u8s8 (pass), s8s8 with a corrupted weight (fails the gate)."""
    from test_gate import _corrupt_first_conv, tiny_model_dir

    from deploy.calibrate import QuantConfig, calibrate
    from deploy.gate import gate
    from deploy.quantize import quantize

    root = tmp_path_factory.mktemp("pub")
    model_dir = tiny_model_dir(root)
    out = root / "build"
    cfg = QuantConfig(calibration_samples=24, validation_samples=24, threads=1)
    calibrate(model_dir, out, cfg)
    quantize(out, ["fp32", "ort-int8-u8s8", "ort-int8-s8s8"])
    doc = json.loads((out / "variants.json").read_text())
    rec = next(r for r in doc["variants"] if r["id"] == "ort-int8-s8s8")
    _corrupt_first_conv(out / rec["file"])
    rec["sha256"] = sha256_file(out / rec["file"])
    rec["size"] = (out / rec["file"]).stat().st_size
    (out / "variants.json").write_text(json.dumps(doc))
    gate(model_dir, out, cfg, n=24)
    return out


@pytest.fixture
def registry(tmp_path: Path, build: Path, keys: tuple[Path, Path]) -> Path:
    reg = tmp_path / "registry"
    publish_build(build, reg, keys[0])
    return reg


# --------------------------------------------------------------------------------------------
# keygen
# --------------------------------------------------------------------------------------------


def test_keygen_file_modes_and_no_silent_overwrite(tmp_path: Path) -> None:
    rc = cli(["keygen", "--out", str(tmp_path / "k")])
    assert rc == 0
    priv, pub = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = priv.read_bytes()
    assert cli(["keygen", "--out", str(tmp_path / "k")]) == 2  # refuses: an existing key is kept
    assert priv.read_bytes() == before
    keygen(tmp_path / "k", force=True)
    assert priv.read_bytes() != before and stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.startswith(".")]  # no temp files left


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    priv, _ = keygen(tmp_path)
    os.chmod(priv, 0o644)
    with pytest.raises(SigningError, match="chmod 600"):
        load_private_key(priv)


# --------------------------------------------------------------------------------------------
# The published tree
# --------------------------------------------------------------------------------------------


def test_registry_verifies_and_holds_only_gated_variants(registry: Path, keys: tuple[Path, Path]) -> None:
    pub = keys[1].read_bytes()
    vdir = registry / "mr-brain-cls" / "1.0.0"
    manifest = verify_manifest((vdir / "manifest.json").read_bytes(), (vdir / "manifest.json.sig").read_bytes(), [pub])
    ids = [v.id for v in manifest.variants]
    assert set(ids) == {"fp32", "ort-int8-u8s8"}  # the corrupted s8s8 failed the gate
    assert manifest.fallback == "fp32" and manifest.signing_key_id == key_id(pub)
    assert "ort-int8-s8s8" in manifest.validation["failed_variants"]
    for v in manifest.variants:
        verify_file(vdir / v.file, v.sha256, v.size)
        assert v.gate.passed and v.gate.batch_invariant
        assert v.selftest is not None
        verify_file(vdir / v.selftest.file, v.selftest.sha256, v.selftest.size)
    assert manifest.schema_version == 2
    u8 = manifest.variant("ort-int8-u8s8")
    me = host()
    # only the architecture is a requirement; VNNI is a speed hint, the family verdicts decide
    assert u8.requires.arch == ("x86_64",) and not u8.requires.cpu_features_any
    assert "avx512_vnni" in u8.fast_on and u8.targets == ("x86-vnni",)
    assert u8.gate.isa_family == me.isa_family
    vnni = u8.isa_gates["x86-vnni"]
    assert vnni.passed and vnni.method == ("native" if me.isa_family == "x86-vnni" else "simulated") and vnni.summary
    if me.arch == "x86_64":
        assert u8.execution_precision.startswith("int8")
        assert u8.isa_gates[me.isa_family].method == "native"
    assert manifest.drift is not None and manifest.drift.n_series == 24
    assert manifest.drift.outputs["predicted_class_counts"]
    assert manifest.spec["name"] == "mr-brain-cls" and manifest.calibration["method"] == "percentile"
    assert not (vdir / "model.int8-s8s8.qdq.onnx").exists()
    index = verify_index((registry / "index.json").read_bytes(), (registry / "index.json.sig").read_bytes(), [pub])
    entry = index.models["mr-brain-cls"]
    assert entry.latest == "1.0.0"
    assert entry.versions["1.0.0"].sha256 == sha256_file(vdir / "manifest.json")


def test_tampered_manifest_fails_verification(registry: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    pub = keys[1].read_bytes()
    vdir = registry / "mr-brain-cls" / "1.0.0"
    data = bytearray((vdir / "manifest.json").read_bytes())
    sig = (vdir / "manifest.json.sig").read_bytes()
    pos = data.index(b'"sha256"') + 12
    data[pos] ^= 0x01  # one flipped bit in a digest
    with pytest.raises(RegistryError, match="does not verify"):
        verify_manifest(bytes(data), sig, [pub])
    with pytest.raises(RegistryError, match="64"):
        verify_manifest((vdir / "manifest.json").read_bytes(), sig[:-1], [pub])
    other_priv, other_pub = keygen(tmp_path / "other")
    with pytest.raises(RegistryError, match="does not verify"):
        verify_manifest((vdir / "manifest.json").read_bytes(), sig, [other_pub.read_bytes()])
    # key rotation: any trusted key that verifies is enough
    assert verify_manifest((vdir / "manifest.json").read_bytes(), sig, [other_pub.read_bytes(), pub]).name == "mr-brain-cls"
    with pytest.raises(RegistryError, match="no trusted public keys"):
        verify_manifest((vdir / "manifest.json").read_bytes(), sig, [])


def test_sha256_mismatch_is_detected(registry: Path) -> None:
    vdir = registry / "mr-brain-cls" / "1.0.0"
    manifest = parse_manifest((vdir / "manifest.json").read_bytes())
    v = manifest.variant("ort-int8-u8s8")
    path = vdir / v.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="does not match the manifest"):
        verify_file(path, v.sha256, v.size)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(RegistryError, match="size"):
        verify_file(path, v.sha256, v.size)


def test_publish_refuses_a_file_changed_after_the_gate(build: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "build"
    shutil.copytree(build, copy)
    f = copy / "model.int8-u8s8.qdq.onnx"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(PublishError, match="differs from the gated file"):
        publish_build(copy, tmp_path / "reg", keys[0])
    assert not (tmp_path / "reg" / "mr-brain-cls" / "1.0.0").exists()


def test_versions_are_immutable_and_index_merges(registry: Path, build: Path, keys: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="already published"):
        publish_build(build, registry, keys[0])
    bumped = tmp_path / "build"
    shutil.copytree(build, bumped)
    toml = (bumped / "model.toml").read_text().replace('version = "1.0.0"', 'version = "1.10.0"')
    (bumped / "model.toml").write_text(toml)
    publish_build(bumped, registry, keys[0])
    index = json.loads((registry / "index.json").read_text())
    assert set(index["models"]["mr-brain-cls"]["versions"]) == {"1.0.0", "1.10.0"}
    assert index["models"]["mr-brain-cls"]["latest"] == "1.10.0"  # numeric, not string, order
    publish_build(build, registry, keys[0], force=True)  # explicit re-publish is allowed
    verify_index((registry / "index.json").read_bytes(), (registry / "index.json.sig").read_bytes(),
                 [keys[1].read_bytes()])


def test_ctrl_c_during_publish_leaves_the_registry_unchanged(registry: Path, build: Path, keys: tuple[Path, Path],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deploy.publish as P

    bumped = tmp_path / "build"
    shutil.copytree(build, bumped)
    (bumped / "model.toml").write_text((bumped / "model.toml").read_text().replace('version = "1.0.0"', 'version = "2.0.0"'))
    before = {p: p.read_bytes() for p in registry.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real_copy = shutil.copyfile

    def copy_then_interrupt(src: object, dst: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_copy(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(P.shutil, "copyfile", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        publish_build(bumped, registry, keys[0])
    after = {p: p.read_bytes() for p in registry.rglob("*") if p.is_file()}
    assert after == before
    assert not (registry / "mr-brain-cls" / "2.0.0").exists()
    assert not [p for p in (registry / "mr-brain-cls").iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# edge-deploy verify
# --------------------------------------------------------------------------------------------


def _resign(registry: Path, priv: Path, edit: Callable[[dict], None]) -> None:
    """Edit the published manifest, then sign it and the index again, as a careless (or hostile)
    publisher holding the real key would: the signatures are valid, the content is not."""
    from deploy.sign import sign

    key = load_private_key(priv)
    vdir = registry / "mr-brain-cls" / "1.0.0"
    doc = json.loads((vdir / "manifest.json").read_bytes())
    edit(doc)
    raw = json.dumps(doc, indent=1).encode()
    (vdir / "manifest.json").write_bytes(raw)
    (vdir / "manifest.json.sig").write_bytes(sign(key, raw))
    index = json.loads((registry / "index.json").read_bytes())
    index["models"]["mr-brain-cls"]["versions"]["1.0.0"]["sha256"] = hashlib.sha256(raw).hexdigest()
    index_raw = json.dumps(index, indent=1).encode()
    (registry / "index.json").write_bytes(index_raw)
    (registry / "index.json.sig").write_bytes(sign(key, index_raw))


def test_verify_passes_a_fresh_registry(registry: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_registry(registry, [keys[1]])
    assert report.ok and not report.problems
    [version] = report.versions
    assert (version.model, version.version) == ("mr-brain-cls", "1.0.0")
    assert set(version.variants) == {"fp32", "ort-int8-u8s8"} and version.stray_files == ()
    assert cli(["verify", str(registry), "--pub", str(keys[1])]) == 0
    assert "registry verified" in capsys.readouterr().out


def test_verify_lists_every_damaged_file(registry: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    vdir = registry / "mr-brain-cls" / "1.0.0"
    manifest = parse_manifest((vdir / "manifest.json").read_bytes())
    u8 = vdir / manifest.variant("ort-int8-u8s8").file
    data = bytearray(u8.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    u8.write_bytes(bytes(data))
    selftest = manifest.variant("fp32").selftest
    assert selftest is not None
    (vdir / selftest.file).unlink()
    (vdir / "notes.txt").write_text("left over\n")
    report = verify_registry(registry, [keys[1]])
    assert not report.ok
    [version] = report.versions
    assert len(version.problems) == 2
    assert any("ort-int8-u8s8" in p and "does not match" in p for p in version.problems)
    assert any("fp32" in p and "missing" in p for p in version.problems)
    assert version.stray_files == ("notes.txt",)  # reported, not a failure by itself
    assert cli(["verify", str(registry), "--pub", str(keys[1])]) == 1
    out = capsys.readouterr().out
    assert "registry NOT verified" in out and "notes.txt" in out


def test_verify_rejects_a_signed_variant_that_failed_the_gate(registry: Path, keys: tuple[Path, Path]) -> None:
    def fail_u8(doc: dict) -> None:
        for v in doc["variants"]:
            if v["id"] == "ort-int8-u8s8":
                v["gate"]["passed"] = False
                v["gate"]["failures"] = ["accuracy drop 3.000 points > 1.000 allowed (over by 2.000)"]

    _resign(registry, keys[0], fail_u8)
    [version] = verify_registry(registry, [keys[1]]).versions
    assert version.problems == (
        "variant ort-int8-u8s8: published without passing the gate "
        "(accuracy drop 3.000 points > 1.000 allowed (over by 2.000))",
    )


def test_verify_with_the_wrong_key_or_a_tampered_manifest(registry: Path, keys: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    _, other_pub = keygen(tmp_path / "other")
    report = verify_registry(registry, [other_pub])
    assert not report.ok and report.versions == ()
    assert "index.json" in report.problems[0] and "does not verify" in report.problems[0]
    vdir = registry / "mr-brain-cls" / "1.0.0"
    (vdir / "manifest.json").write_bytes((vdir / "manifest.json").read_bytes().replace(b'"fp32"', b'"fp33"', 1))
    [version] = verify_registry(registry, [keys[1]]).versions
    assert any("SHA-256 differs from the one index.json records" in p for p in version.problems)
    assert any("does not verify" in p for p in version.problems)
    with pytest.raises(VerifyError, match="not a registry"):
        verify_registry(tmp_path / "nothing-here", [keys[1]])
    with pytest.raises(VerifyError, match="cannot use public key"):
        verify_registry(registry, [tmp_path / "missing.pub"])


# --------------------------------------------------------------------------------------------
# The device validation set
# --------------------------------------------------------------------------------------------


def test_validation_set_is_published_with_its_digest(registry: Path, build: Path, keys: tuple[Path, Path]) -> None:
    vdir = registry / "mr-brain-cls" / "1.0.0"
    manifest = verify_manifest((vdir / "manifest.json").read_bytes(), (vdir / "manifest.json.sig").read_bytes(),
                               [keys[1].read_bytes()])
    vs = manifest.validation_set
    assert vs is not None and vs.file == "validation/set.npz"
    verify_file(vdir / vs.file, vs.sha256, vs.size)
    assert (vdir / vs.file).read_bytes() == (build / "validation" / "set.npz").read_bytes()
    samples = load_validation_set(vdir / vs.file)
    assert len(samples) == vs.n_samples == 24 and samples.task == "classification"
    assert 0.0 <= vs.reference["accuracy"] <= 1.0 and set(vs.reference) > {"accuracy"}  # + per-class recall


def test_verify_rejects_a_tampered_validation_set(registry: Path, keys: tuple[Path, Path]) -> None:
    path = registry / "mr-brain-cls" / "1.0.0" / "validation" / "set.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    [version] = verify_registry(registry, [keys[1]]).versions
    assert len(version.problems) == 1 and version.problems[0].startswith("validation set:")
    assert "does not match" in version.problems[0]


def test_verify_flags_unproven_variants_without_a_validation_set(registry: Path, keys: tuple[Path, Path]) -> None:
    def strip(doc: dict) -> None:
        doc["validation_set"] = None
        for v in doc["variants"]:
            if v["id"] == "ort-int8-u8s8":
                v["isa_gates"] = {}  # proven nowhere: every x86-vnni device would have to gate it

    _resign(registry, keys[0], strip)
    (registry / "mr-brain-cls" / "1.0.0" / "validation" / "set.npz").unlink()
    [version] = verify_registry(registry, [keys[1]]).versions
    assert len(version.problems) == 1
    assert "no validation set" in version.problems[0] and "ort-int8-u8s8 (x86-vnni)" in version.problems[0]
