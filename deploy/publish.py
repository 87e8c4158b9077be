"""``edge-deploy publish``: write the signed, static model registry from gated build folders.

Takes one or more build folders (``--from``; default every folder under ``build/deploy`` that has
a ``gate.json``) and a registry folder (``--out``) and writes, per model version::

    REGISTRY/index.json (+ index.json.sig)        merged with what the registry already holds
    REGISTRY/<model>/<version>/manifest.json       agent.core.manifest.Manifest, canonical JSON
    REGISTRY/<model>/<version>/manifest.json.sig   Ed25519 over the exact manifest bytes (64 bytes)
    REGISTRY/<model>/<version>/<variant files>     only variants the gate found publishable
    REGISTRY/<model>/<version>/selftest/<id>.npz   self-test vectors
    REGISTRY/<model>/<version>/validation/set.npz  the device validation set (signed digest)

Only variants the gate found publishable are published (gate.json ``passed``: shown accurate for
at least one of their target instruction-set families and failed for none), and only if the file
on disk is byte-identical (SHA-256) to the file the gate validated. Each carries the gate's
verdict per family (``isa_gates``): a device whose family has a failed verdict skips the variant,
one with a native or ISA-limited pass uses it, any other gates it on the validation set first
(``agent.variants.device_gate``). FP32 must pass (it is the fallback every device can run). A version is staged in a hidden folder next to its final place, verified (signature and
every digest), then renamed into place in one step, so an interrupted publish (Ctrl-C) leaves the
registry as it was. Published versions are immutable: re-publishing one needs ``--force``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.errors import EdgeAgentError
from agent.core.manifest import (
    SCHEMA_VERSION,
    Index,
    Manifest,
    canonical_json,
    key_id,
    parse_manifest,
    sha256_bytes,
    sha256_file,
    verify_file,
    verify_manifest,
)
from agent.core.modelspec import load_spec
from agent.core.util import atomic_write, iso_utc
from deploy.records import BenchReport, BenchRow, GateDoc, MeasuredVariant, VariantsDoc
from deploy.sign import load_private_key, public_pem, sign
from deploy.variants import VariantSpec, catalogue_by_id, host, read_json

if TYPE_CHECKING:  # cryptography is imported where a key is used, not when the CLI starts
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

logger = logging.getLogger(__name__)

#: preference order among variants whose requirements a device meets: GPU first (its engines are
#: built on the device), then CPU variants by measured speed, FP32 last
_GPU_ORDER = ("trt-fp8", "trt-int8", "trt-fp16")


class PublishError(EdgeAgentError):
    """Publishing failed; the registry was left unchanged."""


def _version_key(version: str) -> tuple[Any, ...]:
    """Sort key for versions: numeric dotted parts compare as numbers (1.10 > 1.9)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


def _priorities(passed: Sequence[str], bench_rows: Mapping[str, BenchRow], is_3d: bool) -> dict[str, int]:
    """Rank passing variants (0 = try first among those a device can run).

    TensorRT first (FP8, INT8, FP16). Then the CPU variants this build host can represent (it
    meets their ``requires``), FP32 included, by the latency measured here (full volume for 3D):
    a variant slower than FP32 here (ONNX Runtime's 3D INT8 path) ranks after it. Variants for
    other CPUs (ARM s8s8 / FP16, only measured as an x86 stand-in) have no representative figure:
    2D models put them before FP32 (int8 SDOT / fp16 kernels are the point of those devices),
    3D models after it (ONNX Runtime's 3D integer path builds whole-output im2col buffers and
    was no faster than FP32 where measured).
    """
    key = "full_volume_ms" if is_3d else "latency_ms_median"
    gpu = [v for v in _GPU_ORDER if v in passed]
    cpu = [v for v in passed if v not in gpu]
    figures = {v: row.figure(key) for v, row in bench_rows.items() if not row.note}
    timed = {v: f for v, f in figures.items() if f is not None}
    measured = sorted((v for v in cpu if v in timed), key=lambda v: timed[v])
    if "fp32" not in measured and "fp32" in cpu:
        measured.append("fp32")
    foreign = [v for v in cpu if v not in measured]
    if is_3d:
        order = gpu + measured + foreign
    else:
        cut = measured.index("fp32") if "fp32" in measured else len(measured)
        order = gpu + measured[:cut] + foreign + measured[cut:]
    return {v: i for i, v in enumerate(order)}


