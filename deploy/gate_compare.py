"""The gate's comparison: one variant against the FP32 reference, run by run and family by family.

Takes the FP32 :class:`deploy.gate_reference.Reference`, one ``variants.json`` record and this
host; returns the variant's ``gate.json`` entry before the publish decision
(:func:`gate_variant`): a :class:`deploy.records.MeasuredVariant` with the :class:`RunResult`
whose figures stand for it, or a :class:`deploy.records.VariantVerdict` saying why it could not
be measured. Each run (``deploy.gate_families.plan_runs``) evaluates the held-out set through
the agent's pipeline, checks batch invariance and reads back the execution precision; its
verdict against the model's ``[gate]`` thresholds covers the families the run proves. OpenVINO
variants are also run restricted to each lower x86 family on the device validation set.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.accuracy import Verdict, compare, headline
from agent.core.accuracy import argmax_agreement as _agreement
from agent.core.errors import EdgeAgentError
from agent.core.isa import ONEDNN_MAX_ISA
from agent.core.util import sha256_file
from agent.inference.base import Backend
from deploy.gate_families import (
    GateRun,
    IsaLimitedError,
    isa_limited_families,
    isa_limited_predictions,
    merge_verdict,
    plan_runs,
)
from deploy.gate_reference import Reference
from deploy.gate_runtime import GateError, execution_precision, load_variant
from deploy.records import (
    BatchInvariance,
    ExecutionPrecision,
    GateRunSummary,
    IsaLimitedRun,
    IsaVerdict,
    MeasuredVariant,
    VariantRecord,
    VariantVerdict,
)
from deploy.variants import SIM_BACKEND, Host, VariantSpec

__all__ = ["BATCH_SIZES", "RunCache", "RunResult", "argmax_agreement", "batch_invariance", "checked_digest",
           "gate_variant"]

logger = logging.getLogger(__name__)

#: batch sizes whose predictions must agree
BATCH_SIZES = (1, 2, 4)
#: batch invariance: logits may differ by this much (relative to the logit scale) between batch
#: sizes. Float kernels block differently per batch size, and in a quantized graph such a last-bit
#: difference can move a value across a rounding boundary: one quantization step, propagated. That
#: is noise of the variant's own size, not a batching bug (which mixes samples: differences of the
#: order of the logits themselves); the predictions (argmax) are what must agree.
BATCH_RTOL = 0.1
#: segmentation: share of voxels whose argmax must agree between batch sizes
BATCH_VOXEL_AGREEMENT = 0.9999


def argmax_agreement(ref_outputs: Sequence[np.ndarray], var_outputs: Sequence[np.ndarray], task: str) -> float:
    """Share of samples (classification logits -> argmax) or voxels (label maps) that agree."""
    if task == "classification":
        return _agreement([np.asarray([np.argmax(o)]) for o in ref_outputs],
                          [np.asarray([np.argmax(o)]) for o in var_outputs])
    return _agreement(ref_outputs, var_outputs)


def batch_invariance(backend: Backend, inputs: np.ndarray, task: str) -> tuple[BatchInvariance, np.ndarray]:
    """Run ``inputs`` (N >= 4, C, *spatial) at batch sizes 1, 2 and 4 and compare.

    Returns (the comparison, batch-1 outputs): argmax must agree everywhere (classification) or on
    >= BATCH_VOXEL_AGREEMENT of voxels (segmentation), and the logits stay within BATCH_RTOL of
    their scale (see there).
    """
    n = (len(inputs) // 4) * 4
    if n == 0:
        raise GateError("batch invariance needs at least 4 inputs")
    x = np.ascontiguousarray(inputs[:n], dtype=np.float32)
    outs = {}
    for bs in BATCH_SIZES:
        outs[bs] = np.concatenate([backend.run(x[i:i + bs]) for i in range(0, n, bs)])
    ref = outs[1]
    scale = float(np.max(np.abs(ref))) or 1.0
    max_diff = max(float(np.max(np.abs(outs[bs] - ref))) for bs in BATCH_SIZES[1:])
    agree = min(float(np.mean(np.argmax(outs[bs], axis=1) == np.argmax(ref, axis=1))) for bs in BATCH_SIZES[1:])
    need = 1.0 if task == "classification" else BATCH_VOXEL_AGREEMENT
    passed = agree >= need and max_diff <= BATCH_RTOL * scale
    return (BatchInvariance(passed=bool(passed), max_abs_diff=max_diff, rel_diff=max_diff / scale,
                            argmax_agreement=agree, batch_sizes=BATCH_SIZES, n=n), ref)


@dataclass(frozen=True)
class RunResult:
    """What one :class:`GateRun` measured: the evaluation (``res``, metrics dict), agreement with
    FP32, batch invariance, the probe outputs (self-test), the backend's description and the
    execution precision read back, and the verdict against FP32."""

    run: GateRun
    res: dict[str, Any]
    inv: BatchInvariance
    probe_out: np.ndarray
    backend_precision: str
    exec_prec: ExecutionPrecision
    verdict: Verdict
    failures: tuple[str, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.failures

    def family_verdict(self, describe: str) -> IsaVerdict:
        """gate.json's (and the manifest's) verdict for each family this run proves."""
        method = self.run.method
        if method == "stand-in":  # stand-ins prove no family: plan_runs gives them none
            raise GateError(f"a stand-in run on {self.run.backend} gives no family verdict")
        summary = headline(self.verdict)
        if not self.inv.passed:
            summary += "; " + self.failures[-1]
        return IsaVerdict(passed=self.passed, method=method, summary=summary, host=describe)

    def summary(self) -> GateRunSummary:
        """This run as one of the ``runs`` of the variant's gate.json entry."""
        return GateRunSummary(method=self.run.method, backend=self.run.backend, families=self.run.families,
                              passed=self.passed, summary=headline(self.verdict), failures=self.failures,
                              execution_precision=self.exec_prec.summary, seconds=self.seconds)


