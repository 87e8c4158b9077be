"""``edge-deploy bench``: every variant that can run here, side by side, in one run.

For each built variant of a gated build folder, a fresh subprocess (so one variant's memory and
thread pools cannot affect the next, and ``ru_maxrss`` is that variant's own peak) loads it
through the agent's backend registry and measures:

* latency at batch 1 (median and p95 over ``--iterations`` runs, after ``--warmup``) on a real
  preprocessed input (the first calibration tensor: a slice, or a sliding-window patch);
* throughput at batch ``--batch`` (inputs per second);
* 3D models: one FULL preprocessed phantom volume through ``agent.imaging.sliding_window_inference``
  (the agent's code, batch 1, the spec's patch and overlap), median of ``--volume-runs``;
* peak RSS of the process (model + runtime + buffers, Python included).

Variants that need hardware this host lacks (TensorRT: an NVIDIA GPU) are listed with the reason.
Variants whose ``requires`` this host does not meet but that still run here (ARM-only INT8, FP16
on an x86 CPU) are measured and flagged: their figures are not those of their target devices.
Variants the gate refused (not publishable) or failed for this host's instruction-set family
(devices like this one never run them) are listed with the first failure and not timed.

Besides the agent's own FP32 (ONNX Runtime, spinning off so idle threads leave the CPU to the DICOM
listener) the report measures ``fp32-ort-default``: the FP32 file on ONNX Runtime as a user runs it
by default (2 threads, spinning on). The speed targets (``deploy.bench_report.TARGETS``, per
instruction-set family) are ratios against that baseline.

Writes ``bench/report.json``, ``bench/report.md`` and ``bench/report.png`` (size, latency and
accuracy per variant) in the build folder, joined with the gate's figures and the speed targets.
The machine's load average is recorded before and after each measurement: on a shared 2-core
machine other jobs skew latencies, and the report says so.

This module plans the runs, drives the workers and keeps each variant's best round; the worker
and the layer profile are ``deploy.bench_measure``, the report ``deploy.bench_report``
(:class:`deploy.records.BenchReport`).
"""


from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.errors import EdgeAgentError
from agent.core.modelspec import ModelSpec, load_spec
from agent.core.util import atomic_path
from deploy.bench_measure import Measurement, WorkerConfig, profile_layers, worker_main
from deploy.bench_report import (
    DEFAULT_BASELINE,
    DEFAULT_BASELINE_THREADS,
    TARGETS,
    render_chart,
    render_markdown,
    summarise,
)
from deploy.calibrate import config_from_args
from deploy.records import (
    BenchReport,
    BenchRow,
    GateDoc,
    LayerProfile,
    MeasuredVariant,
    VariantRecord,
    VariantsDoc,
    VariantVerdict,
)
from deploy.variants import Host, catalogue_by_id, child_env, default_build_dir, host

__all__ = ["DEFAULT_BASELINE", "TARGETS", "BenchError", "bench", "bench_volume", "render_markdown"]

logger = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 1800


class BenchError(EdgeAgentError):
    """The benchmark could not run."""


def bench_volume(spec: ModelSpec, build: Path, seed: int) -> Path:
    """A preprocessed full CT volume for the 3D benchmark (phantom ``seed``, index 0, at the
    default 512 matrix), prepared by the agent's own code; cached in ``build/bench/volume.npy``."""
    from agent.imaging import build_volume, prepare
    from deploy.synth import derive_seed, make_ct_phantom

    path = build / "bench" / "volume.npy"
    if path.exists():
        return path
    ph = make_ct_phantom(derive_seed(seed, 0), index=0, size=512)
    image = prepare(build_volume(ph.datasets), spec.input).array
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(image, dtype=np.float32))
    return path


