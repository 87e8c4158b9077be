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
* **TensorRT INT8 / FP8**: explicit-quantization graphs (``deploy.quantize_trt.build_explicit_qdq``)
  in the layout TensorRT's own tooling produces: Q/DQ on the activation input and a DQ on the
  (pre-quantized) weights of every Conv/Gemm/MatMul, nothing on ConvTranspose/Resize/Concat,
  symmetric scales with zero point 0: ``amax/127`` (int8) or ``amax/448`` (FP8 E4M3) per tensor for
  activations and per output channel for weights. ONNX Runtime's own float8 quantizer only
  calibrates with "Distribution" and produced outputs unrelated to FP32 on this project's models.

Each output is written to a temporary file and renamed, so Ctrl-C never leaves half a model.
This module holds the ONNX Runtime and FP16 builders and the stage; the TensorRT graphs are
``deploy.quantize_trt``, the preprocessed FP32 graph and shared graph helpers ``deploy.quantize_graph``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.core.util import atomic_path, sha256_file
from deploy.quantize_graph import (
    QuantizeError,
    load_model,
    preprocess_model,
    prune_opset_imports,
    save_checked,
)
from deploy.quantize_trt import TRT_QUANT_OPS, build_explicit_qdq
from deploy.records import VariantRecord, VariantsDoc
from deploy.variants import VariantSpec, default_build_dir, read_json, select_variants

__all__ = [
    "TRT_QUANT_OPS",
    "QuantizeError",
    "build_explicit_qdq",
    "build_file",
    "build_fp16",
    "build_ort_qdq",
    "preprocess_model",
    "quantize",
    "strip_output_qdq",
]

logger = logging.getLogger(__name__)

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
    model = load_model(path)
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
        save_checked(model, path)
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
    model = load_model(pre_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    for w in caught:
        logger.info("fp16 conversion: %s", w.message)
    prune_opset_imports(converted)
    save_checked(converted, out_path)
    return {"tool": "onnxconverter_common.float16", "keep_io_types": True,
            "converter_warnings": sorted({str(w.message)[:200] for w in caught})}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _conv_like_nodes(model_path: Path) -> list[str]:
    model = load_model(model_path)
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


def quantize(build: Path, variant_ids: Sequence[str] | None = None) -> VariantsDoc:
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
    # per file (variants may share one): (builder notes, seconds) or the reason it failed
    built: dict[str, tuple[dict[str, Any], float] | str] = {}
    records = []
    for spec in tqdm(specs, desc="quantize", unit="variant", file=sys.stderr):
        if spec.file not in built:
            t0 = time.perf_counter()
            try:
                notes = build_file(spec, build, calib, qcfg)
                built[spec.file] = (notes, round(time.perf_counter() - t0, 1))
            except (QuantizeError, ValueError, RuntimeError, OSError) as exc:
                logger.error("variant %s: build failed: %s", spec.id, exc)
                built[spec.file] = f"{type(exc).__name__}: {exc}"
        info = built[spec.file]
        if isinstance(info, str):
            rec = VariantRecord(id=spec.id, backend=spec.backend, precision=spec.precision, file=spec.file,
                                built=False, reason=info)
        else:
            path = build / spec.file
            rec = VariantRecord(id=spec.id, backend=spec.backend, precision=spec.precision, file=spec.file,
                                built=True, sha256=sha256_file(path), size=path.stat().st_size, notes=info[0],
                                build_seconds=info[1])
        records.append(rec)
    doc = VariantsDoc(model=calib["model"], version=calib["version"], method=calib["method"],
                      variants=tuple(records))
    doc.write(build / "variants.json")
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
    from agent.core.modelspec import load_spec

    spec = load_spec(args.model_dir)
    build = args.build or default_build_dir(spec.name)
    ids = [v for v in args.variants.split(",") if v] or None
    doc = quantize(build, ids)
    for rec in doc.variants:
        status = f"{(rec.size or 0) / 1e6:7.2f} MB" if rec.built else f"FAILED: {rec.reason}"
        print(f"{rec.id:<16} {rec.file:<28} {status}")
    return 0 if all(r.built for r in doc.variants) else 1

