"""``edge-deploy quantize``: turn the calibrated FP32 model into its device-specific variant files.

Takes the build folder written by ``edge-deploy calibrate`` (``model.pre.onnx``, the per-tensor
ranges ``ranges.<method>.json`` and ``amax.json``) and writes one file per variant of
:data:`deploy.variants.CATALOGUE` plus ``variants.json`` describing them:

* **ORT INT8 u8s8 / s8s8** (``quantize_static``, Q/DQ format, per-channel symmetric s8 weights):
  u8 activations for x86 (VNNI), symmetric s8 activations for ARM. The calibration cache written by
  ``calibrate`` is passed as ``calibration_cache_path``, so quantize_static reuses the ranges that
  the agent's preprocessing produced instead of recalibrating. s8s8 uses dedicated Q/DQ pairs per
  consumer: ORT x86 fuses an s8 Q/DQ Conv into an integer kernel only when the quantized tensor
  has a single consumer. Even so, on x86 the convs that feed a residual Add stay float (measured on
  mr-brain-cls: 6 of 13 convs integer; all 22 on the UNet): s8s8 is published for ARM only, and
  the gate's execution-precision read-back shows what ran.
* **OpenVINO INT8**: the same u8s8 Q/DQ file (OpenVINO's low-precision transformations turn the
  Q/DQ pairs into int8 convolutions, Concat and MaxPool included); a Conv-only layout was slower.
* **FP16**: onnxconverter-common's converter with ``keep_io_types`` (Cast nodes at the edges, so
  the agent feeds and reads float32 as for every other variant).
* **TensorRT INT8 / FP8**: explicit-quantization graphs written here (:func:`build_explicit_qdq`)
  in the layout TensorRT's own tooling produces: Q/DQ on the activation input and a DQ on the
  (pre-quantized) weights of every Conv/Gemm/MatMul, nothing on ConvTranspose/Resize/Concat,
  symmetric scales with zero point 0: ``amax/127`` (int8) or ``amax/448`` (FP8 E4M3) per tensor for
  activations and per output channel for weights. ONNX Runtime's own float8 quantizer only
  calibrates with "Distribution" and produced outputs unrelated to FP32 on this project's models.

Each output is written to a temporary file and renamed, so Ctrl-C never leaves half a model.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import EdgeAgentError
from agent.manifest import sha256_file
from deploy.variants import (
    VariantSpec,
    atomic_path,
    default_build_dir,
    read_json,
    select_variants,
    write_json,
)

logger = logging.getLogger(__name__)

#: largest magnitude of the symmetric narrow int8 range TensorRT uses (-127..127)
INT8_MAX = 127.0
#: largest finite FLOAT8E4M3FN value
FP8_E4M3_MAX = 448.0
#: ops whose weights and activation input get Q/DQ in the TensorRT layout
TRT_QUANT_OPS = ("Conv", "Gemm", "MatMul")
#: smallest scale written: a tensor that was all zeros during calibration still gets a valid
#: (positive) scale; the gate then catches what such a scale does to real data
MIN_SCALE = 1e-12


class QuantizeError(EdgeAgentError):
    """A variant could not be built (bad inputs, a converter failure)."""


# --------------------------------------------------------------------------------------------
# Model preparation (shared with calibrate)
# --------------------------------------------------------------------------------------------


def preprocess_model(fp32_path: Path, out_path: Path) -> dict[str, Any]:
    """Run ORT's ``quant_pre_process`` (shape inference + graph optimisation, BatchNorm folded
    into Conv) on ``fp32_path`` and write ``out_path`` atomically. Returns notes for the record.

    Symbolic shape inference is tried first; models with Resize/Pad chains (MONAI UNets) make it
    fail with "Incomplete symbolic shape inference", then the ONNX shape inference alone is used,
    which is all a convolutional network needs.
    """
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: dict[str, Any] = {"symbolic_shape_inference": True}
    src = Path(fp32_path).resolve()
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix="edge-deploy-pre-") as scratch:
        # when symbolic shape inference gives up it first dumps "sym_shape_infer_temp.onnx" (plus an
        # external-data file) into the current directory: run it from a scratch directory
        with _working_directory(Path(scratch)):
            try:
                quant_pre_process(str(src), str(tmp.resolve()))
            except Exception as exc:  # noqa: BLE001 - SymbolicShapeInference raises a bare Exception
                logger.info("symbolic shape inference failed (%s); using ONNX shape inference only", exc)
                notes = {"symbolic_shape_inference": False, "reason": str(exc)}
                quant_pre_process(str(src), str(tmp.resolve()), skip_symbolic_shape=True)
    return notes


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """chdir into ``path`` for the block (contextlib.chdir is Python >= 3.11 only)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _save_checked(model: Any, out_path: Path) -> None:
    """Check ``model`` with the ONNX checker and save it atomically to ``out_path``."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise QuantizeError(f"{out_path.name}: generated graph is not valid ONNX: {exc}") from exc
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))


def _default_opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise QuantizeError("model has no default-domain opset import")


def _prune_opset_imports(model: Any) -> None:
    """Drop opset imports of domains no node uses (quant_pre_process adds ORT's internal ones,
    which TensorRT's parser and other runtimes have no business seeing)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [imp for imp in model.opset_import if imp.domain in used or imp.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


# --------------------------------------------------------------------------------------------
# ONNX Runtime INT8 (quantize_static)
# --------------------------------------------------------------------------------------------


def _ort_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def build_ort_qdq(
    pre_path: Path,
    out_path: Path,
    ranges_path: Path,
    method: str,
    *,
    activations: str,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    reduce_range: bool = False,
) -> dict[str, Any]:
    """ONNX Runtime static INT8 Q/DQ model with per-channel symmetric s8 weights.

    ``activations``: ``"u8"`` (asymmetric u8, x86 VNNI) or ``"s8"`` (symmetric s8, ARM).
    ``reduce_range``: 7-bit weights, for x86 without VNNI, whose VPMADDUBSW sums pairs of u8 x s8
    products in 16 bits and saturates on 8-bit weights (VNNI and ARM SDOT sum in 32 bits: False).
    ``ranges_path``: the ORT calibration cache written by ``edge-deploy calibrate`` for
    ``method``; quantize_static loads it instead of running calibration again. Returns notes.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if activations not in ("u8", "s8"):
        raise ValueError(f"activations must be 'u8' or 's8', got {activations!r}")
    extra: dict[str, Any] = {
        "WeightSymmetric": True,  # per-channel QLinearConv needs symmetric weights
        "ActivationSymmetric": activations == "s8",
        # s8 on x86: ORT converts an s8 Q/DQ Conv to its integer kernel only when the Q has a single
        # consumer; a dedicated pair per consumer gets the UNet's skip connections fused (22/22)
        "DedicatedQDQPair": activations == "s8",
    }
    with atomic_path(out_path) as tmp, _quiet_ort_quantizer():
        quantize_static(
            str(pre_path),
            str(tmp),
            calibration_data_reader=None,
            calibration_cache_path=str(ranges_path),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=_ort_method(method),
            extra_options=extra,
        )
        stripped = strip_output_qdq(tmp)
    return {"tool": "onnxruntime.quantization.quantize_static", "activations": activations,
            "weights": f"{'s7 (reduce_range)' if reduce_range else 's8'} per-channel symmetric",
            "method": method, "extra_options": extra,
            "float_outputs": stripped}


def strip_output_qdq(path: Path) -> list[str]:
    """Remove QuantizeLinear -> DequantizeLinear pairs that feed graph outputs (the logits).

    quantize_static quantizes every conv's output, the last one's too; quantized logits gain
    nothing (nothing integer consumes them) and cost accuracy: 256 levels create argmax ties
    between close classes, and OpenVINO spends a float Subtract/Multiply pass over the whole
    output volume to dequantize them. The last conv then writes float logits directly. Rewrites
    ``path`` atomically; returns the outputs made float.
    """
    model = _load(path)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    drop: set[int] = set()
    changed = []
    for out in graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers.get(q.output[0], 0) != 1:
            continue
        src = producer.get(q.input[0])
        if src is None or consumers.get(q.input[0], 0) != 1:
            continue  # the float tensor is also used elsewhere (or is a graph input): keep the pair
        # the node that produced the float value now produces the graph output under its name
        for k, name in enumerate(src.output):
            if name == q.input[0]:
                src.output[k] = out.name
        drop.update({id(q), id(dq)})
        changed.append(out.name)
    if changed:
        kept = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(kept)
        used = {i for n in graph.node for i in n.input}
        live = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(live)
        _save_checked(model, path)
    return changed


class _quiet_ort_quantizer:
    """Silence the quantizer's own prints/warnings (it logs a pre-processing hint at WARNING even
    for pre-processed models) without hiding real errors, which still raise."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(max(self._level, logging.ERROR))

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self._level)


