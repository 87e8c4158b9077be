"""Which runs of ``edge-deploy gate`` prove a variant for which instruction-set family (agent.core.isa).

A quantized variant's numbers depend on the CPU's integer dot-product path, so the gate's verdict
holds per family. For each variant the gate runs (:func:`plan_runs`):

* **native**: on this host with the variant's own backend, when the host meets its ``requires``:
  a verdict for the host's family;
* **simulated**: integer CPU variants whose ``targets`` do not include the host's family, on the
  exact Q/DQ arithmetic (``deploy.gate_runtime.QdqSimulationBackend``): a verdict for each target family,
  which publishes the variant but proves nothing to a device (it gates the variant itself);
* **isa-limited**: OpenVINO variants again with oneDNN restricted to each lower x86 family
  (``ONEDNN_MAX_CPU_ISA``, read once at start: hence a fresh process, :func:`isa_limited_predictions`),
  over the device validation set.

:func:`publishability` turns the verdicts into the publish decision.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.core.accuracy import load_validation_set
from agent.core.errors import EdgeAgentError
from agent.core.isa import ONEDNN_MAX_ISA
from agent.core.manifest import IsaVerdict
from agent.core.modelspec import load_spec
from deploy.variants import SIM_BACKEND, Host, VariantSpec, child_env

__all__ = [
    "GateRun",
    "IsaLimitedError",
    "RunMethod",
    "integer_cpu",
    "isa_limited_families",
    "isa_limited_predictions",
    "isa_limited_worker",
    "merge_verdict",
    "plan_runs",
    "publishability",
]


class IsaLimitedError(EdgeAgentError):
    """An ISA-limited run could not produce predictions (the worker failed or timed out)."""


# --------------------------------------------------------------------------------------------
# Which runs prove a variant for which instruction-set family
# --------------------------------------------------------------------------------------------

#: x86 families, highest first: a host can restrict oneDNN to any family below its own
X86_ORDER = ("x86-vnni", "x86-avx2", "x86-baseline")
#: verdict methods, strongest first: a weaker one never replaces a stronger one for a family
METHOD_RANK = {"native": 0, "isa-limited": 1, "simulated": 2}
#: one ISA-limited worker (FP32-sized validation set through OpenVINO on restricted kernels)
ISA_WORKER_TIMEOUT_S = 1800

#: how a :class:`GateRun` runs a variant (see there)
RunMethod = Literal["native", "simulated", "stand-in"]


@dataclass(frozen=True)
class GateRun:
    """One way the gate runs a variant on this host.

    ``method``: ``native`` (its own backend, on a host meeting its ``requires``), ``simulated``
    (the Q/DQ arithmetic computed exactly, ``deploy.gate_runtime.QdqSimulationBackend``) or ``stand-in`` (its own
    or a CPU backend on a host it was not built for: TensorRT graphs, FP16 on x86; today's gate).
    ``families``: the instruction-set families whose verdict this run gives (none for stand-ins).
    """

    method: RunMethod
    backend: str
    options: Mapping[str, Any]
    families: tuple[str, ...]


def integer_cpu(v: VariantSpec) -> bool:
    """An INT8 Q/DQ graph for a CPU backend: the variants whose numbers depend on the CPU's
    integer dot-product instructions."""
    return v.precision == "int8" and v.backend in ("onnxruntime", "openvino") and v.format == "onnx-qdq"


def plan_runs(v: VariantSpec, me: Host) -> list[GateRun]:
    """The runs that gate ``v`` on ``me`` (in-process, on the full held-out set)."""
    family = me.isa_family
    if v.gate_backend:  # TensorRT: its graph on the CPU, as the gate always did
        method: RunMethod = "simulated" if v.gate_backend == SIM_BACKEND else "stand-in"
        return [GateRun(method, v.gate_backend, dict(v.gate_options), ())]
    runs: list[GateRun] = []
    if not me.unmet(v.requires):
        runs.append(GateRun("native", v.backend, dict(v.options), (family,)))
    elif not v.targets:
        # built for other hardware but runnable here (FP16 on x86): a stand-in run as before; it
        # proves nothing for any family, devices gate it themselves
        runs.append(GateRun("stand-in", v.backend, dict(v.options), ()))
    if integer_cpu(v) and family not in v.targets:
        runs.append(GateRun("simulated", SIM_BACKEND, {}, tuple(v.targets)))
    return runs


def isa_limited_families(v: VariantSpec, me: Host) -> list[str]:
    """Families below this host's that OpenVINO can be restricted to (``ONEDNN_MAX_CPU_ISA``) for
    ``v``: only OpenVINO variants this host runs natively."""
    if v.backend != "openvino" or v.gate_backend or me.unmet(v.requires) or me.isa_family not in X86_ORDER:
        return []
    mine = X86_ORDER.index(me.isa_family)
    return [f for f in X86_ORDER[mine + 1:] if f in ONEDNN_MAX_ISA]


def publishability(v: VariantSpec, primary_passed: bool, verdicts: Mapping[str, IsaVerdict],
                   fp32_passed: bool) -> tuple[bool, str]:
    """Whether ``v`` may be published, and why, in words.

    A variant with targets: no target family may have a failed verdict and at least one must have
    a pass (any method); a failed verdict for a family it does not target is only recorded, so
    devices of that family skip it. A variant without targets: its own run passed (as always).
    """
    if v.id != "fp32" and not fp32_passed:
        return False, "FP32, the reference and fallback, failed the gate"
    if not v.targets:
        return primary_passed, "passed the gate" if primary_passed else "failed the gate"
    failed = [f"{t} ({verdicts[t].method})" for t in v.targets if t in verdicts and not verdicts[t].passed]
    proven = [f"{t} ({verdicts[t].method})" for t in v.targets if t in verdicts and verdicts[t].passed]
    others = [f"{f} ({r.method})" for f, r in sorted(verdicts.items()) if f not in v.targets and not r.passed]
    tail = f"; fails on {', '.join(others)}: devices of that family skip it" if others else ""
    if failed:
        return False, f"failed for target family {', '.join(failed)}{tail}"
    if not proven:
        return False, f"no verdict for any target family ({', '.join(v.targets)}){tail}"
    open_ = [t for t in v.targets if t not in verdicts]
    rest = f"; {', '.join(open_)} devices gate it themselves" if open_ else ""
    return True, f"passed for {', '.join(proven)}{rest}{tail}"


def merge_verdict(verdicts: dict[str, IsaVerdict], family: str, verdict: IsaVerdict) -> None:
    """Record ``verdict`` for ``family`` unless a stronger method already gave one."""
    have = verdicts.get(family)
    if have is None or METHOD_RANK[verdict.method] < METHOD_RANK[have.method]:
        verdicts[family] = verdict


# --------------------------------------------------------------------------------------------
# ISA-limited runs: OpenVINO restricted to a lower family, in a fresh process
# --------------------------------------------------------------------------------------------


#: the child's entry: ``python -c`` rather than ``-m``, which would import this module a second
#: time as __main__
_ISA_WORKER = "import sys; from deploy.gate_families import isa_limited_worker; sys.exit(isa_limited_worker(sys.argv[1]))"


def isa_limited_predictions(model_dir: Path, v: VariantSpec, path: Path, set_path: Path, family: str,
                            threads: int, work: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``v``'s predictions on the validation set with OpenVINO's oneDNN restricted to ``family``
    (``ONEDNN_MAX_CPU_ISA``, read once when oneDNN starts: hence a fresh process). Returns the
    predictions and what the worker reported (kernels of its conv layers). IsaLimitedError on failure."""
    out = work / f"isa-{v.id}-{family}.npz"
    cfg = {"model_dir": str(model_dir), "path": str(path), "backend": v.backend, "precision": v.precision,
           "options": dict(v.options), "threads": threads, "set": str(set_path), "out": str(out)}
    isa = ONEDNN_MAX_ISA[family]
    try:
        proc = subprocess.run([sys.executable, "-c", _ISA_WORKER, json.dumps(cfg)], capture_output=True, text=True,
                              timeout=ISA_WORKER_TIMEOUT_S, check=False,
                              env=child_env({"ONEDNN_MAX_CPU_ISA": isa}))
    except subprocess.TimeoutExpired as exc:
        raise IsaLimitedError(f"{v.id} with ONEDNN_MAX_CPU_ISA={isa}: no result after {ISA_WORKER_TIMEOUT_S} s") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines or not out.exists():
        raise IsaLimitedError(f"{v.id} with ONEDNN_MAX_CPU_ISA={isa}: worker exited {proc.returncode}: "
                        f"{proc.stderr.strip()[-800:] or 'no output'}")
    with np.load(out) as npz:
        preds = [np.asarray(npz[f"pred_{i}"]) for i in range(len(npz.files))]
    out.unlink()
    return preds, json.loads(lines[-1])


def isa_limited_worker(cfg_json: str) -> int:
    """The child of :func:`isa_limited_predictions`: load the variant through the agent's registry,
    predict the validation set (``agent.inference.validation.predict``), write the npz, print one
    JSON line (the kernels OpenVINO chose for its conv layers: evidence the restriction held)."""
    from agent.inference import catalog
    from agent.inference.validation import predict

    cfg = json.loads(cfg_json)
    spec = load_spec(Path(cfg["model_dir"]))
    samples = load_validation_set(Path(cfg["set"]))
    backend = catalog.create(cfg["backend"])
    # the worker is a fresh process: importing the gate's runtime here keeps it out of every
    # process that only plans runs
    from deploy.gate_runtime import warmup_shape

    options = {**cfg["options"], "warmup_shape": warmup_shape(spec)}
    backend.load(Path(cfg["path"]), precision=cfg["precision"], threads=int(cfg["threads"]), options=options)
    preds = predict(backend.run, samples, spec)
    with open(cfg["out"], "wb") as f:
        # numpy's stub types **kwds as its own bool keyword (allow_pickle): arrays are what it saves
        np.savez(f, **{f"pred_{i}": p for i, p in enumerate(preds)})  # type: ignore[arg-type]
    kernels = _openvino_kernels(Path(cfg["path"]), str(cfg["options"].get("inference_precision", "f32")))
    print(json.dumps({"kernels": kernels, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}), flush=True)
    return 0


def _openvino_kernels(path: Path, hint: str) -> dict[str, int]:
    """How many conv/matmul layers OpenVINO compiled to each kernel (``jit_avx2_I8``, ...)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "Deconvolution", "FullyConnected", "MatMul"):
            counts[info["primitiveType"].astype(str)] += 1
    return dict(counts)