def build_manifest(build: Path, key_pem: bytes) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """The manifest document for ``build`` and the (source file, registry-relative name) pairs
    to copy. Raises PublishError when FP32 did not pass or a file differs from what was gated."""
    spec = load_spec(build)  # the model.toml copied at calibration time
    calib = read_json(build / "calibration.json")
    vdoc = VariantsDoc.read(build / "variants.json")
    if not (build / "gate.json").exists():
        raise PublishError(f"{build}: no gate.json; run `edge-deploy gate` first (nothing ungated is published)")
    gdoc = GateDoc.read(build / "gate.json")
    bench_path = build / "bench" / "report.json"
    bdoc = BenchReport.read(bench_path) if bench_path.exists() else None
    bench_rows = {r.id: r for r in (bdoc.variants if bdoc else ())}
    known = catalogue_by_id()
    gated = gdoc.variants
    fp32 = gated.get("fp32")
    if fp32 is None or not fp32.passed:
        failures = list(fp32.failures) if fp32 is not None else None
        raise PublishError(f"{spec.name}: the fp32 variant did not pass the gate ({failures}); "
                           "nothing is published without the fallback")

    passed = [r.id for r in vdoc.variants if r.built and r.id in gated and gated[r.id].may_publish]
    prio = _priorities(passed, bench_rows, spec.input.dims == 3)
    files: dict[str, str] = {}  # registry name -> sha256 (variants may share one file)
    copies: list[tuple[Path, str]] = []
    variants = []
    for rec in vdoc.variants:
        if rec.id not in passed:
            continue
        g = gated[rec.id]
        if not isinstance(g, MeasuredVariant):
            raise PublishError(f"{rec.id}: gate.json marks it publishable without its figures; re-run the gate")
        path = build / rec.file
        digest = sha256_file(path)
        if digest != g.sha256 or digest != rec.digest:
            raise PublishError(f"{path.name}: sha256 {digest} differs from the gated file {g.sha256}; re-run the gate")
        if rec.file not in files:
            files[rec.file] = digest
            copies.append((path, rec.file))
        if g.selftest is not None:
            st_path = build / g.selftest.file
            if sha256_file(st_path) != g.selftest.sha256:
                raise PublishError(f"{st_path}: changed since the gate")
            copies.append((st_path, g.selftest.file))
        v = known[rec.id]
        variants.append(_variant_entry(v, g, rec.file, digest, path.stat().st_size, prio[rec.id], bdoc,
                                       bench_rows.get(rec.id), gdoc.isa_family))
    validation_set = _validation_set(build, gdoc, copies)
    drift = read_json(build / "drift.json") if (build / "drift.json").exists() else None
    if drift is not None:
        drift = {**drift, "outputs": gdoc.drift_outputs}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "version": spec.version,
        "created_at": iso_utc(timespec="seconds"),
        "task": spec.task,
        "spec": spec.model_dump(mode="json"),
        "input_name": "input",
        "output_name": "logits",
        "fallback": "fp32",
        "variants": sorted(variants, key=lambda x: x["priority"]),
        "calibration": {k: calib.get(k) for k in ("method", "percentile", "source", "n_tensors", "tensor_shape",
                                                   "n_series", "groups", "source_sha256")},
        "validation": {**gdoc.validation.model_dump(),
                       "reference": {k: v for k, v in gdoc.reference.items()
                                     if isinstance(v, (int, float, str, dict, list))},
                       "failed_variants": {k: list(gated[k].failures) if k in gated else [] for k in gdoc.failed}},
        "drift": drift,
        "validation_set": validation_set,
        "toolchain": {**{k: str(v) for k, v in host().libraries.items()}, "edge-agent": _edge_agent_version()},
        "signing_key_id": key_id(key_pem),
    }
    # validate now: a manifest the agent would reject must never be signed
    Manifest.model_validate(doc)
    return doc, copies


