"""TensorRT explicit-quantization graphs (INT8 / FP8 E4M3) written from the calibrated ranges.

:func:`build_explicit_qdq` takes ``model.pre.onnx`` and each activation's absolute maximum
(``amax.json``) and writes the Q/DQ graph in the layout TensorRT's own tooling produces: Q/DQ on
the activation input and a DQ on the (pre-quantized) weights of every Conv/Gemm/MatMul, nothing
on ConvTranspose/Resize/Concat, symmetric scales with zero point 0: ``amax/127`` (int8) or
``amax/448`` (FP8 E4M3) per tensor for activations and per output channel for weights. It
returns notes for ``variants.json``. ONNX Runtime's own float8 quantizer only calibrates with
"Distribution" and produced outputs unrelated to FP32 on this project's models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy.quantize_graph import QuantizeError, default_opset, load_model, prune_opset_imports, save_checked

if TYPE_CHECKING:  # onnx is imported where a graph is built, not when the CLI starts
    from onnx import ModelProto, NodeProto, TensorProto

__all__ = ["FP8_E4M3_MAX", "INT8_MAX", "MIN_SCALE", "TRT_QUANT_OPS", "build_explicit_qdq"]

#: largest magnitude of the symmetric narrow int8 range TensorRT uses (-127..127)
INT8_MAX = 127.0
#: largest finite FLOAT8E4M3FN value
FP8_E4M3_MAX = 448.0
#: ops whose weights and activation input get Q/DQ in the TensorRT layout
TRT_QUANT_OPS = ("Conv", "Gemm", "MatMul")
#: smallest scale written: a tensor that was all zeros during calibration still gets a valid
#: (positive) scale; the gate then catches what such a scale does to real data
MIN_SCALE = 1e-12


def _weight_axis(node: NodeProto) -> int | None:
    """Output-channel axis of a node's weight (input 1), or None if not per-channel quantizable."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1  # B is (K, N): N output channels; only 2-D constant B is quantized
    return None


def _quantize_values(values: np.ndarray, scale: np.ndarray, kind: str) -> np.ndarray:
    """Quantize ``values`` with (broadcastable) ``scale`` to int8 (narrow, zero point 0) or E4M3."""
    scaled = values.astype(np.float64) / scale
    if kind == "int8":
        q: np.ndarray = np.clip(np.rint(scaled), -INT8_MAX, INT8_MAX).astype(np.int8)
        return q
    import ml_dtypes

    # ml_dtypes rounds to nearest even; clip first, E4M3FN has no infinity (overflow would be NaN)
    fp8: np.ndarray = np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    return fp8


def _zero_point(kind: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    if kind == "int8":
        return np.zeros(shape, dtype=np.int8)
    import ml_dtypes

    zeros: np.ndarray = np.zeros(shape, dtype=ml_dtypes.float8_e4m3fn)
    return zeros


def _unique(base: str, taken: Mapping[str, Any]) -> str:
    name = base.replace("/", "_").replace(":", "_")
    i = 0
    candidate = name
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


class _Rewrite:
    """The nodes and initializers of the rewritten graph, built node by node: one shared Q/DQ pair
    per quantized activation tensor, one quantized initializer and DQ per quantized weight."""

    def __init__(self, inits: Mapping[str, TensorProto], kind: str) -> None:
        self.inits = inits
        self.kind = kind
        self.qmax = INT8_MAX if kind == "int8" else FP8_E4M3_MAX
        self.nodes: list[NodeProto] = []
        self.new_inits: list[TensorProto] = []
        self.act_dq: dict[str, str] = {}  # activation tensor -> its DequantizeLinear output
        self.quantized = 0

    def activation(self, x: str, amax: float) -> str:
        """The DequantizeLinear output standing for activation ``x`` (added on first use)."""
        from onnx import helper, numpy_helper

        if x not in self.act_dq:
            scale = np.array(max(amax / self.qmax, MIN_SCALE), dtype=np.float32)
            base = _unique(f"{x}_{self.kind}", self.inits)
            self.new_inits += [numpy_helper.from_array(scale, f"{base}_scale"),
                               numpy_helper.from_array(_zero_point(self.kind), f"{base}_zero_point")]
            self.nodes += [
                helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zero_point"],
                                 [f"{base}_q"], name=f"{base}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero_point"],
                                 [f"{base}_dq"], name=f"{base}_DequantizeLinear"),
            ]
            self.act_dq[x] = f"{base}_dq"
        return self.act_dq[x]

    def weight(self, node: NodeProto, weight: np.ndarray, axis: int) -> str:
        """Store ``node``'s weight quantized, per output channel; return its DequantizeLinear output."""
        from onnx import helper, numpy_helper

        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
        ch_amax = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
        w_scale = np.where(ch_amax > 0, ch_amax / self.qmax, 1.0).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        wq = _quantize_values(weight, w_scale.reshape(shape), self.kind)
        wbase = _unique(f"{node.input[1]}_{node.name or self.quantized}_{self.kind}", self.inits)
        self.new_inits += [
            numpy_helper.from_array(wq, f"{wbase}_quantized"),
            numpy_helper.from_array(w_scale, f"{wbase}_scale"),
            numpy_helper.from_array(_zero_point(self.kind, (int(w_scale.size),)), f"{wbase}_zero_point"),
        ]
        self.nodes.append(helper.make_node(
            "DequantizeLinear", [f"{wbase}_quantized", f"{wbase}_scale", f"{wbase}_zero_point"],
            [f"{wbase}_dq"], name=f"{wbase}_DequantizeLinear", axis=axis,
        ))
        return f"{wbase}_dq"


