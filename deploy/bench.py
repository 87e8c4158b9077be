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
by default (2 threads, spinning on). The speed targets (:data:`TARGETS`, per instruction-set
family) are ratios against that baseline.

Writes ``bench/report.json``, ``bench/report.md`` and ``bench/report.png`` (size, latency and
accuracy per variant) in the build folder, joined with the gate's figures and the speed targets.
The machine's load average is recorded before and after each measurement: on a shared 2-core
machine other jobs skew latencies, and the report says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import EdgeAgentError
from agent.modelspec import ModelSpec, load_spec
from deploy.calibrate import config_from_args
from deploy.variants import (
    atomic_path,
    catalogue_by_id,
    child_env,
    default_build_dir,
    host,
    read_json,
    write_json,
)

logger = logging.getLogger(__name__)

#: speed-up of the fastest publishable variant over ONNX Runtime FP32 as a user runs it by default
#: (:data:`DEFAULT_BASELINE`) that each reference model must reach on a 2-core machine of each
#: instruction-set family (agent.isa): MR per slice, CT on a full volume. Without VNNI the integer
#: kernels gain less (VPMADDUBSW pairs, 7-bit weights), hence the lower x86-avx2 figures.
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "x86-avx2": {"mr-brain-cls": ("latency_ms_median", 2.0), "ct-abdomen-seg": ("full_volume_ms", 4.5)},
    "x86-vnni": {"mr-brain-cls": ("latency_ms_median", 3.5), "ct-abdomen-seg": ("full_volume_ms", 6.0)},
}
#: the baseline row: the FP32 file on ONNX Runtime with its default spin-waiting, 2 threads
DEFAULT_BASELINE = "fp32-ort-default"
DEFAULT_BASELINE_THREADS = 2
WORKER_TIMEOUT_S = 1800


class BenchError(EdgeAgentError):
    """The benchmark could not run."""


# --------------------------------------------------------------------------------------------
# Worker (runs in its own process)
# --------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def run_worker(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Measure one variant in this process (see the module docstring); return its figures.

    ``cfg``: path, backend, precision, options, threads, sample (npy path), iterations, warmup,
    batch, and for 3D models volume (npy path), patch, overlap, volume_runs.
    """
    from agent.inference import registry

    rss_start = _peak_rss_mb()
    sample = np.load(cfg["sample"], mmap_mode="r")
    x1 = np.ascontiguousarray(sample[:1], dtype=np.float32)
    backend = registry.create(cfg["backend"])
    options = dict(cfg.get("options", {}))
    options["warmup_shape"] = list(x1.shape)
    t0 = time.perf_counter()
    backend.load(Path(cfg["path"]), precision=cfg["precision"], threads=int(cfg["threads"]), options=options)
    load_s = time.perf_counter() - t0
    info = backend.describe()
    for _ in range(int(cfg["warmup"])):
        backend.run(x1)
    lat = []
    for _ in range(int(cfg["iterations"])):
        t = time.perf_counter()
        backend.run(x1)
        lat.append((time.perf_counter() - t) * 1000.0)
    out: dict[str, Any] = {
        "latency_ms_median": float(np.median(lat)),
        "latency_ms_p95": _percentile(lat, 95),
        "latency_ms_min": float(np.min(lat)),
        "load_s": round(load_s, 2),
        "backend_precision": info.precision,
        "backend_version": info.version,
    }
    if cfg.get("volume"):
        from agent.imaging import sliding_window_inference

        volume = np.load(cfg["volume"])
        runs, in_backend, calls = [], [], []
        for _ in range(int(cfg.get("volume_runs", 3))):
            timed = _TimedPredict(backend.run)
            t = time.perf_counter()
            sliding_window_inference(volume, tuple(cfg["patch"]), float(cfg["overlap"]), timed, batch_size=1)
            runs.append((time.perf_counter() - t) * 1000.0)
            in_backend.append(timed.ms)
            calls.append(timed.calls)
        k = int(np.argsort(runs)[len(runs) // 2])  # the median run, split into its two parts
        out["full_volume_ms"] = float(np.median(runs))
        out["full_volume_runs_ms"] = [round(r, 1) for r in runs]
        # the same volume costs every variant the same sliding-window work outside the backend
        # (patch extraction, Gaussian blending, the final division): Amdahl's share of the speed-up
        out["full_volume_inference_ms"] = round(in_backend[k], 1)
        out["full_volume_outside_ms"] = round(runs[k] - in_backend[k], 1)
        out["full_volume_patches"] = calls[k]
    # peak RSS at batch 1 (what the agent's pipeline allocates) before the batch-N throughput run
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    batch = int(cfg["batch"])
    if batch > 1:
        xb = np.ascontiguousarray(np.repeat(x1, batch, axis=0))
        backend.run(xb)
        tb = []
        for _ in range(max(3, int(cfg["iterations"]) // batch)):
            t = time.perf_counter()
            backend.run(xb)
            tb.append(time.perf_counter() - t)
        out["throughput_per_s"] = batch / float(np.median(tb))
        out["throughput_batch"] = batch
    else:
        out["throughput_per_s"] = 1000.0 / out["latency_ms_median"]
        out["throughput_batch"] = 1
    out["peak_rss_mb_batch"] = round(_peak_rss_mb(), 1)
    out["rss_before_load_mb"] = round(rss_start, 1)
    return out


class _TimedPredict:
    """Wraps a backend's ``run``: counts the calls and the milliseconds spent inside it."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self.ms = 0.0
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        try:
            return self._run(batch)
        finally:
            self.ms += (time.perf_counter() - t) * 1000.0
            self.calls += 1


