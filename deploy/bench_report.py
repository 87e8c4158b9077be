"""The benchmark's report: speed-ups, the speed target, ``report.md`` and ``report.png``.

:func:`summarise` takes the measured rows (one per variant, plus the ``fp32-ort-default``
baseline) and the host, and returns the :class:`deploy.records.BenchReport` (``report.json``)
with each row's speed-ups and the target verdict for the host's instruction-set family
(:data:`TARGETS`). :func:`render_markdown` and :func:`render_chart` take that report and return
``report.md``'s text / write ``report.png`` (size, latency and accuracy per variant).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.modelspec import ModelSpec
from agent.core.util import atomic_path, iso_utc
from deploy.records import BenchReport, BenchRow, BenchTarget
from deploy.variants import host

__all__ = ["DEFAULT_BASELINE", "DEFAULT_BASELINE_THREADS", "TARGETS", "render_chart", "render_markdown", "summarise"]

#: speed-up of the fastest publishable variant over ONNX Runtime FP32 as a user runs it by default
#: (:data:`DEFAULT_BASELINE`) that each reference model must reach on a 2-core machine of each
#: instruction-set family (agent.core.isa): MR per slice, CT on a full volume. Without VNNI the integer
#: kernels gain less (VPMADDUBSW pairs, 7-bit weights), hence the lower x86-avx2 figures.
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "x86-avx2": {"mr-brain-cls": ("latency_ms_median", 2.0), "ct-abdomen-seg": ("full_volume_ms", 4.5)},
    "x86-vnni": {"mr-brain-cls": ("latency_ms_median", 3.5), "ct-abdomen-seg": ("full_volume_ms", 6.0)},
}
#: the baseline row: the FP32 file on ONNX Runtime with its default spin-waiting, 2 threads
DEFAULT_BASELINE = "fp32-ort-default"
DEFAULT_BASELINE_THREADS = 2


def summarise(spec: ModelSpec, rows: Sequence[BenchRow], device: str, threads: int, iterations: int,
              batch: int, family: str | None = None) -> BenchReport:
    """The report: speed-ups (vs the agent's ORT FP32, and vs ORT FP32 as run by default) and the
    target verdict for this host's instruction-set family (``family``; default: this host's)."""
    family = family or host().isa_family
    base = next((r for r in rows if r.id == "fp32" and r.latency_ms_median is not None), None)
    default = next((r for r in rows if r.id == DEFAULT_BASELINE and r.latency_ms_median is not None), None)
    key, goal = TARGETS.get(family, {}).get(
        spec.name, ("full_volume_ms" if spec.input.dims == 3 else "latency_ms_median", None))
    rows = [_speedups(r, base, default, key) for r in rows]
    # the baseline of the target: ORT as run by default; the agent's FP32 when it was not measured
    ref = default or base
    ref_figure = ref.figure(key) if ref is not None else None
    measured = [(r, f) for r in rows if r.gate_passed and r.id not in ("fp32", DEFAULT_BASELINE)
                for f in (r.figure(key),) if f is not None]
    if ref is not None and ref_figure is not None and measured:
        best, best_figure = min(measured, key=lambda rf: rf[1])
        target = BenchTarget(metric=key, goal_speedup=goal, isa_family=family, baseline=ref.id, fastest=best.id,
                             speedup=round(ref_figure / best_figure, 2),
                             met=None if goal is None else bool(ref_figure / best_figure >= goal))
    else:
        target = BenchTarget(metric=key, goal_speedup=goal, isa_family=family, baseline=ref.id if ref else None,
                             fastest=None, speedup=None, met=False if goal else None)
    return BenchReport(
        model=spec.name, version=spec.version, task=spec.task, device=device, isa_family=family,
        platform=platform.platform(), threads=threads, iterations=iterations, batch=batch,
        patch=tuple(spec.input.patch_size) if spec.input.patch_size else None,
        created_at=iso_utc(timespec="seconds"), variants=tuple(rows), target=target,
    )


def _speedups(r: BenchRow, base: BenchRow | None, default: BenchRow | None, key: str) -> BenchRow:
    """``r`` with its speed-ups over the agent's FP32 (``base``) and the default-ORT row."""
    if base is None or base.latency_ms_median is None or r.latency_ms_median is None:
        return r
    update: dict[str, Any] = {"speedup_latency": round(base.latency_ms_median / r.latency_ms_median, 2)}
    if r.full_volume_ms is not None and base.full_volume_ms is not None:
        update["speedup_full_volume"] = round(base.full_volume_ms / r.full_volume_ms, 2)
    if r.full_volume_inference_ms and base.full_volume_inference_ms:
        update["speedup_full_volume_inference"] = round(base.full_volume_inference_ms / r.full_volume_inference_ms, 2)
    mine, theirs = r.figure(key), default.figure(key) if default is not None else None
    if mine is not None and theirs is not None:
        update["speedup_vs_default"] = round(theirs / mine, 2)
    return r.model_copy(update=update)