def _skip_reason(node: NodeProto, inits: Mapping[str, TensorProto], amax: Mapping[str, float]) -> str | None:
    """Why ``node`` (a Conv/Gemm/MatMul) cannot be quantized, or None when it can."""
    from onnx import numpy_helper

    x, w = node.input[0], node.input[1]
    if w not in inits or _weight_axis(node) is None or x in inits:
        return f"{node.name or node.op_type}: weight not a constant initializer"
    if node.op_type == "MatMul" and numpy_helper.to_array(inits[w]).ndim != 2:
        return f"{node.name}: MatMul weight is not 2-D"
    if x not in amax:
        return f"{node.name or node.op_type}: no calibration range for input {x!r}"
    return None


def _at_opset(model: ModelProto, need: int, kind: str) -> ModelProto:
    """``model`` converted to opset ``need`` when it is older (FP8 Q/DQ needs 19)."""
    from onnx import version_converter

    if default_opset(model) >= need:
        return model
    try:
        return version_converter.convert_version(model, need)
    except Exception as exc:  # the converter raises plain RuntimeError/ValueError variants
        raise QuantizeError(f"cannot convert the model to opset {need} for {kind} Q/DQ: {exc}") from exc


def build_explicit_qdq(
    pre_path: Path,
    out_path: Path,
    amax: Mapping[str, float],
    kind: str,
    *,
    op_types: Sequence[str] = TRT_QUANT_OPS,
    nodes_to_exclude: Sequence[str] = (),
    keep_output_layers: bool = True,
) -> dict[str, Any]:
    """Write a TensorRT-style explicit-quantization Q/DQ graph.

    ``amax``: per-tensor absolute maximum of each activation (from calibration); ``kind``:
    ``"int8"`` or ``"fp8"``. For every ``op_types`` node: its activation input goes through
    QuantizeLinear -> DequantizeLinear with scale ``amax / qmax`` and a zero point 0 of the
    quantized type; its constant weight is stored quantized (int8 or FLOAT8E4M3FN initializer)
    with a per-output-channel DequantizeLinear (scale ``channel_amax / qmax``); the bias stays
    float. Nothing else is touched: ConvTranspose, Resize, Concat, pooling and activations run in
    the engine's float precision. With ``keep_output_layers`` the conv/gemm that writes a graph
    output (the logits) stays float too: its output is a small difference of large sums (a head
    over post-ReLU features), where E4M3's 3 mantissa bits alone cost ~30 % of the logit spread on
    the test model, and it is one small layer. FP8 needs opset >= 19 (the graph is converted if
    older). Returns notes (counts of quantized/skipped nodes).
    """
    from onnx import numpy_helper

    if kind not in ("int8", "fp8"):
        raise ValueError(f"kind must be 'int8' or 'fp8', got {kind!r}")
    model = load_model(pre_path)
    prune_opset_imports(model)
    model = _at_opset(model, 19 if kind == "fp8" else 13, kind)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    excluded = set(nodes_to_exclude)
    if keep_output_layers:
        outputs = {o.name for o in graph.output}
        excluded |= {n.name for n in graph.node if n.op_type in op_types and set(n.output) & outputs}
    rewrite = _Rewrite(inits, kind)
    skipped: list[str] = []
    for node in graph.node:
        if node.op_type not in op_types or node.name in excluded or len(node.input) < 2:
            rewrite.nodes.append(node)
            continue
        reason = _skip_reason(node, inits, amax)
        if reason is not None:
            skipped.append(reason)
            rewrite.nodes.append(node)
            continue
        axis = _weight_axis(node)
        assert axis is not None  # _skip_reason refused nodes without one
        act = rewrite.activation(node.input[0], float(amax[node.input[0]]))
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        node.input[1] = rewrite.weight(node, weight, axis)
        node.input[0] = act
        rewrite.nodes.append(node)
        rewrite.quantized += 1

    if rewrite.quantized == 0:
        raise QuantizeError(f"{pre_path.name}: no {'/'.join(op_types)} node could be quantized: {skipped[:3]}")
    del graph.node[:]
    graph.node.extend(rewrite.nodes)
    graph.initializer.extend(rewrite.new_inits)
    # float weights that only fed quantized nodes are now dead: drop them (file size)
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    save_checked(model, out_path)
    qmax = rewrite.qmax
    # "tool" names the public entry point (deploy.quantize re-exports it): variants.json keeps its wording
    return {"tool": "deploy.quantize.build_explicit_qdq", "kind": kind, "layout": "tensorrt",
            "quantized_nodes": rewrite.quantized, "skipped_nodes": skipped, "activation_scale": f"amax/{qmax:g}",
            "weight_scale": f"per-channel amax/{qmax:g}", "opset": default_opset(model),
            "float_output_layers": sorted(excluded - set(nodes_to_exclude))}