#: runs already made in this gate, by (file digest, backend, precision, options): variants that run
#: the same file the same way (ort-fp16 / trt-fp16, the u8s8 simulation of ort-int8-u8s8 and
#: ov-int8) share one run
RunCache = dict[tuple[Any, ...], RunResult]


def gate_variant(ref: Reference, v: VariantSpec, rec: VariantRecord, me: Host, cache: RunCache,
                 build: Path) -> tuple[VariantVerdict, RunResult | None]:
    """``v``'s gate.json entry before the publish decision (``passed`` stays False until then),
    and the run whose figures stand for it (None when nothing could be measured)."""
    family = me.isa_family
    if not rec.built:
        reason = rec.reason if rec.reason is not None else "?"
        return VariantVerdict(passed=False, failures=(f"not built: {reason}",), isa_family=family,
                              targets=v.targets), None
    path = build / rec.file
    digest = checked_digest(build, rec)
    runs = plan_runs(v, me)
    if not runs:
        return VariantVerdict(passed=False, file=rec.file, sha256=digest, isa_family=family, targets=v.targets,
                              failures=(f"cannot be gated here: {'; '.join(me.unmet(v.requires))}",)), None
    done: list[RunResult] = []
    errors: list[str] = []
    for run in runs:
        key = (digest, run.backend, v.precision, tuple(sorted(run.options.items())))
        try:
            if key not in cache:
                cache[key] = _execute(ref, v, run, path)
            done.append(replace(cache[key], run=run))
        except EdgeAgentError as exc:
            errors.append(f"could not run on {run.backend}: {exc}")
            logger.error("variant %s (%s): %s", v.id, run.method, exc)
    if not done:
        return VariantVerdict(passed=False, file=rec.file, sha256=digest, failures=tuple(errors),
                              isa_family=family, targets=v.targets), None
    verdicts: dict[str, IsaVerdict] = {}
    for r in done:
        for fam in r.run.families:
            merge_verdict(verdicts, fam, r.family_verdict(me.describe()))
    limited, limited_errors = _isa_limited_runs(ref, v, path, me, verdicts, build)
    primary = _primary(v, done, family)
    native = next((r for r in done if r.run.method == "native"), None)
    entry = MeasuredVariant(
        passed=False,
        file=rec.file,
        sha256=digest,
        validated_with=_validated_note(v, primary.run),
        method=primary.run.method,
        backend_reported_precision=primary.backend_precision,
        # what this host's runtime really executes: the native run's kernels when there is one
        execution_precision=(native or primary).exec_prec,
        n_samples=int(primary.res["n"]),
        metrics=primary.verdict.metrics,
        reference=primary.verdict.reference,
        drops=primary.verdict.drops,
        thresholds=primary.verdict.thresholds,
        failures=(*primary.failures, *errors),
        batch_invariance=primary.inv,
        seconds=round(sum(r.seconds for r in done), 1),
        timings_ms=primary.res.get("timings_ms", {}),
        runs=tuple(r.summary() for r in done),
        isa_verdicts=verdicts,
        isa_family=family,
        targets=v.targets,
        isa_limited=limited or None,
        isa_limited_errors=limited_errors or None,
    )
    return entry, primary


def checked_digest(build: Path, rec: VariantRecord) -> str:
    """The SHA-256 of ``rec``'s file, which must still be the one ``quantize`` recorded (no stale
    or edited variant); GateError otherwise."""
    digest = sha256_file(build / rec.file)
    if digest != rec.digest:
        raise GateError(f"{rec.file} changed since `quantize` (sha256 mismatch); re-run quantize")
    return digest