# --------------------------------------------------------------------------------------------
# FP16
# --------------------------------------------------------------------------------------------


def build_fp16(pre_path: Path, out_path: Path) -> dict[str, Any]:
    """FP16 weights and compute, FP32 inputs/outputs (Cast nodes at the graph edges).

    Uses onnxconverter-common's ``convert_float_to_float16`` (``keep_io_types=True``); its
    warnings about initializers clamped to the fp16 range are logged, not raised. Returns notes.
    """
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise QuantizeError(
            "FP16 conversion needs onnxconverter-common (pip install onnxconverter-common)"
        ) from exc
    model = _load(pre_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    for w in caught:
        logger.info("fp16 conversion: %s", w.message)
    _prune_opset_imports(converted)
    _save_checked(converted, out_path)
    return {"tool": "onnxconverter_common.float16", "keep_io_types": True,
            "converter_warnings": sorted({str(w.message)[:200] for w in caught})}


# --------------------------------------------------------------------------------------------
# TensorRT explicit quantization (INT8 / FP8)
# --------------------------------------------------------------------------------------------


def _weight_axis(node: Any) -> int | None:
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
        return np.clip(np.rint(scaled), -INT8_MAX, INT8_MAX).astype(np.int8)
    import ml_dtypes

    # ml_dtypes rounds to nearest even; clip first, E4M3FN has no infinity (overflow would be NaN)
    return np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)