def _variant_entry(v: VariantSpec, g: MeasuredVariant, file: str, digest: str, size: int, priority: int,
                   bdoc: BenchReport | None, row: BenchRow | None, gate_family: str | None) -> dict[str, Any]:
    """The manifest's record of one publishable variant: the catalogue entry, the gate's figures
    and per-family verdicts, the benchmark's figures on the build host and the self-test."""
    return {
        "id": v.id,
        "backend": v.backend,
        "precision": v.precision,
        "file": file,
        "sha256": digest,
        "size": size,
        "format": v.format,
        "options": dict(v.options),
        "execution_precision": g.execution_precision.summary,
        "requires": {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.requires.items()},
        "fast_on": list(v.fast_on),
        "targets": list(v.targets),
        "isa_gates": {fam: r.model_dump() for fam, r in g.isa_verdicts.items()},
        "description": v.description,
        "priority": priority,
        "gate": {
            "passed": True,
            "validated_with": g.validated_with,
            "n_samples": g.n_samples,
            "metrics": g.metrics,
            "reference": g.reference,
            "drops": g.drops,
            "thresholds": g.thresholds,
            "failures": [],
            "batch_invariant": bool(g.batch_invariance.passed),
            "isa_family": g.isa_family if g.isa_family is not None else (gate_family or ""),
        },
        "bench": _bench_figures(bdoc, row),
        "selftest": g.selftest.model_dump() if g.selftest is not None else None,
    }


def _bench_figures(bdoc: BenchReport | None, b: BenchRow | None) -> dict[str, Any] | None:
    """The manifest's ``bench`` of one variant: its figures measured here, why it was not
    measured, or None without a benchmark."""
    if b is not None and b.latency_ms_median is not None:
        if b.latency_ms_p95 is None or b.throughput_per_s is None or b.throughput_batch is None:
            raise PublishError(f"bench/report.json: variant {b.id} has a latency but not its other figures")
        return {
            "device": bdoc.device if bdoc else host().describe(),
            "threads": int(bdoc.threads) if bdoc else 0,
            "latency_ms_median": round(b.latency_ms_median, 3),
            "latency_ms_p95": round(b.latency_ms_p95, 3),
            "throughput_per_s": round(b.throughput_per_s, 3),
            "throughput_batch": int(b.throughput_batch),
            "peak_rss_mb": b.peak_rss_mb,
            "full_volume_ms": round(b.full_volume_ms, 1) if b.full_volume_ms is not None else None,
            "speedup_vs_fp32": b.speedup_full_volume if b.speedup_full_volume is not None else b.speedup_latency,
            "note": b.note if b.note is not None else "",
        }
    if b is not None and b.skipped:
        return {"device": bdoc.device if bdoc else "", "threads": 0, "note": b.skipped}
    return None


def _validation_set(build: Path, gdoc: GateDoc, copies: list[tuple[Path, str]]) -> dict[str, Any] | None:
    """The manifest's ``validation_set`` from gate.json's ``device_validation`` (None for a build
    gated before there was one), after checking the file is still the one the gate wrote; adds it
    to ``copies``."""
    dv = gdoc.device_validation
    if dv is None:
        return None
    path = build / dv.file
    if not path.is_file() or sha256_file(path) != dv.sha256:
        raise PublishError(f"{path}: missing or changed since the gate; re-run the gate")
    copies.append((path, dv.file))
    return dv.model_dump()


def _edge_agent_version() -> str:
    import deploy

    return str(getattr(deploy, "__version__", "0"))


