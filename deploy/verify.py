"""``edge-deploy verify``: check a published registry the way a device will, before it is served.

Run it on the folder you are about to upload to a web server or object store (or on a copy
fetched back from one). With only the public key(s), it checks what an agent checks at pull time,
for every model and version the index lists, and a little more:

* ``index.json`` and each ``manifest.json`` carry a valid Ed25519 signature from a trusted key;
  each manifest's SHA-256 is the one the index records, and it describes the model and version
  its path says (no replayed manifest);
* every variant file, self-test file and the validation set exists, with the size and SHA-256
  its manifest states;
* every published variant passed the accuracy gate (``gate.passed``, no failures) and the
  fallback variant is FP32;
* a variant not proven for some instruction-set family (no native or ISA-limited pass there, see
  ``agent.core.isa.proof_needed``) needs the validation set, on which devices of that
  family gate it: a manifest with such variants and no validation set is a problem;
* nothing else sits in a version folder (a left-over file is reported, not fatal: agents only
  fetch what a signed manifest lists).

Problems are collected rather than raised one at a time, so one run lists them all. Exit
status: 0 when the registry is sound, 1 when a problem was found (each printed with its path),
2 for usage errors (no index, unreadable key).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.errors import EdgeAgentError, RegistryError
from agent.core.isa import FAMILIES, proof_needed
from agent.core.manifest import (
    Manifest,
    load_public_key,
    sha256_bytes,
    verify_file,
    verify_index,
    verify_manifest,
)


class VerifyError(EdgeAgentError):
    """The registry cannot be checked at all (no index, unreadable key)."""


@dataclass(frozen=True)
class VersionReport:
    """What ``verify`` found for one ``<model>/<version>`` folder."""

    model: str
    version: str
    variants: tuple[str, ...]
    problems: tuple[str, ...]
    stray_files: tuple[str, ...]


@dataclass(frozen=True)
class RegistryReport:
    """All versions the index lists, plus registry-level problems (index signature, orphans)."""

    versions: tuple[VersionReport, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems and all(not v.problems for v in self.versions)


def _read_keys(paths: list[Path]) -> list[bytes]:
    keys = []
    for path in paths:
        try:
            pem = path.read_bytes()
            load_public_key(pem)
        except (OSError, ValueError, RegistryError) as exc:
            raise VerifyError(f"cannot use public key {path}: {exc}") from exc
        keys.append(pem)
    if not keys:
        raise VerifyError("no public key given: pass --pub signing.pub (from edge-deploy keygen)")
    return keys


def _verify_version(registry: Path, model: str, version: str, manifest_rel: str, manifest_sha256: str,
                    keys: list[bytes]) -> VersionReport:
    problems: list[str] = []
    vdir = (registry / manifest_rel).parent
    try:
        raw = (registry / manifest_rel).read_bytes()
        sig = (registry / (manifest_rel + ".sig")).read_bytes()
    except OSError as exc:
        return VersionReport(model, version, (), (f"cannot read the manifest or its signature: {exc}",), ())
    if sha256_bytes(raw) != manifest_sha256:
        problems.append(f"{manifest_rel}: SHA-256 differs from the one index.json records")
    try:
        manifest = verify_manifest(raw, sig, keys)
    except RegistryError as exc:
        return VersionReport(model, version, (), (*problems, f"{manifest_rel}: {exc}"), ())
    if (manifest.name, manifest.version) != (model, version):
        problems.append(f"{manifest_rel} is signed but describes {manifest.name} {manifest.version}")
    listed = {"manifest.json", "manifest.json.sig"}
    for v in manifest.variants:
        files = [(v.file, v.sha256, v.size)]
        if v.selftest is None:
            problems.append(f"variant {v.id}: no self-test vector (devices cannot check it before use)")
        else:
            files.append((v.selftest.file, v.selftest.sha256, v.selftest.size))
        for rel, digest, size in files:
            listed.add(rel)
            try:
                verify_file(vdir / rel, digest, size)
            except RegistryError as exc:
                problems.append(f"variant {v.id}: {exc}")
        if not v.gate.passed or v.gate.failures:
            problems.append(f"variant {v.id}: published without passing the gate "
                            f"({'; '.join(v.gate.failures) or 'gate.passed is false'})")
    fallback = manifest.variant(manifest.fallback)
    if fallback.precision != "fp32":
        problems.append(f"fallback variant {fallback.id} is {fallback.precision}, not fp32")
    problems += _check_validation_set(manifest, vdir, listed)
    present = {p.relative_to(vdir).as_posix() for p in vdir.rglob("*") if p.is_file()}
    stray = tuple(sorted(present - listed))
    return VersionReport(model, version, tuple(v.id for v in manifest.variants), tuple(problems), stray)


#: the architecture of each instruction-set family (agent.core.isa)
_FAMILY_ARCH = {"x86-vnni": "x86_64", "x86-avx2": "x86_64", "x86-baseline": "x86_64",
                "arm-dotprod": "aarch64", "arm-baseline": "aarch64"}


def _check_validation_set(manifest: Manifest, vdir: Path, listed: set[str]) -> list[str]:
    """The validation set's size and digest; or, without one, the variants devices could not gate."""
    vs = manifest.validation_set
    if vs is not None:
        listed.add(vs.file)
        try:
            verify_file(vdir / vs.file, vs.sha256, vs.size)
        except RegistryError as exc:
            return [f"validation set: {exc}"]
        return []
    unproven = []
    for v in manifest.variants:
        # target-less variants (FP32 on OpenVINO, ...) may run on any family their arch allows
        runs_on = v.targets or [f for f in FAMILIES if not v.requires.arch or _FAMILY_ARCH.get(f) in v.requires.arch]
        families = [f for f in runs_on if proof_needed(v, manifest.fallback, f).decision == "gate"]
        if families:
            unproven.append(f"{v.id} ({', '.join(families)})")
    if not unproven:
        return []
    return [f"no validation set, but variants are not proven for every family they may run on: "
            f"{'; '.join(unproven)}; devices of those families cannot gate them"]