def _zero_point(kind: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    if kind == "int8":
        return np.zeros(shape, dtype=np.int8)
    import ml_dtypes

    return np.zeros(shape, dtype=ml_dtypes.float8_e4m3fn)


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
    from onnx import helper, numpy_helper, version_converter

    if kind not in ("int8", "fp8"):
        raise ValueError(f"kind must be 'int8' or 'fp8', got {kind!r}")
    qmax = INT8_MAX if kind == "int8" else FP8_E4M3_MAX
    model = _load(pre_path)
    _prune_opset_imports(model)
    need = 19 if kind == "fp8" else 13
    if _default_opset(model) < need:
        try:
            model = version_converter.convert_version(model, need)
        except Exception as exc:  # the converter raises plain RuntimeError/ValueError variants
            raise QuantizeError(f"cannot convert the model to opset {need} for {kind} Q/DQ: {exc}") from exc

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    excluded = set(nodes_to_exclude)
    if keep_output_layers:
        outputs = {o.name for o in graph.output}
        excluded |= {n.name for n in graph.node if n.op_type in op_types and set(n.output) & outputs}
    act_qdq: dict[str, str] = {}  # activation tensor -> its DequantizeLinear output
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    quantized, skipped = 0, []

    for node in graph.node:
        if node.op_type not in op_types or node.name in excluded or len(node.input) < 2:
            new_nodes.append(node)
            continue
        x, w = node.input[0], node.input[1]
        axis = _weight_axis(node)
        if w not in inits or axis is None or x in inits:
            skipped.append(f"{node.name or node.op_type}: weight not a constant initializer")
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[w]).astype(np.float32)
        if node.op_type == "MatMul" and weight.ndim != 2:
            skipped.append(f"{node.name}: MatMul weight is not 2-D")
            new_nodes.append(node)
            continue
        if x not in amax:
            skipped.append(f"{node.name or node.op_type}: no calibration range for input {x!r}")
            new_nodes.append(node)
            continue

        # activation: one Q/DQ pair per tensor, shared by all its quantized consumers
        if x not in act_qdq:
            scale = np.array(max(float(amax[x]) / qmax, MIN_SCALE), dtype=np.float32)
            base = _unique(f"{x}_{kind}", inits)
            new_inits += [numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(_zero_point(kind), f"{base}_zero_point")]
            new_nodes += [
                helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zero_point"],
                                 [f"{base}_q"], name=f"{base}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero_point"],
                                 [f"{base}_dq"], name=f"{base}_DequantizeLinear"),
            ]
            act_qdq[x] = f"{base}_dq"

        # weight: stored quantized, per-output-channel DQ
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
        ch_amax = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
        w_scale = np.where(ch_amax > 0, ch_amax / qmax, 1.0).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        wq = _quantize_values(weight, w_scale.reshape(shape), kind)
        wbase = _unique(f"{w}_{node.name or quantized}_{kind}", inits)
        new_inits += [
            numpy_helper.from_array(wq, f"{wbase}_quantized"),
            numpy_helper.from_array(w_scale, f"{wbase}_scale"),
            numpy_helper.from_array(_zero_point(kind, (int(w_scale.size),)), f"{wbase}_zero_point"),
        ]
        new_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{wbase}_quantized", f"{wbase}_scale", f"{wbase}_zero_point"],
            [f"{wbase}_dq"], name=f"{wbase}_DequantizeLinear", axis=axis,
        ))
        node.input[0] = act_qdq[x]
        node.input[1] = f"{wbase}_dq"
        new_nodes.append(node)
        quantized += 1

    if quantized == 0:
        raise QuantizeError(f"{pre_path.name}: no {'/'.join(op_types)} node could be quantized: {skipped[:3]}")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    # float weights that only fed quantized nodes are now dead: drop them (file size)
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    _save_checked(model, out_path)
    return {"tool": "deploy.quantize.build_explicit_qdq", "kind": kind, "layout": "tensorrt",
            "quantized_nodes": quantized, "skipped_nodes": skipped, "activation_scale": f"amax/{qmax:g}",
            "weight_scale": f"per-channel amax/{qmax:g}", "opset": _default_opset(model),
            "float_output_layers": sorted(excluded - set(nodes_to_exclude))}