def publish_build(build: Path, registry: Path, key_path: Path, force: bool = False) -> Path:
    """Publish one build folder into ``registry``; return the published manifest path."""
    key = load_private_key(key_path)
    pem = public_pem(key)
    doc, copies = build_manifest(build, pem)
    name, version = str(doc["name"]), str(doc["version"])
    final = registry / name / version
    if final.exists() and not force:
        raise PublishError(f"{final} is already published; bump the model version or pass --force")
    staging = registry / name / f".{version}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True)
        for src, rel in copies:
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        manifest_bytes = canonical_json(doc)
        (staging / "manifest.json").write_bytes(manifest_bytes)
        (staging / "manifest.json.sig").write_bytes(sign(key, manifest_bytes))
        # verify exactly what an agent will download before it becomes visible
        manifest = verify_manifest((staging / "manifest.json").read_bytes(),
                                   (staging / "manifest.json.sig").read_bytes(), [pem])
        for v in manifest.variants:
            verify_file(staging / v.file, v.sha256, v.size)
            if v.selftest is not None:
                verify_file(staging / v.selftest.file, v.selftest.sha256, v.selftest.size)
        if manifest.validation_set is not None:
            vs = manifest.validation_set
            verify_file(staging / vs.file, vs.sha256, vs.size)
        old = None
        if final.exists():  # --force: swap, then delete the old version
            old = registry / name / f".{version}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        # Ctrl-C or any failure: the half-built version never becomes visible
        shutil.rmtree(staging, ignore_errors=True)
        raise
    update_index(registry, key, pem, name, version, sha256_bytes(manifest_bytes), doc["created_at"],
                 [v["id"] for v in doc["variants"]])
    return final / "manifest.json"


def update_index(registry: Path, key: Ed25519PrivateKey, pem: bytes, name: str, version: str, digest: str, created_at: str,
                 variant_ids: Sequence[str]) -> None:
    """Merge one model version into ``registry/index.json`` and re-sign it (both written atomically)."""
    path = registry / "index.json"
    models: dict[str, Any] = {}
    if path.exists():
        try:
            models = Index.model_validate_json(path.read_bytes()).model_dump(mode="json")["models"]
        except ValueError as exc:
            raise PublishError(f"{path} exists but is not a valid registry index: {exc}") from exc
    entry = models.setdefault(name, {"latest": version, "versions": {}})
    entry["versions"][version] = {"manifest": f"{name}/{version}/manifest.json", "sha256": digest,
                                  "created_at": created_at, "variants": list(variant_ids)}
    entry["latest"] = max(entry["versions"], key=_version_key)
    doc = Index.model_validate({"schema_version": 1, "updated_at": iso_utc(timespec="seconds"), "models": models}).model_dump(mode="json")
    data = canonical_json(doc)
    atomic_write(path, data)
    atomic_write(registry / "index.json.sig", sign(key, data))


def find_builds(root: Path = Path("build/deploy")) -> list[Path]:
    """Build folders under ``root`` that have a gate.json (what ``publish`` takes by default)."""
    return sorted(p.parent for p in root.glob("*/gate.json"))


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy publish``."""
    p = subparsers.add_parser(
        "publish",
        help="sign and publish gated variants into a static registry (index.json, manifests, files)",
        description="Write REGISTRY/index.json and REGISTRY/<model>/<version>/{manifest.json, "
        "manifest.json.sig, variant files, self-tests, validation set} for every variant the gate "
        "found publishable.",
    )
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (edge-deploy keygen)")
    p.add_argument("--out", type=Path, required=True, help="registry folder (created; merged into if it exists)")
    p.add_argument("--from", dest="builds", type=Path, action="append", default=None,
                   help="build folder to publish (repeatable; default: every build/deploy/* with gate.json)")
    p.add_argument("--force", action="store_true", help="replace an already published version")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    builds = args.builds or find_builds()
    if not builds:
        raise PublishError("no build folders with a gate.json found; pass --from BUILD_DIR")
    for build in builds:
        manifest_path = publish_build(build, args.out, args.key, args.force)
        m = parse_manifest(manifest_path.read_bytes())
        print(f"published {m.name} {m.version}: {', '.join(v.id for v in m.variants)} -> {manifest_path.parent}")
    return 0