def verify_registry(registry: Path, public_keys: list[Path]) -> RegistryReport:
    """Check every version ``registry/index.json`` lists (see the module docstring).

    Raises VerifyError when there is nothing to check (no index) or a key is unusable; every
    other finding is returned in the report.
    """
    keys = _read_keys(public_keys)
    try:
        index_raw = (registry / "index.json").read_bytes()
        index_sig = (registry / "index.json.sig").read_bytes()
    except OSError as exc:
        raise VerifyError(f"{registry} is not a registry (edge-deploy publish writes index.json "
                          f"and index.json.sig): {exc}") from exc
    try:
        index = verify_index(index_raw, index_sig, keys)
    except RegistryError as exc:
        return RegistryReport((), (f"index.json: {exc}",))
    problems: list[str] = []
    reports = []
    for model, entry in sorted(index.models.items()):
        if entry.latest not in entry.versions:
            problems.append(f"index.json: {model} latest {entry.latest} is not among its versions")
        for version, ver in sorted(entry.versions.items()):
            reports.append(_verify_version(registry, model, version, ver.manifest, ver.sha256, keys))
    indexed = {(r.model, r.version) for r in reports}
    for mf in sorted(registry.glob("*/*/manifest.json")):
        if (mf.parent.parent.name, mf.parent.name) not in indexed:
            problems.append(f"{mf.relative_to(registry)}: not listed in index.json (agents will not see it)")
    return RegistryReport(tuple(reports), tuple(problems))


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy verify``."""
    p = subparsers.add_parser(
        "verify",
        help="check a published registry as devices will (signatures, digests, gate) before serving it",
        description="Verify REGISTRY with the trusted public key(s): index and manifest signatures, "
        "every file's size and SHA-256, every variant's gate verdict. Exit 1 when anything is wrong.",
    )
    p.add_argument("registry", type=Path, help="registry folder (edge-deploy publish --out)")
    p.add_argument("--pub", type=Path, action="append", required=True,
                   help="trusted Ed25519 public key, PEM (repeatable, as during a key rotation)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    report = verify_registry(args.registry, args.pub)
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    for v in report.versions:
        status = "ok" if not v.problems else f"{len(v.problems)} problem(s)"
        print(f"{v.model} {v.version}: {status}; variants: {', '.join(v.variants) or '-'}")
        for problem in v.problems:
            print(f"  PROBLEM {problem}")
        for name in v.stray_files:
            print(f"  note: {name} is not listed in the manifest (not served to agents)")
    print("registry verified" if report.ok else "registry NOT verified")
    return 0 if report.ok else 1