def bench(model_dir: Path, build: Path, *, threads: int = 2, iterations: int = 30, warmup: int = 5,
          batch: int | None = None,
          volume_runs: int = 3, variant_ids: Sequence[str] | None = None, seed: int = 300001,
          rounds: int = 1) -> BenchReport:
    """Benchmark every runnable variant of ``build`` (``rounds`` interleaved passes, best kept);
    write bench/report.{json,md,png}; return the report document."""
    from tqdm import tqdm

    spec = load_spec(model_dir)
    # throughput batch: 4 slices, or 2 patches for 3D (a batch of 4 64x96x96 patches costs ONNX
    # Runtime's 3D integer convolutions GBs of im2col buffers)
    batch = batch or (2 if spec.input.dims == 3 else 4)
    vdoc = VariantsDoc.read(build / "variants.json")
    gdoc = GateDoc.read(build / "gate.json") if (build / "gate.json").exists() else None
    me = host()
    (build / "bench").mkdir(parents=True, exist_ok=True)
    sample = build / "calibration.npy"
    if not sample.exists():
        raise BenchError(f"{sample} not found: run `edge-deploy calibrate` first")
    volume = bench_volume(spec, build, seed) if spec.input.dims == 3 else None
    records = vdoc.selected(variant_ids)
    template = WorkerConfig(path="", backend="", precision="", threads=threads, sample=str(sample),
                            iterations=iterations, warmup=warmup, batch=batch)
    if volume is not None:
        template = template.model_copy(update={
            "volume": str(volume), "patch": tuple(spec.input.patch_size or ()), "overlap": spec.input.overlap,
            "volume_runs": volume_runs})
    rows: dict[str, BenchRow] = {}
    jobs: list[tuple[str, WorkerConfig]] = []
    for rec in records:
        for vid, row, cfg in _plan(rec, gdoc, me, build, template):
            rows[vid] = row
            if cfg is not None:
                jobs.append((vid, cfg))
    # rounds: all variants once, then again, so a burst of load from other jobs on a shared machine
    # hits every variant alike instead of one; each variant keeps its best round
    attempts: dict[str, list[_Attempt]] = {vid: [] for vid, _ in jobs}
    bar = tqdm(total=len(jobs) * rounds, desc="bench", unit="run", file=sys.stderr)
    for _ in range(rounds):
        for vid, cfg in jobs:
            bar.set_postfix_str(vid)
            attempts[vid].append(_measure(cfg))
            bar.update(1)
    bar.close()
    for vid, tried in attempts.items():
        rows[vid] = BenchRow.model_validate({**rows[vid].model_dump(), **_best(tried)})

    doc = summarise(spec, list(rows.values()), me.describe(), threads, iterations, batch, me.isa_family)
    # where the time goes: per-layer profile of FP32 and of the fastest passing variant, so the
    # report can say why the speed-up is what it is
    profiles: dict[str, LayerProfile] = {}
    known = catalogue_by_id()
    for wanted in dict.fromkeys(["fp32", doc.target.fastest]):
        profiled = next((r for r in records if r.id == wanted), None)
        if profiled is not None and profiled.id in attempts:
            try:
                profiles[profiled.id] = profile_layers(known[profiled.id], build / profiled.file, sample, threads)
            except (RuntimeError, ValueError, OSError) as exc:  # profiling is informative only
                logger.warning("profiling %s failed: %s", profiled.id, exc)
            gc.collect()  # the profiling session's buffers (GBs for 3D ORT) before the next one
    doc = doc.model_copy(update={"rounds": rounds, "profiles": profiles})
    doc.write(build / "bench" / "report.json")
    with atomic_path(build / "bench" / "report.md") as tmp:
        tmp.write_text(render_markdown(doc))
    render_chart(doc, build / "bench" / "report.png")
    return doc


def _plan(rec: VariantRecord, gdoc: GateDoc | None, me: Host, build: Path,
          template: WorkerConfig) -> list[tuple[str, BenchRow, WorkerConfig | None]]:
    """The report row(s) of ``rec`` and the worker config of each row to time (None: not timed,
    the row says why). FP32 brings the ``fp32-ort-default`` baseline row with it."""
    v = catalogue_by_id()[rec.id]
    gate_rec = gdoc.variants.get(v.id) if gdoc is not None else None
    measured = gate_rec if isinstance(gate_rec, MeasuredVariant) else None
    unmet = me.unmet(v.requires)
    refusal = _refusal(gate_rec, me.isa_family) if gdoc is not None else None
    skipped = note = None
    if not rec.built:
        skipped = f"not built: {rec.reason}"
    elif refusal:
        # timing a variant no device of this family will run wastes the build's time (the CT
        # build spent most of its 479 s bench on variants that had failed)
        skipped = refusal
    elif not v.native_here:
        skipped = f"not run here: {'; '.join(unmet) or 'needs its own runtime'} (gate ran a CPU simulation)"
    elif v.backend not in me.libraries and v.backend != "onnxruntime":
        skipped = f"{v.backend} not installed here"
    elif unmet:
        note = f"this host does not meet its requirements ({'; '.join(unmet)}): figures are for this host, not its target"
    row = BenchRow(id=v.id, backend=v.backend, precision=v.precision, file=rec.file,
                   size_mb=round((rec.size or 0) / 1e6, 3), gate_passed=bool(gate_rec and gate_rec.passed),
                   gate_metrics=measured.metrics if measured else {},
                   gate_failures=gate_rec.failures if gate_rec else (),
                   execution_precision=measured.execution_precision.summary if measured else "",
                   skipped=skipped, note=note)
    if skipped is not None:
        return [(v.id, row, None)]
    cfg = template.model_copy(update={"path": str(build / rec.file), "backend": v.backend,
                                      "precision": v.precision, "options": dict(v.options)})
    if v.id != "fp32":
        return [(v.id, row, cfg)]
    return [(v.id, row, cfg), (DEFAULT_BASELINE, *_default_baseline(row, cfg))]


def _refusal(gate_rec: VariantVerdict | None, family: str) -> str | None:
    """Why a variant is not timed here: the gate refused it, or failed it for this host's family
    (devices like this one skip it); None when it is to be timed."""
    if gate_rec is None or not gate_rec.passed:
        failures = list(gate_rec.failures) if gate_rec is not None else []
        first = (failures or [(gate_rec.verdict_note if gate_rec is not None else None) or "no gate verdict"])[0]
        return f"refused by the gate: {first}"
    mine = gate_rec.isa_verdicts.get(family)
    if mine is not None and not mine.passed:
        return (f"refused on {family} devices like this host (failed the {mine.method} gate: {mine.summary}); "
                "published for other families")
    return None


