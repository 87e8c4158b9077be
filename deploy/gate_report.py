"""The gate's report: the publish decision per variant, its self-test vector, ``gate.json`` and the summary.

Takes every variant's entry from ``deploy.gate_compare`` (with the run that stands for it) and
the FP32 reference; :func:`decide` returns the entries with the publish decision
(``deploy.gate_families.publishability``) and writes a self-test vector
(``selftest/<id>.npz``, :func:`write_selftest`) for each publishable one;
:func:`gate_document` assembles the :class:`deploy.records.GateDoc` written as ``gate.json``;
:func:`format_report` returns the human-readable summary ``edge-deploy gate`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from agent.core.modelspec import ModelSpec
from agent.core.util import atomic_path, sha256_file
from deploy.calibrate import QuantConfig
from deploy.gate_compare import RunResult
from deploy.gate_families import publishability
from deploy.gate_reference import Reference
from deploy.records import GateDoc, GateValidation, MeasuredVariant, SelfTest, VariantVerdict
from deploy.variants import Host, VariantSpec

__all__ = ["decide", "format_report", "gate_document", "write_selftest"]


def decide(results: Mapping[str, VariantVerdict], primaries: Mapping[str, RunResult],
           known: Mapping[str, VariantSpec], ref: Reference, build: Path) -> dict[str, VariantVerdict]:
    """Every entry with its publish decision (``passed``, ``publishable``, ``verdict_note``); a
    publishable variant also gets its self-test vector. Needs FP32's verdict, so it comes after
    every run."""
    fp32 = results.get("fp32")
    fp32_primary = primaries.get("fp32")
    fp32_passed = fp32 is not None and fp32_primary is not None and fp32_primary.passed and not fp32.failures
    decided: dict[str, VariantVerdict] = {}
    for vid, entry in results.items():
        primary = primaries.get(vid)
        if primary is None:
            decided[vid] = entry.model_copy(update={"publishable": False, "verdict_note": "; ".join(entry.failures)})
            continue
        v = known[vid]
        ok, note = publishability(v, primary.passed and not entry.failures, entry.isa_verdicts, fp32_passed)
        failures = entry.failures
        if not ok and not failures:
            # the primary run passed, a target family failed: say which, with its figures
            failures = tuple(f"{f} ({r.method}): {r.summary}" for f, r in entry.isa_verdicts.items()
                             if f in v.targets and not r.passed) or (note,)
        selftest = None
        if ok:
            k = 1 if ref.spec.input.dims == 3 else len(ref.probe_inputs)  # 3D: one patch keeps it a few MB
            selftest = write_selftest(build / "selftest" / f"{vid}.npz", v, ref.spec.task, ref.probe_inputs[:k],
                                      primary.probe_out[:k], ref.probe_out[:k],
                                      simulated=primary.run.method != "native")
        decided[vid] = entry.model_copy(update={"passed": ok, "publishable": ok, "verdict_note": note,
                                                "failures": failures, "selftest": selftest})
    return decided


def gate_document(spec: ModelSpec, cfg: QuantConfig, me: Host, ref: Reference, dicom: Path | None,
                  results: Mapping[str, VariantVerdict], stage_s: Mapping[str, float], seconds: float) -> GateDoc:
    """gate.json's document: the held-out set, FP32's figures, the device set and every entry."""
    validation = GateValidation(source=ref.heldout.source, seed=cfg.validation_seed if dicom is None else None,
                                n=ref.heldout.n, calibration_seed=cfg.calibration_seed,
                                disjoint_from_calibration=dicom is None)
    return GateDoc(
        model=spec.name,
        version=spec.version,
        task=spec.task,
        isa_family=me.isa_family,
        host=me.describe(),
        validation=validation,
        device_validation=ref.device_validation,
        thresholds=spec.gate.model_dump(),
        reference={k: v for k, v in ref.metrics.items() if k not in ("outputs",)},
        drift_outputs=ref.drift_outputs,
        variants=dict(results),
        passed=tuple(sorted(k for k, r in results.items() if r.passed)),
        failed=tuple(sorted(k for k, r in results.items() if not r.passed)),
        stage_seconds=dict(stage_s),
        seconds=seconds,
    )


def write_selftest(out: Path, v: VariantSpec, task: str, x: np.ndarray, expected: np.ndarray,
                   fp32_out: np.ndarray, simulated: bool | None = None) -> SelfTest:
    """Write ``out`` (npz: input, expected) and return its SelfTest record (tolerances chosen from
    how far this variant already is from FP32 on the same input: another CPU's kernels round
    differently, by less than the quantization itself). ``simulated``: ``expected`` comes from a
    stand-in for the variant's own runtime (default: the variant's gate backend is not its own)."""
    scale = float(np.max(np.abs(expected))) or 1.0
    quant_err = float(np.percentile(np.abs(expected - fp32_out), 99))
    if simulated is None:
        simulated = bool(v.gate_backend and v.gate_backend != v.backend)
    if v.precision == "fp32":
        atol, rtol, close, agree = 1e-3 * scale, 1e-3, 0.999, 0.999
    elif simulated:  # the real engine vs a CPU simulation of its arithmetic
        atol, rtol, close, agree = max(2 * quant_err, 0.01 * scale), 0.05, 0.95, 0.98
    else:
        atol, rtol, close, agree = max(quant_err, 2e-3 * scale), 0.01, 0.99, 0.99
    if task == "classification":
        agree = 1.0  # the inputs are whole slices: every one must keep its class
    # 3D logits are large (K x patch voxels): stored as float16, whose rounding (< 5e-4 relative)
    # is far inside every tolerance above; compare in float32 on the device
    stored = expected.astype(np.float16) if expected[0].ndim >= 4 else expected.astype(np.float32)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, input=x.astype(np.float32), expected=stored)
    return SelfTest(file=f"selftest/{out.name}", sha256=sha256_file(out), size=out.stat().st_size,
                    input_shape=tuple(int(d) for d in x.shape), atol=float(atol), rtol=float(rtol),
                    min_close_fraction=close, min_argmax_agreement=agree)


def format_report(doc: GateDoc) -> str:
    """A short human-readable summary of gate.json: per variant, then its per-family verdicts."""
    lines = [f"{doc.model} {doc.version}: gate on {doc.validation.source}",
             f"  host family {doc.isa_family if doc.isa_family is not None else '?'}: {doc.host}"]
    for vid, r in doc.variants.items():
        status = "PASS" if r.passed else "FAIL"
        measured = r if isinstance(r, MeasuredVariant) else None
        m = measured.metrics if measured else {}
        key = "accuracy" if "accuracy" in m else "mean_dice"
        fig = f"{key} {m[key]:.4f} agree {m.get('argmax_agreement', float('nan')):.4f}" if key in m else ""
        prec = measured.execution_precision.summary if measured else ""
        targets = ",".join(r.targets) or "-"
        lines.append(f"  {status} {vid:<17} {fig:<38} {prec:<24} targets {targets}")
        for fam, verdict in sorted(r.isa_verdicts.items()):
            mark = "pass" if verdict.passed else "FAIL"
            lines.append(f"       {fam:<13} {verdict.method:<11} {mark}: {verdict.summary}")
        for fam, error in sorted(((measured and measured.isa_limited_errors) or {}).items()):
            lines.append(f"       {fam:<13} isa-limited could not run (no verdict: devices gate it): "
                         f"{error.splitlines()[-1][:160]}")
        if r.verdict_note:
            lines.append(f"       => {r.verdict_note}")
        for f in r.failures:
            lines.append(f"       - {f}")
    return "\n".join(lines)
