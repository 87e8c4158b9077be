"""``edge-deploy evaluate``: accuracy of a model (or one of its variants) on a fresh synthetic set.

The held-out set is generated into a temporary folder as real DICOM files with the synth writers
(``deploy.synth.generate_ct`` / ``generate_mr``) and every series is run through EXACTLY the
daemon's code path: ``agent.inference.pipeline.run_model_detailed`` (``load_series`` ->
``prepare`` -> sliding window or one batch -> ``restore_label_map`` + largest component ->
statistics), on a backend from ``agent.inference.catalog``. Nothing here re-implements
preprocessing or postprocessing.

Scores (``agent.core.accuracy``):

* segmentation: Dice per label on the SOURCE grid between the published label map (after the
  largest-component filter) and the phantom's ``labels.npy``, averaged over cases, their mean
  (``mean_dice``), the worst case per label (``min_dice``) and the worst absolute relative error
  of the published organ volume (``volume_ml``) against ``truth.json`` (``volume_error_pct``);
* classification: accuracy, per-class precision / recall / F1, the confusion matrix (rows: truth,
  columns: prediction) and accuracy per difficulty level.

CLI: ``edge-deploy evaluate models/<name> --n N --seed S [--variant FILE] [--backend NAME]
[--batch-size B] [--workers W]`` prints ONE JSON line on stdout; progress goes to stderr.
Python: :func:`evaluate_model` returns the same dict (the quantization gate calls it for each
variant, optionally on one shared set via ``data_dir`` and with ``keep_outputs`` to compare argmax
maps).

Seeds: series ``i`` of a set with seed ``S`` is phantom ``derive_seed(S, i)``, a 63-bit hash, while
training uses the raw phantom seeds ``deploy.training.TRAINING_SEEDS``; the evaluator refuses a set
that would overlap them. By convention evaluation set seeds are >= 100000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.accuracy import ScoredCase, SegmentationScorer, classification_metrics
from agent.core.errors import EdgeAgentError, ModelSpecError
from agent.core.modelspec import ModelSpec, load_spec

__all__ = ["TRAINING_SEEDS", "add_parser", "evaluate_model", "generate_heldout", "main"]

#: raw phantom seeds reserved for training (train.py draws from these); evaluation sets must not
#: contain any of them
TRAINING_SEEDS = range(0, 100_000)

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(_msg: str) -> None:
    return None


# --- held-out data --------------------------------------------------------------------------------


def generate_heldout(task: str, out: Path, n: int, seed: int, **knobs: Any) -> list[Path]:
    """Write a fresh held-out set for ``task`` into ``out``; return the series folders in order.

    Segmentation: ``n`` CT series (``generate_ct``); classification: ``n`` MR slices
    (``generate_mr`` with mixed difficulty: classes round-robin, so any 4 consecutive series hold one
    of each class and any 12 each (class, difficulty) pair once). ``knobs`` go to the generator
    (``noise``, ``hu_offset``, ``manufacturer``, ...). Raises ValueError when a series seed falls in
    :data:`TRAINING_SEEDS`.
    """
    from deploy.synth import derive_seed, generate_ct, generate_mr

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    overlap = [i for i in range(n) if derive_seed(seed, i) in TRAINING_SEEDS]
    if overlap:  # astronomically unlikely (63-bit hashes), but cheap to rule out
        raise ValueError(f"set seed {seed}: series {overlap} would reuse training phantom seeds")
    if task == "segmentation":
        return generate_ct(out, n, seed, **knobs)
    if task == "classification":
        return generate_mr(out, n, seed, difficulty=knobs.pop("difficulty", "mixed"), **knobs)
    raise ModelSpecError(f"unknown task {task!r}")


def _series_folders(data_dir: Path, task: str) -> list[Path]:
    """Series folders of an existing set, in name order: every subfolder holding a ``truth.json``
    (and, for segmentation, a ``labels.npy``), as :func:`generate_heldout` writes them."""
    needed = ("truth.json", "labels.npy") if task == "segmentation" else ("truth.json",)
    folders = sorted(
        p for p in Path(data_dir).iterdir() if p.is_dir() and all((p / f).is_file() for f in needed)
    )
    if not folders:
        raise EdgeAgentError(f"{data_dir}: no series folders with {' and '.join(needed)}")
    return folders


# --- running cases ------------------------------------------------------------------------------


def _load_backend(
    spec: ModelSpec, onnx_path: Path, backend_name: str, precision: str, threads: int
) -> Any:
    """A loaded backend from the agent's registry, warmed up on the model's input shape."""
    from agent.inference import catalog

    warm: tuple[int, ...] | None
    if spec.input.dims == 3:
        assert spec.input.patch_size is not None  # validated by ModelSpec for 3D models
        warm = (1, spec.input.channels, *spec.input.patch_size)
    else:
        size = spec.input.target_size
        warm = (1, spec.input.channels, *size) if size is not None else None
    backend = catalog.create(backend_name)
    options: dict[str, Any] = {"warmup_shape": warm} if warm is not None else {}
    backend.load(onnx_path, precision=precision, threads=threads, options=options)
    return backend


def _run_cases(
    model_dir: str,
    onnx_path: str,
    backend_name: str,
    precision: str,
    threads: int,
    batch_size: int,
    folders: Sequence[str],
    keep_outputs: bool,
    verbose: bool,
) -> list[dict[str, Any]]:
    """Run series folders through the agent's pipeline; one record per case, in order.

    Module-level (picklable) so ``--workers`` can run it in spawned processes; each worker loads
    its own backend.
    """
    from agent.core.types import ClassificationOutput, ModelRef, SegmentationOutput
    from agent.inference.pipeline import run_model_detailed

    say = _stderr if verbose else _quiet
    spec = load_spec(model_dir)
    backend = _load_backend(spec, Path(onnx_path), backend_name, precision, threads)
    info = backend.describe()
    ref = ModelRef(
        name=spec.name,
        version=spec.version,
        variant=Path(onnx_path).stem,
        backend=info.name,
        precision=info.precision,
    )
    records: list[dict[str, Any]] = []
    for folder_s in folders:
        folder = Path(folder_s)
        truth = json.loads((folder / "truth.json").read_text())
        paths = sorted(folder.glob("*.dcm"))
        t0 = time.perf_counter()
        run = run_model_detailed(paths, spec, backend, ref, sw_batch_size=batch_size)
        record: dict[str, Any] = {
            "case": folder.name,
            "timings_ms": dict(run.prediction.timings_ms),
        }
        if spec.task == "segmentation":
            assert run.label_map is not None  # segmentation runs always return the map
            outputs = run.prediction.outputs
            assert isinstance(outputs, SegmentationOutput)
            truth_map = np.load(folder / "labels.npy")
            scorer = SegmentationScorer(spec.labels)
            case = scorer.add(run.label_map, truth_map, folder.name)
            # volume error of what is PUBLISHED (volume_ml from the agent's statistics) against
            # the phantom's analytic truth
            volume_error = {}
            for name in spec.foreground_labels:
                true_ml = float(truth["labels"][name]["volume_ml"])
                got_ml = float(outputs.labels[name].volume_ml)
                volume_error[name] = 100.0 * (got_ml - true_ml) / true_ml if true_ml else float("inf")
            record["dice"] = dict(case.dice)
            record["volume_error_pct"] = volume_error
            if keep_outputs:
                record["label_map"] = run.label_map
            say(
                f"  {folder.name}: mean Dice {np.mean(list(case.dice.values())):.4f} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
        else:
            prediction = run.prediction.outputs
            assert isinstance(prediction, ClassificationOutput)  # every non-segmentation task classifies
            record["pred"] = spec.labels.index(prediction.label)
            record["truth"] = int(truth["class_index"])
            record["difficulty"] = str(truth.get("difficulty", ""))
            if keep_outputs:
                record["logits"] = np.asarray(run.logits, dtype=np.float32)
        records.append(record)
    return records


# --- public API ---------------------------------------------------------------------------------


def evaluate_model(
    model_dir: str | Path,
    n: int,
    seed: int,
    variant_path: str | Path | None = None,
    backend: str = "onnxruntime",
    *,
    precision: str = "fp32",
    batch_size: int = 1,
    workers: int = 1,
    threads: int = 2,
    data_dir: str | Path | None = None,
    keep_outputs: bool = False,
    progress: bool = True,
    **knobs: Any,
) -> dict[str, Any]:
    """Evaluate ``model_dir``'s model (or ``variant_path``, an ONNX file) on a fresh held-out set.

    Takes the model folder (``model.toml``), the set size ``n`` and set ``seed``; optionally an
    ONNX variant to run instead of the spec's FP32 file, the registry ``backend`` name and the
    ``precision`` it is reported with, the sliding-window ``batch_size``, ``workers`` processes
    (each with ``threads // workers`` intra-op threads, at least 1), ``data_dir`` (an existing set
    from :func:`generate_heldout`; its first ``n`` series are used, so several variants can be
    compared on identical inputs) and generator ``knobs``. With ``keep_outputs`` the result also
    holds ``"outputs"``: per case the source-grid label map (segmentation) or the logits
    (classification), in set order (not JSON-serialisable; for the quantization gate).

    Returns the metrics dict that the CLI prints (see the module docstring). Raises
    ModelSpecError / EdgeAgentError subclasses from the agent, ValueError for bad arguments.
    """
    say = _stderr if progress else _quiet
    model_dir = Path(model_dir)
    spec = load_spec(model_dir)
    onnx_path = Path(variant_path) if variant_path is not None else model_dir / spec.onnx
    if not onnx_path.is_file():
        raise EdgeAgentError(f"{onnx_path}: model file not found (train it: python {model_dir}/train.py)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    workers = max(1, int(workers))
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix=f"edge-eval-{spec.name}-") as tmp:
        if data_dir is None:
            say(f"evaluate {spec.name}: generating {n} held-out series (seed {seed}) in {tmp}")
            folders = generate_heldout(spec.task, Path(tmp), n, seed, **knobs)
        else:
            folders = _series_folders(Path(data_dir), spec.task)[:n]
            if len(folders) < n:
                raise EdgeAgentError(f"{data_dir}: holds {len(folders)} series, {n} requested")
        say(f"evaluate {spec.name}: {onnx_path.name} on {backend} ({precision}), {len(folders)} series")
        names = [str(f) for f in folders]
        common = (str(model_dir), str(onnx_path), backend, precision)
        if workers == 1:
            records = _run_cases(*common, threads, batch_size, names, keep_outputs, progress)
        else:
            per_worker = max(1, threads // workers)
            chunks = [names[i::workers] for i in range(workers)]
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = [
                    pool.submit(_run_cases, *common, per_worker, batch_size, chunk, keep_outputs, progress)
                    for chunk in chunks
                    if chunk
                ]
                parts = [f.result() for f in futures]
            # undo the round-robin split so records (and outputs) are in set order
            by_case = {r["case"]: r for part in parts for r in part}
            records = [by_case[Path(name).name] for name in names]

    result: dict[str, Any] = {
        "model": spec.name,
        "version": spec.version,
        "variant": onnx_path.name,
        "backend": backend,
        "precision": precision,
        "n": len(records),
        "seed": seed if data_dir is None else None,
    }
    if knobs:
        result["knobs"] = knobs
    if spec.task == "segmentation":
        scorer = SegmentationScorer(spec.labels)
        scorer.cases.extend(ScoredCase(r["case"], r["dice"], r["volume_error_pct"]) for r in records)
        result.update(scorer.summary())
    else:
        y_true = [r["truth"] for r in records]
        y_pred = [r["pred"] for r in records]
        result.update(classification_metrics(y_true, y_pred, spec.labels))
        per_difficulty: dict[str, float] = {}
        for level in sorted({r["difficulty"] for r in records}):
            sel = [r for r in records if r["difficulty"] == level]
            per_difficulty[level] = float(np.mean([r["truth"] == r["pred"] for r in sel]))
        result["accuracy_by_difficulty"] = per_difficulty
        result["labels"] = list(spec.labels)
    stages = sorted({k for r in records for k in r["timings_ms"]})
    result["timings_ms"] = {
        k: round(float(np.mean([r["timings_ms"].get(k, 0.0) for r in records])), 1) for k in stages
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if keep_outputs:
        key = "label_map" if spec.task == "segmentation" else "logits"
        result["outputs"] = [r[key] for r in records]
    say(f"evaluate {spec.name}: done in {result['wall_s']} s")
    return result


# --- CLI ----------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``edge-deploy evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="accuracy of a model on a fresh synthetic held-out set (one JSON line on stdout)",
        description="Generate a fresh synthetic held-out set as DICOM files, run it through the "
        "agent's own pipeline (load_series, prepare, inference, postprocess) and print the "
        "metrics as one JSON line. Segmentation: Dice per label on the source grid, mean Dice, "
        "worst organ volume error. Classification: accuracy, per-class precision/recall/F1, "
        "confusion matrix.",
    )
    p.add_argument("model_dir", type=Path, help="model folder holding model.toml (e.g. models/ct-abdomen-seg)")
    p.add_argument("--n", type=int, required=True, help="number of held-out series")
    p.add_argument("--seed", type=int, required=True, help="set seed (by convention >= 100000)")
    p.add_argument("--variant", type=Path, default=None, help="ONNX file to evaluate instead of the spec's FP32 model")
    p.add_argument("--backend", default="onnxruntime", help="inference backend (agent registry name)")
    p.add_argument("--precision", default="fp32", help="precision the variant is reported with")
    p.add_argument("--batch-size", type=int, default=1, help="patches per backend call (3D sliding window)")
    p.add_argument("--workers", type=int, default=1, help="evaluation processes (threads are split between them)")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="intra-op threads in total (default: 2)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="evaluate an existing set (from a previous generation) instead of generating one")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` subcommand; print one JSON line; return 0."""
    result = evaluate_model(
        args.model_dir,
        args.n,
        args.seed,
        args.variant,
        args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        data_dir=args.data_dir,
        progress=not args.quiet,
    )
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0