def _default_baseline(fp32_row: BenchRow, fp32_cfg: WorkerConfig) -> tuple[BenchRow, WorkerConfig]:
    """The ``fp32-ort-default`` row and worker config: the fp32 file on ONNX Runtime as a user runs
    it by default: 2 threads, idle threads spin-waiting (the agent's backend turns that off)."""
    row = fp32_row.model_copy(update={
        "id": DEFAULT_BASELINE, "options": {"allow_spinning": True}, "threads": DEFAULT_BASELINE_THREADS,
        "note": "baseline of the speed targets: ONNX Runtime FP32 as a user runs it by default "
                f"({DEFAULT_BASELINE_THREADS} threads, spinning on)"})
    cfg = fp32_cfg.model_copy(update={"backend": "onnxruntime", "options": {"allow_spinning": True},
                                      "threads": DEFAULT_BASELINE_THREADS})
    return row, cfg


@dataclass(frozen=True)
class _Attempt:
    """One worker run: the load average around it, and its figures or why there are none."""

    loadavg_before: list[float]
    loadavg_after: list[float] | None = None
    error: str | None = None
    figures: Measurement | None = None


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _measure(cfg: WorkerConfig) -> _Attempt:
    """One worker subprocess for one variant: its figures, or the error."""
    before = _loadavg()
    try:
        proc = subprocess.run([sys.executable, "-m", "deploy.bench", "--worker", json.dumps(cfg.model_dump())],
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False,
                              env=child_env())
    except subprocess.TimeoutExpired:
        return _Attempt(before, error=f"timed out after {WORKER_TIMEOUT_S} s")
    after = _loadavg()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return _Attempt(before, after, error=f"worker exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return _Attempt(before, after, figures=Measurement.model_validate_json(lines[-1]))


def _best(attempts: Sequence[_Attempt]) -> dict[str, Any]:
    """Combine rounds into the row's figures: the round with the lowest batch-1 median, the lowest
    full-volume time, the highest peak RSS (memory is not luck) and every round's medians."""
    ok = [(a, a.figures) for a in attempts if a.figures is not None]
    if not ok:
        last = attempts[-1]
        return {"loadavg_before": last.loadavg_before, "loadavg_after": last.loadavg_after, "error": last.error}
    chosen, figures = min(ok, key=lambda af: af[1].latency_ms_median)
    best: dict[str, Any] = {"loadavg_before": chosen.loadavg_before, "loadavg_after": chosen.loadavg_after,
                            **figures.model_dump()}
    volumes = [(m.full_volume_ms, m) for _, m in ok if m.full_volume_ms is not None]
    if len(volumes) == len(ok):
        fastest = min(volumes, key=lambda vm: vm[0])[1].model_dump()
        for k in ("full_volume_ms", "full_volume_inference_ms", "full_volume_outside_ms", "full_volume_patches"):
            if k in fastest:
                best[k] = fastest[k]
    best["peak_rss_mb"] = max(m.peak_rss_mb for _, m in ok)
    best["round_medians_ms"] = [round(m.latency_ms_median, 2) for _, m in ok]
    return best


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy bench``."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark every variant that runs here (latency p50/p95, throughput, full volume, peak RSS)",
        description="Run each built variant in its own subprocess through the agent's backends; write "
        "bench/report.md, report.json and report.png with sizes, latencies, memory and the gate's accuracy.",
    )
    p.add_argument("model_dir", type=Path, help="model folder with model.toml")
    p.add_argument("--build", type=Path, default=None, help="build folder (default build/deploy/<model>)")
    p.add_argument("--variants", default="", help="comma-separated variant ids (default: all built)")
    p.add_argument("--iterations", type=int, default=30, help="timed batch-1 runs per variant (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--batch", type=int, default=None, help="batch size for throughput (default 4; 3D: 2)")
    p.add_argument("--volume-runs", type=int, default=3, help="3D: full-volume runs per variant (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved passes over all variants; best kept (default 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    spec = load_spec(args.model_dir)
    cfg = config_from_args(args.model_dir, argparse.Namespace(threads=args.threads))
    build = args.build or default_build_dir(spec.name)
    ids = [v for v in args.variants.split(",") if v] or None
    doc = bench(args.model_dir, build, threads=cfg.threads, iterations=args.iterations, warmup=args.warmup,
                batch=args.batch, volume_runs=args.volume_runs, variant_ids=ids, seed=cfg.validation_seed,
                rounds=max(1, args.rounds))
    print(render_markdown(doc))
    return 0


if __name__ == "__main__":  # the per-variant worker: python -m deploy.bench --worker JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    print("usage: python -m deploy.bench --worker JSON (use `edge-deploy bench` instead)", file=sys.stderr)
    sys.exit(2)
