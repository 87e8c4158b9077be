"""``edge-deploy gate``: prove every variant against FP32 on held-out data; fail the ones that drift.

Takes a quantized build folder (``variants.json``) and:

1. generates a held-out validation set with ``deploy.evaluate.generate_heldout`` (seed
   ``validation_seed``; disjoint from the calibration set, whose series seeds are checked, and
   from the training seeds) as real DICOM files, unless ``--dicom`` names a folder of series;
2. runs FP32 and then every variant over it with ``deploy.evaluate.evaluate_model``, i.e. the
   agent's own pipeline (``load_series`` -> ``prepare`` -> sliding window / one batch ->
   postprocess) on the agent's own backends (``agent.inference.registry``). TensorRT graphs, which
   need a GPU, are run by ONNX Runtime on the CPU: their Q/DQ nodes then compute exactly the
   quantize/dequantize arithmetic the engine applies (a simulation of the numerics, not of the
   engine's kernels; the on-device self-test covers those);
3. compares each variant with FP32 on the same data against the model's ``[gate]`` thresholds
   (``agent.modelspec.GateSpec``): accuracy drop, every class's recall drop, mean Dice drop,
   every label's Dice drop, argmax agreement with FP32 (samples or voxels);
4. checks batch-size invariance: the same inputs at batch 1, 2 and 4 must give the same argmax
   (and logits within a small tolerance);
5. reads back the precision the runtime really executes (ONNX Runtime's optimized graph:
   integer vs float kernels per conv; OpenVINO's compiled model: runtime precision per layer);
6. writes a self-test vector per passing variant (``selftest/<id>.npz``), the device validation
   set (``validation/set.npz``) and ``gate.json``.

Each run gives a verdict for an instruction-set family (agent.isa): natively for this host's,
by exact simulation for target families this host is not, with OpenVINO restricted to lower x86
families; which runs, and what is published, is ``deploy.gate_families``. A variant fails a run on
any threshold; ``gate.json`` says which and by how much, per family.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.accuracy import (
    ValidationSamples,
    Verdict,
    compare,
    compare_classification,
    compare_segmentation,
    headline,
    load_validation_set,
    write_validation_set,
)
from agent.errors import EdgeAgentError
from agent.isa import ONEDNN_MAX_ISA
from agent.manifest import sha256_file
from agent.modelspec import ModelSpec, load_spec
from deploy.calibrate import QuantConfig, config_from_args, sliding_window_patches
from deploy.gate_families import (
    GateRun,
    IsaLimitedError,
    isa_limited_families,
    isa_limited_predictions,
    merge_verdict,
    plan_runs,
    publishability,
)
from deploy.variants import (
    SIM_BACKEND,
    VariantSpec,
    atomic_path,
    catalogue_by_id,
    default_build_dir,
    host,
    read_json,
    write_json,
)

__all__ = [
    "GateError",
    "QdqSimulationBackend",
    "batch_invariance",
    "compare_classification",
    "compare_segmentation",
    "format_report",
    "gate",
]

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


class GateError(EdgeAgentError):
    """The gate could not run (missing build artefacts, overlapping data sets)."""


# --------------------------------------------------------------------------------------------
# Q/DQ simulation backend (TensorRT graphs on the CPU)
# --------------------------------------------------------------------------------------------

#: ONNX Runtime graph rewrites that are wrong or unfaithful for explicit-quantization graphs:
#: ``ReluQuantRewrite`` deletes a Relu feeding a QuantizeLinear, which is only right for integer
#: types whose zero point is the bottom of the range; for FLOAT8E4M3FN (zero point 0, signed
#: range) it lets negative values through and FP8 outputs become unrelated to FP32 (measured here:
#: 96 % relative error, 9 % with the rule off). ``WeightBiasQuantization`` turns float biases into
#: int32 ones, which TensorRT does not do.
SIM_DISABLED_OPTIMIZERS = ("ReluQuantRewrite", "WeightBiasQuantization")
#: session config of the simulation: without ``session.disable_quant_qdq`` ONNX Runtime fuses
#: DQ -> Conv -> Q into QLinearConv, i.e. runs this CPU's integer kernels, and on an x86 CPU
#: without VNNI those saturate (VPMADDUBSW): the "simulation" would inherit the very error it is
#: meant to rule out. Unfused, every Q/DQ node computes its rounding and clipping in float and the
#: convolutions accumulate exactly: what VNNI, ARM SDOT (32-bit sums) and TensorRT compute.
SIM_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}

from agent.inference import registry as _registry  # noqa: E402  (registration needs the registry)
from agent.inference.base import BackendInfo as _BackendInfo  # noqa: E402

_registry.register_module(SIM_BACKEND, __name__)


@_registry.register(SIM_BACKEND)
class QdqSimulationBackend:
    """ONNX Runtime CPU running a Q/DQ graph as an exact numerical simulation.

    Same contract as the agent's backends (load / run / describe). Q/DQ nodes compute exactly the
    quantize-dequantize arithmetic (int8 rounding and saturation, FP8 E4M3 rounding) and the
    convolutions run in FP32 on the dequantized values, never fused into this CPU's integer
    kernels (:data:`SIM_SESSION_CONFIG`). That is what a TensorRT engine, an x86 VNNI CPU or an ARM
    SDOT CPU computes (exact 32-bit accumulation), so it checks the accuracy of a graph for
    hardware the build host is not, not that hardware's kernels or speed.
    """

    name = SIM_BACKEND

    def __init__(self) -> None:
        self._session: Any = None
        self._input = ""
        self._info: _BackendInfo | None = None

    def load(self, model_path: Path, *, precision: str, threads: int, options: Mapping[str, Any]) -> None:
        """Open ``model_path`` with the unfaithful rewrites disabled and warm up once."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(0, int(threads))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in SIM_SESSION_CONFIG.items():
            so.add_session_config_entry(key, value)
        try:
            self._session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=list(SIM_DISABLED_OPTIMIZERS))
        except Exception as exc:  # ORT's pybind11 exception types
            raise GateError(f"{SIM_BACKEND}: cannot load {model_path.name}: {exc}") from exc
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._info = _BackendInfo(name=SIM_BACKEND, version=ort.__version__, device="cpu",
                                  precision=precision, providers=("CPUExecutionProvider",))
        shape = options.get("warmup_shape") or [1 if not isinstance(d, int) else d for d in inp.shape]
        self.run(np.zeros(tuple(shape), dtype=np.float32))

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """One batch -> the first output as float32."""
        if self._session is None:
            raise GateError(f"{SIM_BACKEND}: run() before load()")
        out = self._session.run(None, {self._input: np.ascontiguousarray(inputs, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> _BackendInfo:
        """What is loaded (precision as requested: the graph decides the arithmetic)."""
        if self._info is None:
            raise GateError(f"{SIM_BACKEND}: describe() before load()")
        return self._info


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------


def argmax_agreement(ref_outputs: Sequence[np.ndarray], var_outputs: Sequence[np.ndarray], task: str) -> float:
    """Share of samples (classification logits -> argmax) or voxels (label maps) that agree."""
    from agent.accuracy import argmax_agreement as agree

    if task == "classification":
        return agree([np.asarray([np.argmax(o)]) for o in ref_outputs],
                     [np.asarray([np.argmax(o)]) for o in var_outputs])
    return agree(ref_outputs, var_outputs)


# --------------------------------------------------------------------------------------------
# Loading variants through the agent's backends
# --------------------------------------------------------------------------------------------


def load_variant(spec: ModelSpec, v: VariantSpec, path: Path, threads: int, warm: tuple[int, ...] | None = None,
                 backend_name: str | None = None, backend_options: Mapping[str, Any] | None = None) -> Any:
    """Load ``path`` through ``agent.inference.registry`` on ``backend_name`` with
    ``backend_options`` (default: the backend that validates ``v`` here, its own or ONNX Runtime
    for TensorRT graphs, with its options); returns the loaded Backend."""
    from agent.inference import registry

    backend = registry.create(backend_name or v.validated_with)
    if backend_options is not None:
        options: dict[str, Any] = dict(backend_options)
    else:
        options = dict(v.gate_options) if v.gate_backend else dict(v.options)
    if warm is not None:
        options["warmup_shape"] = warm
    backend.load(path, precision=v.precision, threads=threads, options=options)
    return backend


def warmup_shape(spec: ModelSpec) -> tuple[int, ...] | None:
    """The model input shape at batch 1 (the sliding-window patch for 3D models)."""
    if spec.input.dims == 3 and spec.input.patch_size is not None:
        return (1, spec.input.channels, *spec.input.patch_size)
    if spec.input.target_size is not None:
        return (1, spec.input.channels, *spec.input.target_size)
    return None


def batch_invariance(backend: Any, inputs: np.ndarray, task: str) -> tuple[dict[str, Any], np.ndarray]:
    """Run ``inputs`` (N >= 4, C, *spatial) at batch sizes 1, 2 and 4 and compare.

    Returns (``{"passed", "max_abs_diff", "rel_diff", "argmax_agreement"}``, batch-1 outputs):
    argmax must agree everywhere (classification) or on >= BATCH_VOXEL_AGREEMENT of voxels
    (segmentation), and the logits stay within BATCH_RTOL of their scale (see there).
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
    return ({"passed": bool(passed), "max_abs_diff": max_diff, "rel_diff": max_diff / scale,
             "argmax_agreement": agree, "batch_sizes": list(BATCH_SIZES), "n": n}, ref)


# --------------------------------------------------------------------------------------------
# Execution precision, read back from the runtime
# --------------------------------------------------------------------------------------------

_ORT_INT_KERNELS = {"QLinearConv", "NhwcQLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
                    "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_ORT_FLOAT_KERNELS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedGemm", "FusedMatMul",
                      "NhwcFusedConv"}


def ort_execution_precision(path: Path, threads: int = 1, disabled_optimizers: Sequence[str] = (),
                            config: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What ONNX Runtime (CPU EP) really runs: count conv/gemm kernels in its optimized graph.

    Integer kernels (QLinearConv, QGemm, ...) count as int8; float ones by the element type of
    their weight (fp16 or fp32). A Q/DQ graph whose convolutions stayed float (an s8 pattern ORT
    x86 does not fuse, or a TensorRT layout) shows up here as simulated Q/DQ on float kernels.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edge-deploy-ortopt-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(opt)
        so.intra_op_num_threads = threads
        so.log_severity_level = 3  # the "hardware specific optimizations" notice is expected here
        for key, value in (config or {}).items():
            so.add_session_config_entry(key, value)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled_optimizers))
        model = onnx.load(str(opt))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    counts: collections.Counter[str] = collections.Counter()
    qdq_sim = sum(1 for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    for node in model.graph.node:
        if node.op_type in _ORT_INT_KERNELS:
            counts["int8"] += 1
        elif node.op_type in _ORT_FLOAT_KERNELS:
            dtype = inits.get(node.input[1]) if len(node.input) > 1 else None
            counts["fp16" if dtype == onnx.TensorProto.FLOAT16 else "fp32"] += 1
    total = sum(counts.values())
    source_fp16 = any(t.data_type == onnx.TensorProto.FLOAT16
                      for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    if source_fp16 and not counts["fp16"] and not counts["int8"]:
        # an FP16 graph on a CPU without fp16 kernels (x86): ORT inserts casts and computes in fp32
        return {"runtime": f"onnxruntime {ort.__version__} CPU",
                "summary": "fp32 (fp16 graph upcast: no fp16 kernels on this CPU)",
                "kernels": dict(counts), "qdq_nodes_left": qdq_sim}
    if counts["int8"] and counts["int8"] == total:
        summary = "int8"
    elif counts["int8"]:
        summary = f"int8+fp32 ({counts['int8']}/{total} conv/gemm int8)"
    elif counts["fp16"]:
        summary = "fp16" if counts["fp16"] == total else f"fp16+fp32 ({counts['fp16']}/{total} fp16)"
    elif qdq_sim:
        summary = "fp32 (Q/DQ simulated on float kernels)"
    else:
        summary = "fp32"
    return {"runtime": f"onnxruntime {ort.__version__} CPU", "summary": summary, "kernels": dict(counts),
            "qdq_nodes_left": qdq_sim}


def openvino_execution_precision(path: Path, hint: str, threads: int = 1) -> dict[str, Any]:
    """What OpenVINO (CPU) really runs: runtime precision of each conv/matmul layer of the
    compiled model, with ``INFERENCE_PRECISION_HINT=hint`` set explicitly, plus the hint read back."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": max(1, threads), "PERFORMANCE_HINT": "LATENCY"})
    read_back = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in ("Convolution", "Deconvolution", "FullyConnected", "MatMul", "GroupConvolution"):
            counts[info["runtimePrecision"].astype(str)] += 1
    names = {"u8": "int8", "i8": "int8", "f32": "fp32", "bf16": "bf16", "f16": "fp16"}
    by = collections.Counter()
    for k, c in counts.items():
        by[names.get(k, k)] += c
    total = sum(by.values())
    top = by.most_common()
    summary = top[0][0] if len(top) == 1 else "+".join(k for k, _ in top) + " (" + ", ".join(
        f"{c}/{total} {k}" for k, c in top) + ")"
    return {"runtime": f"openvino {ov.__version__.split('-')[0]} CPU", "summary": summary,
            "hint_read_back": read_back, "layers": dict(by)}


def execution_precision(v: VariantSpec, backend: str, path: Path, threads: int) -> dict[str, Any]:
    """Read back the precision ``v`` executes in on this machine when run on ``backend`` (see the
    two functions above)."""
    if backend == "openvino":
        hint = str(v.options.get("inference_precision", "f32"))
        return openvino_execution_precision(path, hint, threads)
    if backend == SIM_BACKEND:
        return ort_execution_precision(path, threads, SIM_DISABLED_OPTIMIZERS, SIM_SESSION_CONFIG)
    return ort_execution_precision(path, threads)


# --------------------------------------------------------------------------------------------
# Self-test vectors
# --------------------------------------------------------------------------------------------


def selftest_inputs(spec: ModelSpec, folders: Sequence[Path], n2d: int = 4) -> np.ndarray:
    """Inputs for self-tests and batch checks, prepared by the agent's own code: 2D: the first
    ``max(n2d, 4)`` validation slices; 3D: 4 sliding-window patches of the first volume."""
    from agent.imaging import load_series, prepare

    if spec.input.dims == 3:
        assert spec.input.patch_size is not None
        volume = load_series(sorted(folders[0].glob("*.dcm")))
        image = prepare(volume, spec.input).array
        patches = sliding_window_patches(image, spec.input.patch_size, spec.input.overlap, 4,
                                         np.random.default_rng(0))
        while len(patches) < 4:  # a volume smaller than 4 patches: repeat (still checks batching)
            patches.append(patches[len(patches) % max(1, len(patches))])
        return np.stack(patches).astype(np.float32)
    arrays = [prepare(load_series(sorted(f.glob("*.dcm"))), spec.input).array for f in folders[: max(n2d, 4)]]
    return np.stack(arrays).astype(np.float32)


def write_selftest(out: Path, v: VariantSpec, task: str, x: np.ndarray, expected: np.ndarray,
                   fp32_out: np.ndarray, simulated: bool | None = None) -> dict[str, Any]:
    """Write ``out`` (npz: input, expected) and return its SelfTest fields (tolerances chosen from
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
    return {"file": f"selftest/{out.name}", "sha256": sha256_file(out), "size": out.stat().st_size,
            "input_shape": list(x.shape), "atol": float(atol), "rtol": float(rtol),
            "min_close_fraction": close, "min_argmax_agreement": agree}


# --------------------------------------------------------------------------------------------
# The device validation set (shipped in the manifest; ISA-limited runs use it too)
# --------------------------------------------------------------------------------------------


def write_device_validation(spec: ModelSpec, folders: Sequence[Path], out: Path) -> ValidationSamples:
    """Write the device validation set ``out`` from ``folders`` (series with truth.json, and
    labels.npy for segmentation), prepared by the agent's own code; return it as read back."""
    from agent.imaging import load_series, prepare
    from deploy.training import labels_to_model_space

    inputs, truth = [], []
    for folder in folders:
        prepared = prepare(load_series(sorted(folder.glob("*.dcm"))), spec.input)
        inputs.append(prepared.array)
        if spec.task == "classification":
            truth.append(int(json.loads((folder / "truth.json").read_text())["class_index"]))
        else:
            # on the model grid, sampled exactly as the model's training targets were
            truth.append(labels_to_model_space(np.load(folder / "labels.npy"), prepared.geometry, len(spec.labels)))
    with atomic_path(out) as tmp:
        write_validation_set(tmp, spec.task, inputs, truth)
    # the stored inputs are 8-bit: everything downstream runs on what the device will read
    return load_validation_set(out)


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``score`` output as plain floats: accuracy and per-class recall, or mean and per-label Dice."""
    if "accuracy" in metrics:
        out = {"accuracy": float(metrics["accuracy"])}
        out.update({f"recall.{k}": float(r["recall"]) for k, r in metrics["per_class"].items()})
        return out
    out = {"mean_dice": float(metrics["mean_dice"])}
    out.update({f"dice.{k}": float(d) for k, d in metrics["dice"].items()})
    return out


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What one :class:`GateRun` measured: the evaluation (``res``, metrics dict), agreement with
    FP32, batch invariance, the probe outputs (self-test), the backend's description and the
    execution precision read back, and the verdict against FP32."""

    run: GateRun
    res: Mapping[str, Any]
    inv: Mapping[str, Any]
    probe_out: np.ndarray
    backend_precision: str
    exec_prec: Mapping[str, Any]
    verdict: Verdict
    failures: tuple[str, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.failures

    def family_verdict(self, describe: str) -> dict[str, Any]:
        """gate.json's (and the manifest's IsaVerdict) record of this run."""
        summary = headline(self.verdict)
        if not self.inv["passed"]:
            summary += "; " + self.failures[-1]
        return {"passed": self.passed, "method": self.run.method, "summary": summary, "host": describe}


def _check_disjoint(build: Path, seed: int, n: int) -> None:
    """Refuse a validation set that shares a series with the calibration set."""
    from deploy.synth import derive_seed

    calib = read_json(build / "calibration.json")
    used = set(calib.get("series_seeds", ()))
    overlap = [i for i in range(n) if derive_seed(seed, i) in used]
    if overlap:
        raise GateError(f"validation seed {seed}: series {overlap[:5]} are also in the calibration set; "
                        "use a different validation_seed")


@dataclass(frozen=True)
class _Context:
    """What every run of one gate shares: the spec, the held-out set, the FP32 reference."""

    model_dir: Path
    spec: ModelSpec
    n: int
    seed: int
    common: Mapping[str, Any]
    ref: Mapping[str, Any]
    ref_outputs: Sequence[Any]
    probe_inputs: np.ndarray
    warm: tuple[int, ...] | None
    threads: int


def _execute(ctx: _Context, v: VariantSpec, run: GateRun, path: Path) -> RunResult:
    """One run of ``v``: the held-out set through the agent's pipeline, batch invariance and the
    execution precision read back; judged against FP32."""
    from deploy.evaluate import evaluate_model

    t0 = time.perf_counter()
    if v.id == "fp32" and run.method == "native":
        res, outputs = ctx.ref, ctx.ref_outputs
    else:
        res = evaluate_model(ctx.model_dir, ctx.n, ctx.seed, variant_path=path, backend=run.backend,
                             precision=v.precision, **ctx.common)
        outputs = res.pop("outputs")
    agree = argmax_agreement(ctx.ref_outputs, outputs, ctx.spec.task)
    del outputs  # label maps of whole volumes: do not hold them past the comparison
    backend = load_variant(ctx.spec, v, path, ctx.threads, ctx.warm, run.backend, run.options)
    inv, probe_out = batch_invariance(backend, ctx.probe_inputs, ctx.spec.task)
    described = backend.describe()
    del backend
    # ONNX Runtime keeps its arena (im2col buffers: GBs for 3D convs) until the session is
    # collected; collect now, before the next run allocates its own
    gc.collect()
    exec_prec = execution_precision(v, run.backend, path, ctx.threads)
    gc.collect()
    verdict = compare(ctx.spec.task, ctx.ref, res, agree, ctx.spec.gate)
    failures = list(verdict.failures)
    if not inv["passed"]:
        failures.append(f"batch sizes {BATCH_SIZES} disagree: argmax agreement {inv['argmax_agreement']:.5f}, "
                        f"max logit difference {inv['max_abs_diff']:.3g} ({inv['rel_diff']:.2e} of scale)")
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


def _entry(v: VariantSpec, rec: Mapping[str, Any], digest: str, results: Sequence[RunResult],
           verdicts: dict[str, dict[str, Any]], family: str) -> tuple[dict[str, Any], RunResult]:
    """gate.json's record of ``v`` (before publishability): the primary run's figures, every
    run's method and verdict, and the per-family verdicts."""
    primary = _primary(v, results, family)
    native = next((r for r in results if r.run.method == "native"), None)
    # what this host's runtime really executes: the native run's kernels when there is one
    exec_prec = (native or primary).exec_prec
    entry: dict[str, Any] = {
        "file": rec["file"],
        "sha256": digest,
        "validated_with": _validated_note(v, primary.run),
        "method": primary.run.method,
        "backend_reported_precision": primary.backend_precision,
        "execution_precision": dict(exec_prec),
        "n_samples": int(primary.res["n"]),
        "metrics": primary.verdict.metrics,
        "reference": primary.verdict.reference,
        "drops": primary.verdict.drops,
        "thresholds": primary.verdict.thresholds,
        "failures": list(primary.failures),
        "batch_invariance": dict(primary.inv),
        "seconds": round(sum(r.seconds for r in results), 1),
        "timings_ms": primary.res.get("timings_ms", {}),
        "runs": [{"method": r.run.method, "backend": r.run.backend, "families": list(r.run.families),
                  "passed": r.passed, "summary": headline(r.verdict), "failures": list(r.failures),
                  "execution_precision": r.exec_prec.get("summary", ""), "seconds": r.seconds} for r in results],
        "isa_verdicts": verdicts,
        "isa_family": family,
        "targets": list(v.targets),
    }
    return entry, primary


def gate(model_dir: Path, build: Path, cfg: QuantConfig, variant_ids: Sequence[str] | None = None,
         dicom: Path | None = None, n: int | None = None) -> dict[str, Any]:
    """Run the gate for every built variant in ``build``; write and return gate.json's document."""
    from tqdm import tqdm

    from agent.engines.device_gate import predict, score
    from deploy.evaluate import evaluate_model, generate_heldout

    spec = load_spec(model_dir)
    vdoc_path = build / "variants.json"
    if not vdoc_path.exists():
        raise GateError(f"{vdoc_path} not found: run `edge-deploy quantize` first")
    vdoc = read_json(vdoc_path)
    known = catalogue_by_id()
    me = host()
    family = me.isa_family
    records = [r for r in vdoc["variants"] if not variant_ids or r["id"] in variant_ids or r["id"] == "fp32"]
    fp32_rec = next((r for r in records if r["id"] == "fp32" and r["built"]), None)
    if fp32_rec is None:
        raise GateError("the fp32 variant is missing from variants.json; it is the gate's reference")
    # fail fast: every file must still be the one `quantize` recorded (no stale or edited variant)
    for rec in records:
        if rec["built"] and sha256_file(build / rec["file"]) != rec["sha256"]:
            raise GateError(f"{rec['file']} changed since `quantize` (sha256 mismatch); re-run quantize")
    is_3d = spec.input.dims == 3
    n = n or (cfg.validation_volumes if is_3d else cfg.validation_samples)
    t_start = time.perf_counter()
    stage_s: dict[str, float] = {}
    results: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="validation-", dir=build) as tmp:
        t = time.perf_counter()
        if dicom is None:
            _check_disjoint(build, cfg.validation_seed, n)
            with tqdm(total=n, desc="validation set", unit="series", file=sys.stderr) as bar:
                folders = generate_heldout(spec.task, Path(tmp), n, cfg.validation_seed,
                                           progress=lambda *_: bar.update(1))
            data_dir, source = Path(tmp), f"deploy.synth seed {cfg.validation_seed}, {n} series"
        else:
            data_dir, source = dicom, f"DICOM folder {dicom}"
            folders = sorted(p for p in dicom.iterdir() if p.is_dir())
        common = {"data_dir": data_dir, "keep_outputs": True, "progress": False, "threads": cfg.threads}
        probe_inputs = selftest_inputs(spec, folders)
        warm = warmup_shape(spec)
        # the device validation set: the first samples of the held-out set (classes round robin)
        n_dev = min(cfg.device_validation_volumes if is_3d else cfg.device_validation_samples, len(folders))
        set_path = build / "validation" / "set.npz"
        samples = write_device_validation(spec, folders[:n_dev], set_path)
        stage_s["heldout_and_device_set"] = round(time.perf_counter() - t, 1)

        # FP32 reference: once on the held-out set, once on the device set
        t = time.perf_counter()
        ref = evaluate_model(model_dir, n, cfg.validation_seed, variant_path=build / fp32_rec["file"],
                             backend="onnxruntime", precision="fp32", **common)
        ref_outputs = ref.pop("outputs")
        fp32_backend = load_variant(spec, known["fp32"], build / fp32_rec["file"], cfg.threads, warm)
        fp32_probe = np.concatenate([fp32_backend.run(probe_inputs[i:i + 1]) for i in range(len(probe_inputs))])
        fp32_device_preds = predict(fp32_backend.run, samples, spec)
        del fp32_backend
        gc.collect()
        device_validation = {
            "file": "validation/set.npz", "sha256": sha256_file(set_path), "size": set_path.stat().st_size,
            "n_samples": len(samples), "source": f"{source}: the first {len(samples)}",
            "reference": flat_metrics(score(samples, fp32_device_preds, spec)),
        }
        drift_outputs = _drift_outputs(spec, ref_outputs)
        stage_s["fp32_reference"] = round(time.perf_counter() - t, 1)
        ctx = _Context(model_dir, spec, n, cfg.validation_seed, common, ref, ref_outputs, probe_inputs, warm,
                       cfg.threads)

        cache: dict[tuple[Any, ...], RunResult] = {}
        bar = tqdm(records, desc="gate", unit="variant", file=sys.stderr)
        t = time.perf_counter()
        for rec in bar:
            bar.set_postfix_str(rec["id"])
            v = known[rec["id"]]
            if not rec["built"]:
                results[v.id] = {"passed": False, "failures": [f"not built: {rec.get('reason', '?')}"],
                                 "isa_verdicts": {}, "isa_family": family, "targets": list(v.targets)}
                continue
            path = build / rec["file"]
            digest = sha256_file(path)
            if digest != rec["sha256"]:
                raise GateError(f"{path.name} changed since `quantize` (sha256 mismatch); re-run quantize")
            runs = plan_runs(v, me)
            if not runs:
                results[v.id] = {"passed": False, "file": rec["file"], "sha256": digest, "isa_verdicts": {},
                                 "isa_family": family, "targets": list(v.targets),
                                 "failures": [f"cannot be gated here: {'; '.join(me.unmet(v.requires))}"]}
                continue
            done: list[RunResult] = []
            errors: list[str] = []
            for run in runs:
                # variants that run the same file the same way (ort-fp16 / trt-fp16, the u8s8
                # simulation of ort-int8-u8s8 and ov-int8) share one run
                key = (digest, run.backend, v.precision, tuple(sorted(run.options.items())))
                try:
                    if key not in cache:
                        cache[key] = _execute(ctx, v, run, path)
                    done.append(replace(cache[key], run=run))
                except EdgeAgentError as exc:
                    errors.append(f"could not run on {run.backend}: {exc}")
                    logger.error("variant %s (%s): %s", v.id, run.method, exc)
            verdicts: dict[str, dict[str, Any]] = {}
            for r in done:
                for fam in r.run.families:
                    merge_verdict(verdicts, fam, r.family_verdict(me.describe()))
            if not done:
                results[v.id] = {"passed": False, "file": rec["file"], "sha256": digest, "failures": errors,
                                 "isa_verdicts": {}, "isa_family": family, "targets": list(v.targets)}
                continue
            entry, primary = _entry(v, rec, digest, done, verdicts, family)
            entry["failures"] += errors
            for fam in isa_limited_families(v, me):
                t_isa = time.perf_counter()
                try:
                    verdict, worker = _isa_limited(ctx, v, path, set_path, fam, samples, fp32_device_preds, build)
                except (GateError, IsaLimitedError) as exc:
                    entry.setdefault("isa_limited_errors", {})[fam] = str(exc)
                    logger.error("variant %s on %s (isa-limited): %s", v.id, fam, exc)
                    continue
                merge_verdict(verdicts, fam, {"passed": verdict.passed, "method": "isa-limited",
                                               "summary": headline(verdict), "host": me.describe()})
                entry.setdefault("isa_limited", {})[fam] = {
                    "onednn_max_cpu_isa": ONEDNN_MAX_ISA[fam], "n_samples": len(samples),
                    "metrics": verdict.metrics, "failures": list(verdict.failures),
                    "seconds": round(time.perf_counter() - t_isa, 1), **worker}
            results[v.id] = (entry, primary)
        stage_s["variants"] = round(time.perf_counter() - t, 1)

        # publishability needs FP32's verdict, so it comes after every run
        fp32_entry = results.get("fp32")
        fp32_passed = isinstance(fp32_entry, tuple) and fp32_entry[1].passed and not fp32_entry[0]["failures"]
        for vid, value in list(results.items()):
            if not isinstance(value, tuple):
                value["publishable"], value["verdict_note"] = False, "; ".join(value["failures"])
                continue
            entry, primary = value
            v = known[vid]
            ok, note = publishability(v, primary.passed and not entry["failures"], entry["isa_verdicts"],
                                      fp32_passed)
            entry["passed"] = entry["publishable"] = ok
            entry["verdict_note"] = note
            if not ok and not entry["failures"]:
                # the primary run passed, a target family failed: say which, with its figures
                entry["failures"] = [f"{f} ({r['method']}): {r['summary']}" for f, r in entry["isa_verdicts"].items()
                                     if f in v.targets and not r["passed"]] or [note]
            if ok:
                k = 1 if is_3d else len(probe_inputs)  # 3D: one patch keeps the vector a few MB
                entry["selftest"] = write_selftest(build / "selftest" / f"{vid}.npz", v, spec.task,
                                                   probe_inputs[:k], primary.probe_out[:k], fp32_probe[:k],
                                                   simulated=primary.run.method != "native")
            results[vid] = entry

    doc = {
        "model": spec.name,
        "version": spec.version,
        "task": spec.task,
        "isa_family": family,
        "host": me.describe(),
        "validation": {"source": source, "seed": cfg.validation_seed if dicom is None else None, "n": n,
                       "calibration_seed": cfg.calibration_seed, "disjoint_from_calibration": dicom is None},
        "device_validation": device_validation,
        "thresholds": spec.gate.model_dump(),
        "reference": {k: v for k, v in ref.items() if k not in ("outputs",)},
        "drift_outputs": drift_outputs,
        "variants": results,
        "passed": sorted(k for k, r in results.items() if r.get("passed")),
        "failed": sorted(k for k, r in results.items() if not r.get("passed")),
        "stage_seconds": stage_s,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(build / "gate.json", doc)
    return doc


def _isa_limited(ctx: _Context, v: VariantSpec, path: Path, set_path: Path, family: str, samples: ValidationSamples,
                 fp32_preds: Sequence[np.ndarray], build: Path) -> tuple[Verdict, dict[str, Any]]:
    """One ISA-limited run of ``v`` for ``family``, judged against FP32's predictions on the set."""
    from agent.engines.device_gate import judge_predictions

    with tempfile.TemporaryDirectory(prefix="isa-", dir=build) as work:
        preds, worker = isa_limited_predictions(ctx.model_dir, v, path, set_path, family, ctx.threads, Path(work))
    if len(preds) != len(samples):
        raise GateError(f"{v.id} with ONEDNN_MAX_CPU_ISA={ONEDNN_MAX_ISA[family]}: {len(preds)} predictions "
                        f"for {len(samples)} samples")
    return judge_predictions(samples, fp32_preds, preds, ctx.spec), worker


def _drift_outputs(spec: ModelSpec, ref_outputs: Sequence[Any]) -> dict[str, Any]:
    """The drift profile's output part: FP32's predictions on the held-out set."""
    from deploy.drift_profile import DriftAccumulator

    drift = DriftAccumulator(spec.input.modality)
    if spec.task == "classification":
        from agent.imaging import classification_outputs

        for logits in ref_outputs:
            out = classification_outputs(logits, spec.labels)
            drift.add_classification(out.label, out.confidence)
    else:
        for label_map in ref_outputs:
            counts = np.bincount(np.asarray(label_map).ravel(), minlength=len(spec.labels))
            drift.add_segmentation({name: float(counts[i]) / label_map.size
                                    for i, name in enumerate(spec.labels) if i > 0})
    return drift.outputs()


def format_report(doc: Mapping[str, Any]) -> str:
    """A short human-readable summary of gate.json: per variant, then its per-family verdicts."""
    lines = [f"{doc['model']} {doc['version']}: gate on {doc['validation']['source']}",
             f"  host family {doc.get('isa_family', '?')}: {doc.get('host', '')}"]
    for vid, r in doc["variants"].items():
        status = "PASS" if r.get("passed") else "FAIL"
        m = r.get("metrics", {})
        key = "accuracy" if "accuracy" in m else "mean_dice"
        fig = f"{key} {m[key]:.4f} agree {m.get('argmax_agreement', float('nan')):.4f}" if key in m else ""
        prec = r.get("execution_precision", {}).get("summary", "")
        targets = ",".join(r.get("targets", ())) or "-"
        lines.append(f"  {status} {vid:<17} {fig:<38} {prec:<24} targets {targets}")
        for fam, verdict in sorted(r.get("isa_verdicts", {}).items()):
            mark = "pass" if verdict["passed"] else "FAIL"
            lines.append(f"       {fam:<13} {verdict['method']:<11} {mark}: {verdict['summary']}")
        for fam, error in sorted(r.get("isa_limited_errors", {}).items()):
            lines.append(f"       {fam:<13} isa-limited could not run (no verdict: devices gate it): "
                         f"{error.splitlines()[-1][:160]}")
        if r.get("verdict_note"):
            lines.append(f"       => {r['verdict_note']}")
        for f in r.get("failures", []):
            lines.append(f"       - {f}")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy gate``."""
    p = subparsers.add_parser(
        "gate",
        help="accuracy gate: every variant vs FP32 on a held-out set (thresholds from model.toml [gate])",
        description="Run FP32 and every built variant over a held-out validation set (disjoint from "
        "calibration) through the agent's pipeline and backends; fail variants whose accuracy, class "
        "recall, Dice or argmax agreement drop beyond the model's thresholds, or whose predictions "
        "change with the batch size. Writes gate.json and self-test vectors.",
    )
    p.add_argument("model_dir", type=Path, help="model folder with model.toml")
    p.add_argument("--build", type=Path, default=None, help="build folder (default build/deploy/<model>)")
    p.add_argument("--variants", default="", help="comma-separated variant ids (default: all built)")
    p.add_argument("--n", type=int, default=None, help="validation series (default: model.toml / 480 slices, 6 volumes)")
    p.add_argument("--seed", type=int, default=None, help="validation set seed (default 300001)")
    p.add_argument("--dicom", type=Path, default=None, help="validate on this folder of series (with truth.json/labels.npy)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from dataclasses import replace

    spec = load_spec(args.model_dir)
    cfg = config_from_args(args.model_dir, argparse.Namespace(threads=args.threads))
    if args.seed is not None:
        cfg = replace(cfg, validation_seed=args.seed)
    build = args.build or default_build_dir(spec.name)
    ids = [v for v in args.variants.split(",") if v] or None
    doc = gate(args.model_dir, build, cfg, ids, args.dicom, args.n)
    print(format_report(doc))
    return 0 if not doc["failed"] else 1