def _peak_rss_mb() -> float:
    """This process's own peak RSS in MiB.

    ``ru_maxrss`` of a freshly exec'd child starts at the *parent's* RSS at fork time on Linux
    (the forked copy of the parent's address space is folded into it at exec), so a 600 MB parent
    would make every worker report >= 600 MB. ``VmHWM`` in /proc/self/status belongs to the
    process's current address space only; ``ru_maxrss`` is the fallback where /proc is absent.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError as exc:
        logger.debug("no /proc/self/status (%s); using ru_maxrss", exc)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_main(argv: Sequence[str]) -> int:
    cfg = json.loads(argv[0])
    # the worker's stdout carries exactly one JSON line; libraries' chatter goes to stderr
    result = run_worker(cfg)
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


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
          rounds: int = 1) -> dict[str, Any]:
    """Benchmark every runnable variant of ``build`` (``rounds`` interleaved passes, best kept);
    write bench/report.{json,md,png}; return the report document."""
    from tqdm import tqdm

    spec = load_spec(model_dir)
    # throughput batch: 4 slices, or 2 patches for 3D (a batch of 4 64x96x96 patches costs ONNX
    # Runtime's 3D integer convolutions GBs of im2col buffers)
    batch = batch or (2 if spec.input.dims == 3 else 4)
    vdoc = read_json(build / "variants.json")
    gdoc = read_json(build / "gate.json") if (build / "gate.json").exists() else {"variants": {}}
    known = catalogue_by_id()
    me = host()
    (build / "bench").mkdir(parents=True, exist_ok=True)
    sample = build / "calibration.npy"
    if not sample.exists():
        raise BenchError(f"{sample} not found: run `edge-deploy calibrate` first")
    volume = bench_volume(spec, build, seed) if spec.input.dims == 3 else None
    records = [r for r in vdoc["variants"] if not variant_ids or r["id"] in variant_ids or r["id"] == "fp32"]
    gated = (build / "gate.json").exists()
    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    jobs: list[tuple[str, dict[str, Any]]] = []
    for rec in records:
        v = known[rec["id"]]
        gate_rec = gdoc["variants"].get(v.id, {})
        row: dict[str, Any] = {
            "id": v.id, "backend": v.backend, "precision": v.precision, "file": rec["file"],
            "size_mb": round(rec.get("size", 0) / 1e6, 3), "gate_passed": bool(gate_rec.get("passed")),
            "gate_metrics": gate_rec.get("metrics", {}), "gate_failures": gate_rec.get("failures", []),
            "execution_precision": gate_rec.get("execution_precision", {}).get("summary", ""),
        }
        rows[v.id] = row
        unmet = me.unmet(v.requires)
        refusal = _refusal(gate_rec, me.isa_family) if gated else None
        if not rec["built"]:
            row["skipped"] = f"not built: {rec.get('reason')}"
        elif refusal:
            # timing a variant no device of this family will run wastes the build's time (the CT
            # build spent most of its 479 s bench on variants that had failed)
            row["skipped"] = refusal
        elif not v.native_here:
            row["skipped"] = f"not run here: {'; '.join(unmet) or 'needs its own runtime'} (gate ran a CPU simulation)"
        elif v.backend not in me.libraries and v.backend != "onnxruntime":
            row["skipped"] = f"{v.backend} not installed here"
        else:
            if unmet:
                row["note"] = f"this host does not meet its requirements ({'; '.join(unmet)}): figures are for this host, not its target"
            cfg = {
                "path": str(build / rec["file"]), "backend": v.backend, "precision": v.precision,
                "options": dict(v.options), "threads": threads, "sample": str(sample),
                "iterations": iterations, "warmup": warmup, "batch": batch,
            }
            if volume is not None:
                cfg.update(volume=str(volume), patch=list(spec.input.patch_size or ()), overlap=spec.input.overlap,
                           volume_runs=volume_runs)
            jobs.append((v.id, cfg))
            runs[v.id] = []
            if v.id == "fp32":
                rows[DEFAULT_BASELINE], cfg_default = _default_baseline(row, cfg)
                jobs.append((DEFAULT_BASELINE, cfg_default))
                runs[DEFAULT_BASELINE] = []
    # rounds: all variants once, then again, so a burst of load from other jobs on a shared machine
    # hits every variant alike instead of one; each variant keeps its best round
    bar = tqdm(total=len(jobs) * rounds, desc="bench", unit="run", file=sys.stderr)
    for _ in range(rounds):
        for vid, cfg in jobs:
            bar.set_postfix_str(vid)
            runs[vid].append(_measure(cfg))
            bar.update(1)
    bar.close()
    for vid, results in runs.items():
        rows[vid].update(_best(results))

    doc = _summarise(spec, list(rows.values()), me.describe(), threads, iterations, batch, me.isa_family)
    doc["rounds"] = rounds
    # where the time goes: per-layer profile of FP32 and of the fastest passing variant, so the
    # report can say why the speed-up is what it is
    doc["profiles"] = {}
    for vid in dict.fromkeys(["fp32", doc["target"].get("fastest")]):
        rec = next((r for r in records if r["id"] == vid), None)
        if vid and rec is not None and vid in runs:
            try:
                doc["profiles"][vid] = profile_layers(known[vid], build / rec["file"], sample, threads)
            except (RuntimeError, ValueError, OSError) as exc:  # profiling is informative only
                logger.warning("profiling %s failed: %s", vid, exc)
            gc.collect()  # the profiling session's buffers (GBs for 3D ORT) before the next one
    write_json(build / "bench" / "report.json", doc)
    with atomic_path(build / "bench" / "report.md") as tmp:
        tmp.write_text(render_markdown(doc))
    render_chart(doc, build / "bench" / "report.png")
    return doc


def _refusal(gate_rec: Mapping[str, Any], family: str) -> str | None:
    """Why a variant is not timed here: the gate refused it, or failed it for this host's family
    (devices like this one skip it); None when it is to be timed."""
    if not gate_rec.get("passed"):
        first = (gate_rec.get("failures") or [gate_rec.get("verdict_note") or "no gate verdict"])[0]
        return f"refused by the gate: {first}"
    mine = gate_rec.get("isa_verdicts", {}).get(family)
    if mine is not None and not mine["passed"]:
        return (f"refused on {family} devices like this host (failed the {mine['method']} gate: {mine['summary']}); "
                "published for other families")
    return None


def _default_baseline(fp32_row: Mapping[str, Any], fp32_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``fp32-ort-default`` row and worker config: the fp32 file on ONNX Runtime as a user runs
    it by default: 2 threads, idle threads spin-waiting (the agent's backend turns that off)."""
    row = {**fp32_row, "id": DEFAULT_BASELINE, "options": {"allow_spinning": True},
           "threads": DEFAULT_BASELINE_THREADS,
           "note": "baseline of the speed targets: ONNX Runtime FP32 as a user runs it by default "
                   f"({DEFAULT_BASELINE_THREADS} threads, spinning on)"}
    cfg = {**fp32_cfg, "backend": "onnxruntime", "options": {"allow_spinning": True},
           "threads": DEFAULT_BASELINE_THREADS}
    return row, cfg


