"""``edge-deploy build``: calibrate -> quantize -> gate -> bench -> publish, in one go.

``edge-deploy build models/<name> --key KEY --out REGISTRY`` runs every stage for one model into
its build folder (``build/deploy/<name>`` unless ``--build``) and publishes the variants that
passed the gate into the registry (merging ``index.json`` with what it already holds). Each
stage writes its outputs atomically, so an interrupted build can simply be run again.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.modelspec import load_spec
from deploy.calibrate import add_calibration_flags, calibrate, config_from_args
from deploy.records import BenchTarget
from deploy.variants import default_build_dir


@dataclass(frozen=True)
class BuildSummary:
    """What one build did: the gate's verdicts, the speed target (None without a benchmark), the
    published manifest and each stage's seconds."""

    model: str
    version: str
    build: str
    manifest: str
    passed: tuple[str, ...]
    failed: tuple[str, ...]
    target: BenchTarget | None
    isa_family: str
    seconds: dict[str, float]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(model_dir: Path, key: Path, registry: Path, args: argparse.Namespace) -> BuildSummary:
    """Run all stages for ``model_dir``; return a summary (stage timings, gate verdicts, targets,
    manifest path)."""
    from deploy.bench import bench
    from deploy.gate import format_report, gate
    from deploy.publish import publish_build
    from deploy.quantize import quantize

    spec = load_spec(model_dir)
    cfg = config_from_args(model_dir, args)
    out = args.build or default_build_dir(spec.name)
    ids = [v for v in (args.variants or "").split(",") if v] or None
    timings: dict[str, float] = {}

    def stage(name: str) -> float:
        _say(f"== {spec.name}: {name}")
        return time.perf_counter()

    t = stage("calibrate")
    calibrate(model_dir, out, cfg, args.dicom)
    timings["calibrate"] = time.perf_counter() - t
    t = stage("quantize")
    quantize(out, ids)
    timings["quantize"] = time.perf_counter() - t
    t = stage("gate")
    gdoc = gate(model_dir, out, cfg, ids, None, args.val_n)
    timings["gate"] = time.perf_counter() - t
    _say(format_report(gdoc))
    bdoc = None
    if not args.skip_bench:
        t = stage("bench")
        bdoc = bench(model_dir, out, threads=cfg.threads, iterations=args.iterations, variant_ids=ids,
                     seed=cfg.validation_seed, rounds=max(1, args.rounds))
        timings["bench"] = time.perf_counter() - t
    t = stage("publish")
    manifest = publish_build(out, registry, key, force=args.force)
    timings["publish"] = time.perf_counter() - t
    return BuildSummary(model=spec.name, version=spec.version, build=str(out), manifest=str(manifest),
                        passed=gdoc.passed, failed=gdoc.failed, target=bdoc.target if bdoc else None,
                        isa_family=gdoc.isa_family or "", seconds={k: round(v, 1) for k, v in timings.items()})


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy build``."""
    p = subparsers.add_parser(
        "build",
        help="calibrate, quantize, gate, benchmark and publish one model in one go",
        description="Run calibrate -> quantize -> gate -> bench -> publish for MODEL_DIR and publish the "
        "variants that passed the gate into REGISTRY (index.json is merged).",
    )
    p.add_argument("model_dir", type=Path, help="model folder with model.toml (e.g. models/ct-abdomen-seg)")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (edge-deploy keygen)")
    p.add_argument("--out", type=Path, required=True, help="registry folder")
    p.add_argument("--build", type=Path, default=None, help="build folder (default build/deploy/<model>)")
    p.add_argument("--variants", default="", help="comma-separated variant ids (default: all)")
    p.add_argument("--val-n", type=int, default=None, help="validation series (default from model.toml / 480 / 6)")
    p.add_argument("--iterations", type=int, default=30, help="benchmark: timed runs per variant")
    p.add_argument("--rounds", type=int, default=1, help="benchmark: interleaved passes, best kept")
    p.add_argument("--skip-bench", action="store_true", help="publish without benchmark figures")
    p.add_argument("--force", action="store_true", help="replace an already published version")
    add_calibration_flags(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    summary = build(args.model_dir, args.key, args.out, args)
    print(f"{summary.model} {summary.version} (gated on {summary.isa_family}): published "
          f"{', '.join(summary.passed)}"
          + (f"; failed the gate: {', '.join(summary.failed)}" if summary.failed else ""))
    t = summary.target
    if t and t.goal_speedup:
        print(f"target for {t.isa_family} {t.goal_speedup}x over {t.baseline} ({t.metric}): "
              f"{t.speedup}x with {t.fastest}: "
              f"{'met' if t.met else 'NOT met'}")
    print(f"manifest: {summary.manifest}  (stage seconds: {summary.seconds})")
    return 0
