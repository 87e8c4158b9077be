"""How the gate runs a variant file, and what the runtime really executes it in.

Takes a variant file and the backend the gate runs it on; returns a loaded backend of the
agent's own catalogue (:func:`load_variant`) or the execution precision read back from the
runtime (:func:`execution_precision`: ONNX Runtime's optimized graph, integer vs float kernels per
conv; OpenVINO's compiled model, runtime precision per layer).

Registers :class:`QdqSimulationBackend` (``deploy.variants.SIM_BACKEND``) with
``agent.inference.catalog`` on import: ONNX Runtime on the CPU computing a Q/DQ graph's
arithmetic exactly, which is how the gate checks graphs for hardware the build host is not
(TensorRT engines, x86 VNNI, ARM SDOT).
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.errors import EdgeAgentError
from agent.core.modelspec import ModelSpec
from agent.inference import catalog
from agent.inference.base import Backend, BackendInfo
from deploy.records import ExecutionPrecision
from deploy.variants import SIM_BACKEND, VariantSpec

__all__ = [
    "SIM_DISABLED_OPTIMIZERS",
    "SIM_SESSION_CONFIG",
    "GateError",
    "QdqSimulationBackend",
    "execution_precision",
    "load_variant",
    "openvino_execution_precision",
    "ort_execution_precision",
    "warmup_shape",
]


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

catalog.register_module(SIM_BACKEND, __name__)


@catalog.register(SIM_BACKEND)
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
        self._session: Any = None  # onnxruntime ships no type information
        self._input = ""
        self._info: BackendInfo | None = None

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
        self._info = BackendInfo(name=SIM_BACKEND, version=ort.__version__, device="cpu",
                                 precision=precision, providers=("CPUExecutionProvider",))
        shape = options.get("warmup_shape") or [1 if not isinstance(d, int) else d for d in inp.shape]
        self.run(np.zeros(tuple(shape), dtype=np.float32))

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """One batch -> the first output as float32."""
        if self._session is None:
            raise GateError(f"{SIM_BACKEND}: run() before load()")
        out = self._session.run(None, {self._input: np.ascontiguousarray(inputs, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> BackendInfo:
        """What is loaded (precision as requested: the graph decides the arithmetic)."""
        if self._info is None:
            raise GateError(f"{SIM_BACKEND}: describe() before load()")
        return self._info


# --------------------------------------------------------------------------------------------
# Loading variants through the agent's backends
# --------------------------------------------------------------------------------------------


def load_variant(spec: ModelSpec, v: VariantSpec, path: Path, threads: int, warm: tuple[int, ...] | None = None,
                 backend_name: str | None = None, backend_options: Mapping[str, Any] | None = None) -> Backend:
    """Load ``path`` through ``agent.inference.catalog`` on ``backend_name`` with
    ``backend_options`` (default: the backend that validates ``v`` here, its own or ONNX Runtime
    for TensorRT graphs, with its options); returns the loaded Backend."""
    backend = catalog.create(backend_name or v.validated_with)
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


# --------------------------------------------------------------------------------------------
# Execution precision, read back from the runtime
# --------------------------------------------------------------------------------------------

_ORT_INT_KERNELS = {"QLinearConv", "NhwcQLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
                    "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_ORT_FLOAT_KERNELS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedGemm", "FusedMatMul",
                      "NhwcFusedConv"}


def ort_execution_precision(path: Path, threads: int = 1, disabled_optimizers: Sequence[str] = (),
                            config: Mapping[str, str] | None = None) -> ExecutionPrecision:
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
    runtime = f"onnxruntime {ort.__version__} CPU"
    if source_fp16 and not counts["fp16"] and not counts["int8"]:
        # an FP16 graph on a CPU without fp16 kernels (x86): ORT inserts casts and computes in fp32
        return ExecutionPrecision(runtime=runtime, summary="fp32 (fp16 graph upcast: no fp16 kernels on this CPU)",
                                  kernels=dict(counts), qdq_nodes_left=qdq_sim)
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
    return ExecutionPrecision(runtime=runtime, summary=summary, kernels=dict(counts), qdq_nodes_left=qdq_sim)


def openvino_execution_precision(path: Path, hint: str, threads: int = 1) -> ExecutionPrecision:
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
    by: collections.Counter[str] = collections.Counter()
    for k, c in counts.items():
        by[names.get(k, k)] += c
    total = sum(by.values())
    top = by.most_common()
    summary = top[0][0] if len(top) == 1 else "+".join(k for k, _ in top) + " (" + ", ".join(
        f"{c}/{total} {k}" for k, c in top) + ")"
    return ExecutionPrecision(runtime=f"openvino {ov.__version__.split('-')[0]} CPU", summary=summary,
                              hint_read_back=str(read_back), layers=dict(by))


def execution_precision(v: VariantSpec, backend: str, path: Path, threads: int) -> ExecutionPrecision:
    """Read back the precision ``v`` executes in on this machine when run on ``backend`` (see the
    two functions above)."""
    if backend == "openvino":
        hint = str(v.options.get("inference_precision", "f32"))
        return openvino_execution_precision(path, hint, threads)
    if backend == SIM_BACKEND:
        return ort_execution_precision(path, threads, SIM_DISABLED_OPTIMIZERS, SIM_SESSION_CONFIG)
    return ort_execution_precision(path, threads)