def _measure(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One worker subprocess for one variant; its figures, or ``{"error": ...}``."""
    out: dict[str, Any] = {"loadavg_before": _loadavg()}
    try:
        proc = subprocess.run([sys.executable, "-m", "deploy.bench", "--worker", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False,
                              env=child_env())
    except subprocess.TimeoutExpired:
        out["error"] = f"timed out after {WORKER_TIMEOUT_S} s"
        return out
    out["loadavg_after"] = _loadavg()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        out["error"] = f"worker exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
    else:
        out.update(json.loads(lines[-1]))
    return out


def _best(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine rounds: the round with the lowest batch-1 median, the lowest full-volume time, the
    highest peak RSS (memory is not luck) and every round's medians for the record."""
    ok = [r for r in results if "latency_ms_median" in r]
    if not ok:
        return dict(results[-1])
    best = dict(min(ok, key=lambda r: r["latency_ms_median"]))
    if all("full_volume_ms" in r for r in ok):
        fastest = min(ok, key=lambda r: r["full_volume_ms"])
        for k in ("full_volume_ms", "full_volume_inference_ms", "full_volume_outside_ms", "full_volume_patches"):
            if k in fastest:
                best[k] = fastest[k]
    best["peak_rss_mb"] = max(r.get("peak_rss_mb", 0.0) for r in ok)
    best["round_medians_ms"] = [round(r["latency_ms_median"], 2) for r in ok]
    return best


def profile_layers(v: Any, path: Path, sample: Path, threads: int, runs: int = 5, top: int = 8) -> dict[str, Any]:
    """Per-layer time of ``v`` on the first calibration tensor: OpenVINO's PERF_COUNT, or ONNX
    Runtime's profiler. Returns total ms and the ``top`` layers (name, type, kernel, ms), and
    per op type sums."""
    import collections
    import tempfile

    x = np.ascontiguousarray(np.load(sample, mmap_mode="r")[:1], dtype=np.float32)
    per_layer: collections.Counter[tuple[str, str, str]] = collections.Counter()
    if v.backend == "openvino":
        import openvino as ov

        core = ov.Core()
        hint = str(v.options.get("inference_precision", "f32"))
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "PERF_COUNT": True})
        req = compiled.create_infer_request()
        req.infer({0: x})
        for _ in range(runs):
            req.infer({0: x})
            for p in req.profiling_info:
                per_layer[(p.node_name, p.node_type, p.exec_type)] += p.real_time.total_seconds() * 1000.0 / runs
    else:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="edge-deploy-prof-") as tmp:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "ort")
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            sess.run(None, {name: x})
            for _ in range(runs):
                sess.run(None, {name: x})
            events = json.loads(Path(sess.end_profiling()).read_text())
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                args = e.get("args", {})
                per_layer[(e["name"][: -len("_kernel_time")], args.get("op_name", ""),
                           args.get("provider", ""))] += e.get("dur", 0) / 1000.0 / (runs + 1)
    by_type: collections.Counter[str] = collections.Counter()
    for (_, op, _k), ms in per_layer.items():
        by_type[op] += ms
    return {
        "total_ms": round(sum(per_layer.values()), 1),
        "top_layers": [{"name": n, "type": t, "kernel": k, "ms": round(ms, 2)} for (n, t, k), ms in per_layer.most_common(top)],
        "by_type_ms": {k: round(ms, 1) for k, ms in by_type.most_common()},
    }


