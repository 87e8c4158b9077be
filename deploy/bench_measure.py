"""How ``edge-deploy bench`` measures one variant: the worker process, and the per-layer profile.

:func:`run_worker` takes a :class:`WorkerConfig` (the variant file, its backend and options, the
sample and full-volume inputs, the run counts) and returns its :class:`Measurement`: batch-1
latency, throughput at batch N, a full 3D volume through the agent's sliding window, peak RSS.
It runs in a fresh process per variant (``python -m deploy.bench --worker JSON``, see
:func:`worker_main`), which prints the measurement as one JSON line, so one variant's memory and
thread pools cannot affect the next and the peak RSS is that variant's own.

:func:`profile_layers` takes a variant file and returns where one input's time goes, layer by
layer (OpenVINO's performance counters or ONNX Runtime's profiler), as a
:class:`deploy.records.LayerProfile`.
"""

from __future__ import annotations

import collections
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.base import Backend
from deploy.records import LayerProfile, LayerTime, Record
from deploy.variants import VariantSpec

__all__ = ["Measurement", "WorkerConfig", "profile_layers", "run_worker", "worker_main"]

logger = logging.getLogger(__name__)


class WorkerConfig(Record):
    """What one worker measures: the variant ``path`` on ``backend`` (``precision``, ``options``,
    ``threads``), the first tensor of ``sample`` (npy) timed ``iterations`` times after
    ``warmup``, throughput at ``batch``; for 3D models the preprocessed ``volume`` (npy) through
    the sliding window (``patch``, ``overlap``) ``volume_runs`` times."""

    path: str
    backend: str
    precision: str
    options: dict[str, Any] = {}
    threads: int
    sample: str
    iterations: int
    warmup: int
    batch: int
    volume: str | None = None
    patch: tuple[int, int, int] | None = None
    overlap: float | None = None
    volume_runs: int | None = None


class Measurement(Record):
    """One worker's figures (milliseconds, MiB); the ``full_volume_*`` ones for 3D models only."""

    latency_ms_median: float
    latency_ms_p95: float
    latency_ms_min: float
    load_s: float
    backend_precision: str
    backend_version: str
    full_volume_ms: float | None = None
    full_volume_runs_ms: tuple[float, ...] | None = None
    full_volume_inference_ms: float | None = None
    full_volume_outside_ms: float | None = None
    full_volume_patches: int | None = None
    peak_rss_mb: float
    throughput_per_s: float
    throughput_batch: int
    peak_rss_mb_batch: float
    rss_before_load_mb: float


def run_worker(cfg: WorkerConfig) -> Measurement:
    """Measure one variant in this process (see the module docstring); return its figures."""
    from agent.inference import catalog

    rss_start = _peak_rss_mb()
    sample = np.load(cfg.sample, mmap_mode="r")
    x1 = np.ascontiguousarray(sample[:1], dtype=np.float32)
    backend = catalog.create(cfg.backend)
    options = dict(cfg.options)
    options["warmup_shape"] = list(x1.shape)
    t0 = time.perf_counter()
    backend.load(Path(cfg.path), precision=cfg.precision, threads=cfg.threads, options=options)
    load_s = time.perf_counter() - t0
    info = backend.describe()
    for _ in range(cfg.warmup):
        backend.run(x1)
    lat = []
    for _ in range(cfg.iterations):
        t = time.perf_counter()
        backend.run(x1)
        lat.append((time.perf_counter() - t) * 1000.0)
    out: dict[str, Any] = {
        "latency_ms_median": float(np.median(lat)),
        "latency_ms_p95": float(np.percentile(np.asarray(lat, dtype=np.float64), 95)),
        "latency_ms_min": float(np.min(lat)),
        "load_s": round(load_s, 2),
        "backend_precision": info.precision,
        "backend_version": info.version,
    }
    if cfg.volume:
        out.update(_full_volume(backend, cfg))
    # peak RSS at batch 1 (what the agent's pipeline allocates) before the batch-N throughput run
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if cfg.batch > 1:
        out["throughput_per_s"] = _throughput(backend, x1, cfg.batch, cfg.iterations)
        out["throughput_batch"] = cfg.batch
    else:
        out["throughput_per_s"] = 1000.0 / out["latency_ms_median"]
        out["throughput_batch"] = 1
    out["peak_rss_mb_batch"] = round(_peak_rss_mb(), 1)
    out["rss_before_load_mb"] = round(rss_start, 1)
    return Measurement.model_validate(out)