def _accuracy_key(doc: BenchReport) -> str:
    return "accuracy" if doc.task == "classification" else "mean_dice"


def _fmt(x: float | None, nd: int = 1) -> str:
    if x is None:
        return ""
    return f"{x:.{nd + 1}f}" if nd == 1 and abs(x) < 10 else f"{x:.{nd}f}"  # 0.62 ms, not 0.6


def render_markdown(doc: BenchReport) -> str:
    """report.md: one table, the target verdict, and notes (load, skipped variants)."""
    acc = _accuracy_key(doc)
    is_3d = doc.patch is not None
    head = ["variant", "backend", "executes as", "size MB", "p50 ms", "p95 ms", "thr/s"]
    if is_3d:
        head += ["volume s", "x FP32 (vol)"]
    head += ["x FP32 (b1)", "x ORT default", "peak RSS MB (b1)", acc, "agree", "gate"]
    patch = list(doc.patch) if doc.patch is not None else None  # written as the JSON list it is
    lines = [f"# {doc.model} {doc.version}: variants side by side", "",
             f"Measured {doc.created_at} on {doc.device} (instruction-set family "
             f"{doc.isa_family if doc.isa_family is not None else '?'}), {doc.threads} threads, batch 1 latency over "
             f"{doc.iterations} runs (best of {doc.rounds} interleaved round(s)), throughput at batch {doc.batch}" +
             (f", full volume: sliding window over one preprocessed 512-matrix phantom, patch {patch}" if is_3d else "") + ".",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in doc.variants:
        m = r.gate_metrics
        cells = [r.id, r.backend, r.execution_precision or r.precision, _fmt(r.size_mb, 2)]
        if r.latency_ms_median is not None:
            cells += [_fmt(r.latency_ms_median), _fmt(r.latency_ms_p95), _fmt(r.throughput_per_s)]
            if is_3d:
                volume_ms = r.full_volume_ms if r.full_volume_ms is not None else 0
                cells += [_fmt(volume_ms / 1000.0, 2), _fmt(r.speedup_full_volume, 2)]
            cells += [_fmt(r.speedup_latency, 2), _fmt(r.speedup_vs_default, 2), _fmt(r.peak_rss_mb, 0)]
        else:
            cells += ["-"] * (6 + (2 if is_3d else 0))
        cells += [_fmt(m.get(acc), 4), _fmt(m.get("argmax_agreement"), 4), "pass" if r.gate_passed else "FAIL"]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- `{r.id}`: {text}" for text in (r.skipped, r.note, r.error) if text]
        notes += [f"- `{r.id}` failed the gate: {fail}" for fail in r.gate_failures]
    lines += _target_lines(doc)
    base, best = doc.row("fp32"), doc.row(doc.target.fastest or "")
    if is_3d and base is not None and best is not None:
        lines += _volume_split(base, best)
    for vid, prof in doc.profiles.items():
        lines += ["", f"### Where the time goes: `{vid}` (one input, batch 1, {prof.total_ms} ms in layers)", "",
                  "By op type: " + ", ".join(f"{k} {v} ms" for k, v in list(prof.by_type_ms.items())[:6]) + ".", "",
                  "| layer | type | kernel | ms |", "|---|---|---|---|"]
        lines += [f"| {t.name[:60]} | {t.type} | {t.kernel} | {t.ms} |" for t in prof.top_layers]
    loads = [r.loadavg_before[0] for r in doc.variants if r.loadavg_before]
    if loads:
        lines += ["", f"Load average (1 min) at the start of each measurement: {min(loads):.2f}-{max(loads):.2f} "
                  f"on {os.cpu_count()} cores; above ~{os.cpu_count()} other jobs were competing and latencies are inflated."]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _target_lines(doc: BenchReport) -> list[str]:
    """report.md's target section: the fastest publishable variant against its baseline and goal."""
    t = doc.target
    base_name = ("ONNX Runtime FP32 as run by default (2 threads, spinning)" if t.baseline == DEFAULT_BASELINE
                 else "the agent's ONNX Runtime FP32")
    if t.goal_speedup:
        verdict = "MET" if t.met else "NOT met"
        text = (f"Fastest publishable variant vs {base_name} ({t.metric}): `{t.fastest}` at "
                f"{t.speedup}x; target for {t.isa_family} {t.goal_speedup}x: **{verdict}**.")
    else:
        text = (f"Fastest publishable variant: `{t.fastest}` ({t.speedup}x {base_name}); "
                f"no speed target for {t.isa_family}.")
    return ["", "## Target", "", text]


def _volume_split(base: BenchRow, best: BenchRow) -> list[str]:
    """3D: how a full volume's time splits inside and outside the backend, for FP32 and the
    fastest variant, and the full-volume speed-up that the part outside caps (Amdahl)."""
    if not best.full_volume_inference_ms or not base.full_volume_inference_ms:
        return []
    if (base.full_volume_ms is None or base.full_volume_outside_ms is None or best.full_volume_ms is None
            or best.full_volume_outside_ms is None):
        return []  # the worker writes all four with the inference time: a hand-edited report
    outside = best.full_volume_outside_ms
    return ["", f"Where a full volume's time goes: `fp32` {_fmt(base.full_volume_ms)} ms = "
            f"{_fmt(base.full_volume_inference_ms)} ms in the backend ({base.full_volume_patches} patches) + "
            f"{_fmt(base.full_volume_outside_ms)} ms outside it; `{best.id}` {_fmt(best.full_volume_ms)} ms = "
            f"{_fmt(best.full_volume_inference_ms)} ms in the backend + {_fmt(outside)} ms outside it. "
            f"Inference alone is {best.speedup_full_volume_inference}x faster than FP32's; the work "
            "outside the backend (the agent's patch extraction, Gaussian blending and output copies, the "
            "same for every variant) limits the full-volume speed-up to at most "
            f"{base.full_volume_ms / max(outside, 1e-6):.1f}x whatever the engine."]


def render_chart(doc: BenchReport, out: Path) -> None:
    """report.png: file size, latency (full volume for 3D) and accuracy per variant."""
    import matplotlib

    matplotlib.use("Agg")  # headless: build machines have no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = doc.variants
    ids = [r.id for r in rows]
    acc = _accuracy_key(doc)
    is_3d = doc.patch is not None
    lat_key = "full_volume_ms" if is_3d else "latency_ms_median"
    colors = ["tab:green" if r.gate_passed else "tab:red" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 2.0), sharey=True)
    y = np.arange(len(rows))
    axes[0].barh(y, [r.size_mb for r in rows], color=colors)
    axes[0].set_xlabel("file size (MB)")
    lat = [(r.figure(lat_key) or 0.0) / (1000.0 if is_3d else 1.0) for r in rows]
    axes[1].barh(y, lat, color=colors)
    axes[1].set_xlabel("full volume (s)" if is_3d else "latency batch 1 (ms)")
    for yi, v in zip(y, lat, strict=True):
        if not v:
            axes[1].text(0, yi, " not run here", va="center", fontsize=8, color="gray")
    accs = [r.gate_metrics.get(acc, np.nan) for r in rows]
    axes[2].barh(y, accs, color=colors)
    finite = [a for a in accs if a == a]
    if finite:
        lo = min(finite)
        axes[2].set_xlim(max(0.0, lo - 0.05), min(1.0, max(finite) + 0.02))
    fp32_acc = next((a for r, a in zip(rows, accs, strict=True) if r.id == "fp32"), None)
    if fp32_acc is not None and fp32_acc == fp32_acc:
        axes[2].axvline(fp32_acc, color="black", linestyle="--", linewidth=1, label="FP32")
        axes[2].legend(loc="lower right", fontsize=8)
    axes[2].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    axes[2].set_xlabel(f"{acc} (gate, green = passed)")
    axes[0].set_yticks(y, ids)
    axes[0].invert_yaxis()
    fig.suptitle(f"{doc.model} {doc.version} on {doc.device[:90]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