def _execute(ref: Reference, v: VariantSpec, run: GateRun, path: Path) -> RunResult:
    """One run of ``v``: the held-out set through the agent's pipeline, batch invariance and the
    execution precision read back; judged against FP32."""
    t0 = time.perf_counter()
    spec = ref.spec
    if v.id == "fp32" and run.method == "native":
        res, outputs = dict(ref.metrics), ref.outputs
    else:
        res, outputs = ref.heldout.evaluate(path, run.backend, v.precision)
    agree = argmax_agreement(ref.outputs, outputs, spec.task)
    del outputs  # label maps of whole volumes: do not hold them past the comparison
    backend = load_variant(spec, v, path, ref.threads, ref.warm, run.backend, run.options)
    inv, probe_out = batch_invariance(backend, ref.probe_inputs, spec.task)
    described = backend.describe()
    del backend
    # ONNX Runtime keeps its arena (im2col buffers: GBs for 3D convs) until the session is
    # collected; collect now, before the next run allocates its own
    gc.collect()
    exec_prec = execution_precision(v, run.backend, path, ref.threads)
    gc.collect()
    verdict = compare(spec.task, ref.metrics, res, agree, spec.gate)
    failures = list(verdict.failures)
    if not inv.passed:
        failures.append(f"batch sizes {BATCH_SIZES} disagree: argmax agreement {inv.argmax_agreement:.5f}, "
                        f"max logit difference {inv.max_abs_diff:.3g} ({inv.rel_diff:.2e} of scale)")
    return RunResult(run, res, inv, probe_out, described.precision, exec_prec, verdict, tuple(failures),
                     round(time.perf_counter() - t0, 1))


def _primary(v: VariantSpec, results: Sequence[RunResult], family: str) -> RunResult:
    """The run whose figures stand for ``v`` in gate.json and the manifest: native when it ran
    for a target family (or ``v`` has none), else the simulation, else whatever ran."""
    native = next((r for r in results if r.run.method == "native"), None)
    if native is not None and (not v.targets or family in v.targets):
        return native
    sim = next((r for r in results if r.run.method == "simulated"), None)
    return sim or results[0]


def _validated_note(v: VariantSpec, run: GateRun) -> str:
    """How the gate ran ``v`` for its primary figures: its own backend, or a stand-in for it."""
    if run.method == "native":
        return run.backend
    if run.backend == SIM_BACKEND:
        for_what = f"the {v.backend} graph" if v.backend == "tensorrt" else f"{', '.join(v.targets)} CPUs"
        return (f"{SIM_BACKEND} (ONNX Runtime CPU simulating the Q/DQ arithmetic exactly in float, "
                f"as {for_what} compute it)")
    return f"{run.backend} (CPU run of the graph the {v.backend} variant is built from; not its target hardware)"


def _isa_limited_runs(ref: Reference, v: VariantSpec, path: Path, me: Host, verdicts: dict[str, IsaVerdict],
                      build: Path) -> tuple[dict[str, IsaLimitedRun], dict[str, str]]:
    """``v`` with OpenVINO restricted to each lower family this host can emulate: each run's
    record (its verdict merged into ``verdicts``), and why a run could not be made, per family."""
    runs: dict[str, IsaLimitedRun] = {}
    errors: dict[str, str] = {}
    for fam in isa_limited_families(v, me):
        t_isa = time.perf_counter()
        try:
            verdict, worker = _isa_limited(ref, v, path, fam, build)
        except (GateError, IsaLimitedError) as exc:
            errors[fam] = str(exc)
            logger.error("variant %s on %s (isa-limited): %s", v.id, fam, exc)
            continue
        merge_verdict(verdicts, fam, IsaVerdict(passed=verdict.passed, method="isa-limited",
                                                summary=headline(verdict), host=me.describe()))
        # the worker's own report (kernels, the ISA it ran under) completes the record
        runs[fam] = IsaLimitedRun.model_validate({
            "onednn_max_cpu_isa": ONEDNN_MAX_ISA[fam], "n_samples": len(ref.samples),
            "metrics": verdict.metrics, "failures": list(verdict.failures),
            "seconds": round(time.perf_counter() - t_isa, 1), **worker})
    return runs, errors


def _isa_limited(ref: Reference, v: VariantSpec, path: Path, family: str, build: Path) -> tuple[Verdict, dict[str, Any]]:
    """One ISA-limited run of ``v`` for ``family``, judged against FP32's predictions on the set."""
    from agent.variants.device_gate import judge_predictions

    with tempfile.TemporaryDirectory(prefix="isa-", dir=build) as work:
        preds, worker = isa_limited_predictions(ref.heldout.model_dir, v, path, ref.set_path, family, ref.threads,
                                                Path(work))
    if len(preds) != len(ref.samples):
        raise GateError(f"{v.id} with ONEDNN_MAX_CPU_ISA={ONEDNN_MAX_ISA[family]}: {len(preds)} predictions "
                        f"for {len(ref.samples)} samples")
    return judge_predictions(ref.samples, ref.device_preds, preds, ref.spec), worker