def _full_volume(backend: Backend, cfg: WorkerConfig) -> dict[str, Any]:
    """The preprocessed volume through the agent's sliding window (batch 1), ``volume_runs`` times:
    the median run, and the same run split into time inside and outside the backend."""
    from agent.imaging import sliding_window_inference

    assert cfg.volume is not None and cfg.patch is not None and cfg.overlap is not None  # 3D configs have all three
    volume = np.load(cfg.volume)
    runs, in_backend, calls = [], [], []
    for _ in range(cfg.volume_runs if cfg.volume_runs is not None else 3):
        timed = _TimedPredict(backend.run)
        t = time.perf_counter()
        sliding_window_inference(volume, cfg.patch, float(cfg.overlap), timed, batch_size=1)
        runs.append((time.perf_counter() - t) * 1000.0)
        in_backend.append(timed.ms)
        calls.append(timed.calls)
    k = int(np.argsort(runs)[len(runs) // 2])  # the median run, split into its two parts
    return {
        "full_volume_ms": float(np.median(runs)),
        "full_volume_runs_ms": [round(r, 1) for r in runs],
        # the same volume costs every variant the same sliding-window work outside the backend
        # (patch extraction, Gaussian blending, the final division): Amdahl's share of the speed-up
        "full_volume_inference_ms": round(in_backend[k], 1),
        "full_volume_outside_ms": round(runs[k] - in_backend[k], 1),
        "full_volume_patches": calls[k],
    }


def _throughput(backend: Backend, x1: np.ndarray, batch: int, iterations: int) -> float:
    """Inputs per second at ``batch`` (median over at least 3 timed batches, after one untimed)."""
    xb = np.ascontiguousarray(np.repeat(x1, batch, axis=0))
    backend.run(xb)
    tb = []
    for _ in range(max(3, iterations // batch)):
        t = time.perf_counter()
        backend.run(xb)
        tb.append(time.perf_counter() - t)
    return batch / float(np.median(tb))


class _TimedPredict:
    """Wraps a backend's ``run``: counts the calls and the milliseconds spent inside it."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
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


def worker_main(argv: Sequence[str]) -> int:
    """The worker process: ``argv[0]`` is the WorkerConfig as JSON; prints the Measurement."""
    cfg = WorkerConfig.model_validate_json(argv[0])
    # the worker's stdout carries exactly one JSON line; libraries' chatter goes to stderr
    result = run_worker(cfg)
    print(json.dumps(result.model_dump()), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Per-layer profile (in the bench process, after the workers)
# --------------------------------------------------------------------------------------------


def profile_layers(v: VariantSpec, path: Path, sample: Path, threads: int, runs: int = 5,
                   top: int = 8) -> LayerProfile:
    """Per-layer time of ``v`` on the first calibration tensor: OpenVINO's PERF_COUNT, or ONNX
    Runtime's profiler. Returns total ms and the ``top`` layers (name, type, kernel, ms), and
    per op type sums."""
    x = np.ascontiguousarray(np.load(sample, mmap_mode="r")[:1], dtype=np.float32)
    if v.backend == "openvino":
        per_layer = _openvino_layers(v, path, x, threads, runs)
    else:
        per_layer = _ort_layers(path, x, threads, runs)
    by_type: collections.Counter[str] = collections.Counter()
    for (_, op, _k), ms in per_layer.items():
        by_type[op] += ms
    return LayerProfile(
        total_ms=round(sum(per_layer.values()), 1),
        top_layers=tuple(LayerTime(name=n, type=t, kernel=k, ms=round(ms, 2))
                         for (n, t, k), ms in per_layer.most_common(top)),
        by_type_ms={k: round(ms, 1) for k, ms in by_type.most_common()},
    )


def _openvino_layers(v: VariantSpec, path: Path, x: np.ndarray, threads: int,
                     runs: int) -> collections.Counter[tuple[str, str, str]]:
    """ms per (layer, type, kernel) from OpenVINO's performance counters, averaged over ``runs``."""
    import openvino as ov

    per_layer: collections.Counter[tuple[str, str, str]] = collections.Counter()
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
    return per_layer


def _ort_layers(path: Path, x: np.ndarray, threads: int, runs: int) -> collections.Counter[tuple[str, str, str]]:
    """ms per (node, op, provider) from ONNX Runtime's profiler, averaged over ``runs`` + 1 runs."""
    import onnxruntime as ort

    per_layer: collections.Counter[tuple[str, str, str]] = collections.Counter()
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
    return per_layer