def _unique(base: str, taken: Mapping[str, Any]) -> str:
    name = base.replace("/", "_").replace(":", "_")
    i = 0
    candidate = name
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _conv_like_nodes(model_path: Path) -> list[str]:
    model = _load(model_path)
    return [n.name for n in model.graph.node if n.op_type in ("ConvTranspose",)]


def build_file(spec: VariantSpec, build: Path, calib: Mapping[str, Any], qcfg: Mapping[str, Any]) -> dict[str, Any]:
    """Build the file of one catalogue variant in ``build``; return notes about how."""
    pre = build / "model.pre.onnx"
    out = build / spec.file
    method = str(calib["method"])
    ranges = build / f"ranges.{method}.json"
    exclude = list(qcfg.get("exclude_nodes", ()))
    if spec.builder == "copy_fp32":
        src = build / "model.source.onnx"
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
        return {"tool": "copy", "source": "model.onnx (verbatim)"}
    if spec.builder in ("build_ort_u8s8", "build_ort_u8s8_rr"):
        # ConvTranspose: ORT has no integer kernel for it (3D) and OpenVINO keeps it float too;
        # quantizing it would only add Q/DQ round trips
        return build_ort_qdq(pre, out, ranges, method, activations="u8",
                             reduce_range=spec.builder == "build_ort_u8s8_rr",
                             nodes_to_exclude=exclude + _conv_like_nodes(pre))
    if spec.builder == "build_ort_s8s8":
        return build_ort_qdq(pre, out, ranges, method, activations="s8",
                             nodes_to_exclude=exclude + _conv_like_nodes(pre))
    if spec.builder == "build_fp16":
        return build_fp16(pre, out)
    if spec.builder in ("build_trt_int8", "build_trt_fp8"):
        kind = "int8" if spec.builder == "build_trt_int8" else "fp8"
        doc = read_json(build / "amax.json")
        # INT8 takes the calibration method's ranges (percentile clipping matters with 256
        # levels); FP8's exponent covers the full range, so it uses plain max like TensorRT's
        # own FP8 recipe
        table = doc["method_amax"] if kind == "int8" else doc["max_amax"]
        return build_explicit_qdq(pre, out, {k: float(v) for k, v in table.items()}, kind,
                                  nodes_to_exclude=exclude)
    raise QuantizeError(f"variant {spec.id}: unknown builder {spec.builder!r}")