def _summarise(spec: ModelSpec, rows: list[dict[str, Any]], device: str, threads: int, iterations: int,
               batch: int, family: str | None = None) -> dict[str, Any]:
    """Add speed-ups (vs the agent's ORT FP32, and vs ORT FP32 as run by default) and the target
    verdict for this host's instruction-set family (``family``; default: this host's)."""
    family = family or host().isa_family
    base = next((r for r in rows if r["id"] == "fp32" and "latency_ms_median" in r), None)
    default = next((r for r in rows if r["id"] == DEFAULT_BASELINE and "latency_ms_median" in r), None)
    key, goal = TARGETS.get(family, {}).get(
        spec.name, ("full_volume_ms" if spec.input.dims == 3 else "latency_ms_median", None))
    for r in rows:
        if base is None or "latency_ms_median" not in r:
            continue
        r["speedup_latency"] = round(base["latency_ms_median"] / r["latency_ms_median"], 2)
        if "full_volume_ms" in r and "full_volume_ms" in base:
            r["speedup_full_volume"] = round(base["full_volume_ms"] / r["full_volume_ms"], 2)
        if r.get("full_volume_inference_ms") and base.get("full_volume_inference_ms"):
            r["speedup_full_volume_inference"] = round(base["full_volume_inference_ms"] / r["full_volume_inference_ms"], 2)
        if default is not None and key in r and key in default:
            r["speedup_vs_default"] = round(default[key] / r[key], 2)
    # the baseline of the target: ORT as run by default; the agent's FP32 when it was not measured
    ref = default or base
    measured = [r for r in rows if r.get("gate_passed") and key in r and r["id"] not in ("fp32", DEFAULT_BASELINE)]
    target: dict[str, Any] = {"metric": key, "goal_speedup": goal, "isa_family": family,
                              "baseline": ref["id"] if ref else None}
    if ref is not None and measured and key in ref:
        best = min(measured, key=lambda r: r[key])
        target.update(fastest=best["id"], speedup=round(ref[key] / best[key], 2),
                      met=None if goal is None else bool(ref[key] / best[key] >= goal))
    else:
        target.update(fastest=None, speedup=None, met=False if goal else None)
    return {
        "model": spec.name, "version": spec.version, "task": spec.task, "device": device, "isa_family": family,
        "platform": platform.platform(), "threads": threads, "iterations": iterations, "batch": batch,
        "patch": list(spec.input.patch_size) if spec.input.patch_size else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": rows, "target": target,
    }


