"""``edge-deploy gate``: prove every variant against FP32 on held-out data; fail the ones that drift.

Takes a quantized build folder (``variants.json``) and:

1. generates a held-out validation set with ``deploy.evaluate.generate_heldout`` (seed
   ``validation_seed``; disjoint from the calibration set, whose series seeds are checked, and
   from the training seeds) as real DICOM files, unless ``--dicom`` names a folder of series;
2. runs FP32 and then every variant over it with ``deploy.evaluate.evaluate_model``, i.e. the
   agent's own pipeline (``load_series`` -> ``prepare`` -> sliding window / one batch ->
   postprocess) on the agent's own backends (``agent.inference.catalog``). TensorRT graphs, which
   need a GPU, are run by ONNX Runtime on the CPU: their Q/DQ nodes then compute exactly the
   quantize/dequantize arithmetic the engine applies (a simulation of the numerics, not of the
   engine's kernels; the on-device self-test covers those);
3. compares each variant with FP32 on the same data against the model's ``[gate]`` thresholds
   (``agent.core.modelspec.GateSpec``): accuracy drop, every class's recall drop, mean Dice drop,
   every label's Dice drop, argmax agreement with FP32 (samples or voxels);
4. checks batch-size invariance: the same inputs at batch 1, 2 and 4 must give the same argmax
   (and logits within a small tolerance);
5. reads back the precision the runtime really executes (ONNX Runtime's optimized graph:
   integer vs float kernels per conv; OpenVINO's compiled model: runtime precision per layer);
6. writes a self-test vector per passing variant (``selftest/<id>.npz``), the device validation
   set (``validation/set.npz``) and ``gate.json``.

Each run gives a verdict for an instruction-set family (agent.core.isa): natively for this host's,
by exact simulation for target families this host is not, with OpenVINO restricted to lower x86
families; which runs, and what is published, is ``deploy.gate_families``. A variant fails a run on
any threshold; ``gate.json`` (:class:`deploy.records.GateDoc`) says which and by how much, per family.

This module orchestrates the stage and its command line; the parts live in
``deploy.gate_runtime`` (backends, the Q/DQ simulation, execution precision),
``deploy.gate_reference`` (held-out set, device set, FP32), ``deploy.gate_compare`` (each
variant against FP32) and ``deploy.gate_report`` (publish decision, self-tests, gate.json, summary).
"""


from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.core.accuracy import compare_classification, compare_segmentation
from agent.core.modelspec import load_spec
from deploy.calibrate import QuantConfig, config_from_args
from deploy.gate_compare import RunCache, RunResult, batch_invariance, checked_digest, gate_variant
from deploy.gate_reference import heldout_set, reference
from deploy.gate_report import decide, format_report, gate_document
from deploy.gate_runtime import GateError, QdqSimulationBackend
from deploy.records import GateDoc, VariantsDoc, VariantVerdict
from deploy.variants import catalogue_by_id, default_build_dir, host

__all__ = [
    "GateError",
    "QdqSimulationBackend",
    "batch_invariance",
    "compare_classification",
    "compare_segmentation",
    "format_report",
    "gate",
]


def gate(model_dir: Path, build: Path, cfg: QuantConfig, variant_ids: Sequence[str] | None = None,
         dicom: Path | None = None, n: int | None = None) -> GateDoc:
    """Run the gate for every built variant in ``build``; write gate.json and return its document."""
    from tqdm import tqdm

    spec = load_spec(model_dir)
    vdoc_path = build / "variants.json"
    if not vdoc_path.exists():
        raise GateError(f"{vdoc_path} not found: run `edge-deploy quantize` first")
    records = VariantsDoc.read(vdoc_path).selected(variant_ids)
    known = catalogue_by_id()
    me = host()
    fp32_rec = next((r for r in records if r.id == "fp32" and r.built), None)
    if fp32_rec is None:
        raise GateError("the fp32 variant is missing from variants.json; it is the gate's reference")
    # fail fast: every file must still be the one `quantize` recorded (no stale or edited variant)
    for rec in records:
        if rec.built:
            checked_digest(build, rec)
    is_3d = spec.input.dims == 3
    n = n or (cfg.validation_volumes if is_3d else cfg.validation_samples)
    t_start = time.perf_counter()
    stage_s: dict[str, float] = {}
    results: dict[str, VariantVerdict] = {}
    primaries: dict[str, RunResult] = {}

    with tempfile.TemporaryDirectory(prefix="validation-", dir=build) as tmp:
        t = time.perf_counter()
        heldout = heldout_set(spec, model_dir, build, cfg, n, Path(tmp), dicom)
        n_dev = min(cfg.device_validation_volumes if is_3d else cfg.device_validation_samples, len(heldout.folders))
        ref = reference(spec, heldout, known["fp32"], build / fp32_rec.file, build, n_dev, stage_s, t)

        cache: RunCache = {}
        bar = tqdm(records, desc="gate", unit="variant", file=sys.stderr)
        t = time.perf_counter()
        for rec in bar:
            bar.set_postfix_str(rec.id)
            results[rec.id], primary = gate_variant(ref, known[rec.id], rec, me, cache, build)
            if primary is not None:
                primaries[rec.id] = primary
        stage_s["variants"] = round(time.perf_counter() - t, 1)
        results = decide(results, primaries, known, ref, build)

    doc = gate_document(spec, cfg, me, ref, dicom, results, stage_s, round(time.perf_counter() - t_start, 1))
    doc.write(build / "gate.json")
    return doc


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
    return 0 if not doc.failed else 1