def quantize(build: Path, variant_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Build every selected variant's file in ``build`` (after ``calibrate``); write variants.json.

    Files shared by several variants are built once. A variant whose builder fails is recorded
    with ``built: false`` and the reason (the others are still built); Ctrl-C removes nothing
    that was complete and leaves no partial file. Returns the variants.json document.
    """
    from tqdm import tqdm

    calib_path = build / "calibration.json"
    if not calib_path.exists():
        raise QuantizeError(f"{calib_path} not found: run `edge-deploy calibrate` first")
    calib = read_json(calib_path)
    qcfg = calib.get("config", {})
    specs = select_variants(list(variant_ids) if variant_ids else list(qcfg.get("variants", ())) or None)
    built: dict[str, dict[str, Any]] = {}
    records = []
    for spec in tqdm(specs, desc="quantize", unit="variant", file=sys.stderr):
        if spec.file not in built:
            t0 = time.perf_counter()
            try:
                notes = build_file(spec, build, calib, qcfg)
                built[spec.file] = {"ok": True, "notes": notes, "seconds": round(time.perf_counter() - t0, 1)}
            except (QuantizeError, ValueError, RuntimeError, OSError) as exc:
                logger.error("variant %s: build failed: %s", spec.id, exc)
                built[spec.file] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
        info = built[spec.file]
        rec: dict[str, Any] = {"id": spec.id, "backend": spec.backend, "precision": spec.precision,
                               "file": spec.file, "built": info["ok"]}
        if info["ok"]:
            path = build / spec.file
            rec.update(sha256=sha256_file(path), size=path.stat().st_size, notes=info["notes"],
                       build_seconds=info["seconds"])
        else:
            rec["reason"] = info["reason"]
        records.append(rec)
    doc = {"model": calib["model"], "version": calib["version"], "method": calib["method"], "variants": records}
    write_json(build / "variants.json", doc)
    return doc


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy quantize``."""
    p = subparsers.add_parser(
        "quantize",
        help="build the variant files (ORT INT8 u8s8/s8s8, OpenVINO INT8, FP16, TensorRT INT8/FP8 Q/DQ)",
        description="Build every variant file from a calibrated build folder (see `calibrate`).",
    )
    p.add_argument("model_dir", type=Path, help="model folder with model.toml (e.g. models/mr-brain-cls)")
    p.add_argument("--build", type=Path, default=None, help="build folder (default build/deploy/<model>)")
    p.add_argument("--variants", default="", help="comma-separated variant ids (default: all)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from agent.modelspec import load_spec

    spec = load_spec(args.model_dir)
    build = args.build or default_build_dir(spec.name)
    ids = [v for v in args.variants.split(",") if v] or None
    doc = quantize(build, ids)
    for rec in doc["variants"]:
        status = f"{rec['size'] / 1e6:7.2f} MB" if rec["built"] else f"FAILED: {rec['reason']}"
        print(f"{rec['id']:<16} {rec['file']:<28} {status}")
    return 0 if all(r["built"] for r in doc["variants"]) else 1