def _accuracy_key(doc: Mapping[str, Any]) -> str:
    return "accuracy" if doc["task"] == "classification" else "mean_dice"


def render_markdown(doc: Mapping[str, Any]) -> str:
    """report.md: one table, the target verdict, and notes (load, skipped variants)."""
    acc = _accuracy_key(doc)
    is_3d = doc.get("patch") is not None
    head = ["variant", "backend", "executes as", "size MB", "p50 ms", "p95 ms", "thr/s"]
    if is_3d:
        head += ["volume s", "x FP32 (vol)"]
    head += ["x FP32 (b1)", "x ORT default", "peak RSS MB (b1)", acc, "agree", "gate"]
    lines = [f"# {doc['model']} {doc['version']}: variants side by side", "",
             f"Measured {doc['created_at']} on {doc['device']} (instruction-set family "
             f"{doc.get('isa_family', '?')}), {doc['threads']} threads, batch 1 latency over "
             f"{doc['iterations']} runs (best of {doc.get('rounds', 1)} interleaved round(s)), throughput at batch {doc['batch']}" +
             (f", full volume: sliding window over one preprocessed 512-matrix phantom, patch {doc['patch']}" if is_3d else "") + ".",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x: Any, nd: int = 1) -> str:
        if x is None:
            return ""
        return f"{x:.{nd + 1}f}" if nd == 1 and abs(x) < 10 else f"{x:.{nd}f}"  # 0.62 ms, not 0.6

    notes = []
    for r in doc["variants"]:
        m = r.get("gate_metrics", {})
        cells = [r["id"], r["backend"], r.get("execution_precision") or r["precision"], f(r.get("size_mb"), 2)]
        if "latency_ms_median" in r:
            cells += [f(r["latency_ms_median"]), f(r.get("latency_ms_p95")), f(r.get("throughput_per_s"))]
            if is_3d:
                cells += [f(r.get("full_volume_ms", 0) / 1000.0, 2), f(r.get("speedup_full_volume"), 2)]
            cells += [f(r.get("speedup_latency"), 2), f(r.get("speedup_vs_default"), 2), f(r.get("peak_rss_mb"), 0)]
        else:
            cells += ["-"] * (6 + (2 if is_3d else 0))
        cells += [f(m.get(acc), 4), f(m.get("argmax_agreement"), 4),
                  "pass" if r.get("gate_passed") else "FAIL"]
        lines.append("| " + " | ".join(cells) + " |")
        for k in ("skipped", "note", "error"):
            if r.get(k):
                notes.append(f"- `{r['id']}`: {r[k]}")
        for fail in r.get("gate_failures", []):
            notes.append(f"- `{r['id']}` failed the gate: {fail}")
    t = doc["target"]
    lines += ["", "## Target", ""]
    base_name = ("ONNX Runtime FP32 as run by default (2 threads, spinning)" if t.get("baseline") == DEFAULT_BASELINE
                 else "the agent's ONNX Runtime FP32")
    if t.get("goal_speedup"):
        verdict = "MET" if t.get("met") else "NOT met"
        lines.append(f"Fastest publishable variant vs {base_name} ({t['metric']}): `{t.get('fastest')}` at "
                     f"{t.get('speedup')}x; target for {t.get('isa_family')} {t['goal_speedup']}x: **{verdict}**.")
    else:
        lines.append(f"Fastest publishable variant: `{t.get('fastest')}` ({t.get('speedup')}x {base_name}); "
                     f"no speed target for {t.get('isa_family')}.")
    rows = {r["id"]: r for r in doc["variants"]}
    base, best = rows.get("fp32", {}), rows.get(t.get("fastest") or "", {})
    if is_3d and best.get("full_volume_inference_ms") and base.get("full_volume_inference_ms"):
        outside = best["full_volume_outside_ms"]
        lines += ["", f"Where a full volume's time goes: `fp32` {f(base['full_volume_ms'])} ms = "
                  f"{f(base['full_volume_inference_ms'])} ms in the backend ({base['full_volume_patches']} patches) + "
                  f"{f(base['full_volume_outside_ms'])} ms outside it; `{best['id']}` {f(best['full_volume_ms'])} ms = "
                  f"{f(best['full_volume_inference_ms'])} ms in the backend + {f(outside)} ms outside it. "
                  f"Inference alone is {best.get('speedup_full_volume_inference')}x faster than FP32's; the work "
                  "outside the backend (the agent's patch extraction, Gaussian blending and output copies, the "
                  "same for every variant) limits the full-volume speed-up to at most "
                  f"{base['full_volume_ms'] / max(outside, 1e-6):.1f}x whatever the engine."]
    for vid, prof in doc.get("profiles", {}).items():
        lines += ["", f"### Where the time goes: `{vid}` (one input, batch 1, {prof['total_ms']} ms in layers)", "",
                  "By op type: " + ", ".join(f"{k} {v} ms" for k, v in list(prof["by_type_ms"].items())[:6]) + ".", "",
                  "| layer | type | kernel | ms |", "|---|---|---|---|"]
        lines += [f"| {r['name'][:60]} | {r['type']} | {r['kernel']} | {r['ms']} |" for r in prof["top_layers"]]
    loads = [r["loadavg_before"][0] for r in doc["variants"] if r.get("loadavg_before")]
    if loads:
        lines += ["", f"Load average (1 min) at the start of each measurement: {min(loads):.2f}-{max(loads):.2f} "
                  f"on {os.cpu_count()} cores; above ~{os.cpu_count()} other jobs were competing and latencies are inflated."]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def render_chart(doc: Mapping[str, Any], out: Path) -> None:
    """report.png: file size, latency (full volume for 3D) and accuracy per variant."""
    import matplotlib

    matplotlib.use("Agg")  # headless: build machines have no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = doc["variants"]
    ids = [r["id"] for r in rows]
    acc = _accuracy_key(doc)
    is_3d = doc.get("patch") is not None
    lat_key = "full_volume_ms" if is_3d else "latency_ms_median"
    colors = ["tab:green" if r.get("gate_passed") else "tab:red" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 2.0), sharey=True)
    y = np.arange(len(rows))
    axes[0].barh(y, [r.get("size_mb", 0) for r in rows], color=colors)
    axes[0].set_xlabel("file size (MB)")
    lat = [r.get(lat_key, 0.0) / (1000.0 if is_3d else 1.0) for r in rows]
    axes[1].barh(y, lat, color=colors)
    axes[1].set_xlabel("full volume (s)" if is_3d else "latency batch 1 (ms)")
    for yi, v in zip(y, lat, strict=True):
        if not v:
            axes[1].text(0, yi, " not run here", va="center", fontsize=8, color="gray")
    accs = [r.get("gate_metrics", {}).get(acc, np.nan) for r in rows]
    axes[2].barh(y, accs, color=colors)
    finite = [a for a in accs if a == a]
    if finite:
        lo = min(finite)
        axes[2].set_xlim(max(0.0, lo - 0.05), min(1.0, max(finite) + 0.02))
    fp32_acc = next((a for r, a in zip(rows, accs, strict=True) if r["id"] == "fp32"), None)
    if fp32_acc is not None and fp32_acc == fp32_acc:
        axes[2].axvline(fp32_acc, color="black", linestyle="--", linewidth=1, label="FP32")
        axes[2].legend(loc="lower right", fontsize=8)
    axes[2].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    axes[2].set_xlabel(f"{acc} (gate, green = passed)")
    axes[0].set_yticks(y, ids)
    axes[0].invert_yaxis()
    fig.suptitle(f"{doc['model']} {doc['version']} on {doc['device'][:90]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
        sys.exit(_worker_main(sys.argv[2:]))
    print("usage: python -m deploy.bench --worker JSON (use `edge-deploy bench` instead)", file=sys.stderr)
    sys.exit(2)
