"""Shared helpers for the reference models' ``train.py`` scripts.

What is here and why:

* :func:`configure_torch`: seeds, deterministic kernels, a fixed thread count (2 on the build
  machines, which other jobs share), so a training run is repeatable.
* :class:`Budget`: a wall-clock cap on a training loop. Training runs a fixed number of steps (so a
  run is reproducible); the budget only stops a run early on a machine much slower than planned,
  and says so.
* :func:`export_onnx` / :func:`check_onnx`: one export path for every model (single file, dynamic
  batch axis ``input`` -> ``logits``, opset >= 17) and the torch-vs-ONNX Runtime check.
* :func:`labels_to_model_space`: the training *labels* for 3D models, resampled with the geometry
  the agent's own ``prepare`` computed for the image (nearest neighbour), so image and labels line
  up voxel for voxel. The image itself always comes from ``agent.imaging.preprocess.prepare``:
  training never has its own copy of the preprocessing.
* :func:`random_patch`: foreground-biased patch sampling for patch-based 3D training.
* :func:`ct_case` / :func:`mr_case` / :func:`generate_cases`: training samples made by the synth
  phantoms and the agent's ``build_volume`` + ``prepare``, in parallel worker processes.
* :func:`add_common_args` / :func:`output_dir` / :func:`finish`: the CLI flags and the ending
  (export, check, held-out evaluation, one JSON line) shared by both ``train.py`` scripts.

torch is imported lazily where possible so ``deploy.evaluate`` (which imports none of this) and
the tests that only check ONNX files stay light.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.core.modelspec import InputSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from agent.imaging.preprocess import Geometry

logger = logging.getLogger(__name__)

#: ONNX opset written by :func:`export_onnx`. torch 2.13's exporter (torch.export based) implements
#: opset 18 natively; asking it for 17 triggers a down-conversion that fails on Pad. Every runtime
#: the agent supports (ORT >= 1.17, OpenVINO >= 2024.0, TensorRT >= 10) reads opset 18.
ONNX_OPSET = 18
#: largest FP32 ONNX file the project accepts for a reference model
MAX_ONNX_BYTES = 25 * 1024 * 1024


def log(msg: str) -> None:
    """Progress line on stderr (stdout is reserved for results)."""
    print(msg, file=sys.stderr, flush=True)


def configure_torch(seed: int, threads: int = 2) -> None:
    """Seed python, numpy and torch; deterministic algorithms; ``threads`` intra-op threads.

    Deterministic mode makes torch raise on the few kernels that have no deterministic
    implementation instead of silently varying between runs (none of the CPU kernels our models
    use is affected).
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    # inter-op threads can only be set once per process; a second call (tests) raises RuntimeError
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


@dataclass
class Budget:
    """Wall-clock budget of a training run (``seconds`` <= 0: unlimited)."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def exhausted(self) -> bool:
        return self.seconds > 0 and self.elapsed >= self.seconds


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """``--precision``: compute precision of the training loop (weights stay FP32)."""
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto",
        help="training compute precision: bf16 autocast (about 2x faster on CPUs with native bf16, "
        "e.g. AVX512_BF16/AMX) or fp32; auto picks bf16 where the CPU has it (default auto). "
        "Weights, optimizer state and the exported ONNX are FP32 either way.",
    )


def autocast_dtype(choice: str) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` (None: plain FP32).

    bf16 autocast runs convolutions in bfloat16 through oneDNN; on a CPU without native bf16 it
    is emulated and slower, so ``auto`` only uses it where oneDNN reports native support.
    """
    import torch

    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        native = False
    return torch.bfloat16 if native else None


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, floor: float = 0.02) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up then cosine decay to ``floor * base``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    # np.cos (not math.cos) keeps the schedule bit-identical; float() only drops the numpy scalar type.
    return float(base * (floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * t))))


# --- ONNX -------------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``model`` (eval mode) to a single-file ONNX at ``path``.

    Input ``input`` and output ``logits``, both with a dynamic batch axis ``batch``; the spatial
    axes are fixed at ``example``'s shape (the agent always feeds the spec's patch or target size).
    Uses torch's torch.export-based exporter: its graph is plain Conv/Relu/MaxPool/Resize/Concat
    with BatchNorm folded into the convolutions, which is what the INT8 quantizers want (the
    legacy TorchScript exporter is deprecated and adds Shape/Slice/Reshape subgraphs). Weights are
    embedded (``external_data=False``): one file to sign, ship and hash.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter prints progress on stdout and warns about torchvision ops it does not need;
    # keep stdout for results and the log readable.
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    stray = [p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    if stray:
        raise RuntimeError(f"ONNX export wrote external data next to the model: {stray}")
    return path


def onnx_facts(path: Path) -> dict[str, Any]:
    """Opset, input/output names and shapes, operator types and size of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)

    def dims(value_info: Any) -> list[int | str]:
        return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]

    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "opset": int(opset),
        "inputs": {i.name: dims(i) for i in model.graph.input},
        "outputs": {o.name: dims(o) for o in model.graph.output},
        "ops": sorted({n.op_type for n in model.graph.node}),
        "bytes": Path(path).stat().st_size,
        "external_data": any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
        ),
    }


def check_onnx(path: Path, model: torch.nn.Module, inputs: Sequence[np.ndarray]) -> float:
    """Largest absolute difference between torch (eval) and ONNX Runtime outputs on ``inputs``.

    Each element of ``inputs`` is one batch ``(N, C, *spatial)``; use at least two batch sizes to
    prove the batch axis is really dynamic. Also checks the file itself (opset, names, dynamic
    batch, size, no external data) and raises RuntimeError on any problem.
    """
    import onnxruntime as ort
    import torch

    facts = onnx_facts(path)
    problems = []
    if facts["opset"] < 17:
        problems.append(f"opset {facts['opset']} < 17")
    if list(facts["inputs"]) != ["input"] or list(facts["outputs"]) != ["logits"]:
        problems.append(f"names {list(facts['inputs'])} -> {list(facts['outputs'])}")
    if not isinstance(facts["inputs"].get("input", [0])[0], str):
        problems.append("batch axis of 'input' is not dynamic")
    if facts["bytes"] > MAX_ONNX_BYTES:
        problems.append(f"{facts['bytes']} bytes > {MAX_ONNX_BYTES}")
    if facts["external_data"]:
        problems.append("weights stored as external data")
    if problems:
        raise RuntimeError(f"{path}: " + "; ".join(problems))

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    worst = 0.0
    model = model.eval()
    with torch.no_grad():
        for batch in inputs:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            ref = model(torch.from_numpy(batch)).numpy()
            got = session.run(None, {"input": batch})[0]
            if got.shape != ref.shape:
                raise RuntimeError(f"{path}: ONNX output {got.shape} != torch {ref.shape}")
            worst = max(worst, float(np.max(np.abs(got - ref))))
    return worst


# --- 3D training data -------------------------------------------------------------------------


def labels_to_model_space(labels: np.ndarray, geometry: Geometry, n_labels: int) -> np.ndarray:
    """Resample a source-grid label map (z, y, x) into the model grid of ``geometry``.

    ``geometry`` is what ``agent.imaging.preprocess.prepare`` returned for the image of the same
    series, so the labels get exactly the image's reorientation (same permutation and flips) and
    output shape. Each model voxel takes the label of the source voxel under its centre (nearest
    neighbour with voxel edges aligned, as ``prepare`` aligns the image): the image value the
    network sees at a voxel is interpolated at that same centre, so image and target agree.

    Why not a majority vote over the source voxels each model voxel covers: with a zoom near 2
    (a 256 matrix at ~1.6 mm to 3 mm) half the groups hold two source voxels, boundary groups tie,
    and a tie going to background shrank every organ by 1-4 % after ``restore_label_map``, a bias
    the network learned; centre sampling restores organ volumes within about +-2 %, with the same
    Dice (measured on held-out phantoms, MODEL_CARD.md).

    Returns uint8 (Z, Y, X) of ``geometry.resampled_shape``; raises ValueError for a shape
    mismatch or a value >= ``n_labels``.
    """
    if geometry.dims != 3:
        raise ValueError("labels_to_model_space is for 3D models")
    if tuple(labels.shape) != tuple(geometry.source_shape):
        raise ValueError(f"labels {labels.shape} do not match the source volume {geometry.source_shape}")
    if labels.size and int(labels.max()) >= n_labels:
        raise ValueError(f"label value {int(labels.max())} >= {n_labels} labels")
    canonical = np.transpose(labels, geometry.permutation)
    axes = tuple(k for k, f in enumerate(geometry.flips) if f)
    if axes:
        canonical = np.flip(canonical, axes)
    # centre of model voxel i is at (i + 0.5) * n / o source voxels: index floor((2i + 1) n / 2o)
    index = [
        np.minimum(((2 * np.arange(o, dtype=np.int64) + 1) * n) // (2 * o), n - 1)
        for n, o in zip(canonical.shape, geometry.resampled_shape, strict=True)
    ]
    return np.ascontiguousarray(canonical[np.ix_(*index)], dtype=np.uint8)


def random_patch(
    image: np.ndarray,
    labels: np.ndarray,
    patch: Sequence[int],
    rng: np.random.Generator,
    foreground_prob: float = 0.67,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``patch``-sized crop of ``image`` (C, Z, Y, X) and ``labels`` (Z, Y, X).

    With probability ``foreground_prob`` the crop is centred (with jitter of a quarter patch) on a
    random foreground voxel of a random present label, so small organs (kidneys) are seen as often
    as the liver; otherwise anywhere. Volumes smaller than the patch are padded: image with its
    minimum (the window's low end: air), labels with 0.
    """
    spatial = image.shape[1:]
    pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, spatial, strict=True)]
    if any(p[1] for p in pad):
        image = np.pad(image, pad, mode="constant", constant_values=float(image.min()))
        labels = np.pad(labels, pad[1:], mode="constant", constant_values=0)
        spatial = image.shape[1:]
    present = [v for v in np.unique(labels) if v != 0]
    if present and rng.random() < foreground_prob:
        value = present[int(rng.integers(len(present)))]
        coords = np.argwhere(labels == value)
        center = coords[int(rng.integers(len(coords)))]
        jitter = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in patch]
        start = [int(c) + j - p // 2 for c, j, p in zip(center, jitter, patch, strict=True)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(spatial, patch, strict=True)]
    start = [min(max(0, st), s - p) for st, s, p in zip(start, spatial, patch, strict=True)]
    sl = tuple(slice(st, st + p) for st, p in zip(start, patch, strict=True))
    return image[(slice(None), *sl)], labels[sl]


def iterate_batches(n: int, batch_size: int, rng: np.random.Generator) -> Sequence[np.ndarray]:
    """Index batches of one shuffled epoch over ``n`` samples (last partial batch dropped)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


# --- synthetic training cases (through the agent's own volume builder and preprocessing) -------


def ct_case(seed: int, spec: InputSpec, n_labels: int, knobs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One CT training volume: phantom ``seed`` -> ``build_volume`` -> ``prepare`` (+ labels).

    Returns the model-space image (C, Z, Y, X) float32 exactly as the agent prepares it and the
    labels resampled onto the same grid (uint8 (Z, Y, X), :func:`labels_to_model_space`).
    """
    from agent.imaging.preprocess import prepare
    from agent.imaging.volume import build_volume
    from deploy.synth import make_ct_phantom

    phantom = make_ct_phantom(seed, **knobs)
    prepared = prepare(build_volume(phantom.datasets), spec)
    labels = labels_to_model_space(phantom.labels, prepared.geometry, n_labels)
    return prepared.array, labels


def mr_case(seed: int, spec: InputSpec, cls: str, difficulty: str, knobs: dict[str, Any]) -> tuple[np.ndarray, int]:
    """One MR training slice: phantom ``seed`` -> ``build_volume`` -> ``prepare``.

    Returns the model-space image (C, H, W) float32 and the class index.
    """
    from agent.imaging.preprocess import prepare
    from agent.imaging.volume import build_volume
    from deploy.synth import make_mr_slice

    phantom = make_mr_slice(seed, cls=cls, difficulty=difficulty, **knobs)
    prepared = prepare(build_volume([phantom.dataset]), spec)
    return prepared.array, phantom.class_index


def _call(job: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, args = job
    return fn(*args)


def generate_cases(
    fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], workers: int, label: str = "cases"
) -> list[Any]:
    """``[fn(*args) for args in jobs]``, in order, on ``workers`` spawned processes.

    Each case depends only on its own arguments (seed included), so the result is identical
    whatever ``workers`` is. Spawned, not forked: the parent already runs torch's thread pools.
    """
    start = time.monotonic()
    out: list[Any] = []
    step = max(1, len(jobs) // 10)
    if workers <= 1:
        for i, args in enumerate(jobs):
            out.append(fn(*args))
            if (i + 1) % step == 0:
                log(f"  {label}: {i + 1}/{len(jobs)} ({time.monotonic() - start:.0f} s)")
        return out
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        chunk = max(1, min(32, len(jobs) // (workers * 8)))
        for i, result in enumerate(pool.map(_call, [(fn, a) for a in jobs], chunksize=chunk)):
            out.append(result)
            if (i + 1) % step == 0:
                log(f"  {label}: {i + 1}/{len(jobs)} ({time.monotonic() - start:.0f} s)")
    return out


# --- the end of every train.py: export, check, evaluate ------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, budget_s: float) -> None:
    """Flags every reference model's ``train.py`` takes."""
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for model.onnx (default: the model folder; --smoke: a new temp dir)")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    parser.add_argument("--budget-s", type=float, default=budget_s,
                        help=f"wall-clock cap on the training loop in seconds, 0 = none (default {budget_s:g}); "
                        "a run that hits it stops early and says so")
    parser.add_argument("--seed", type=int, default=0, help="seed of weight init and sampling (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating training data (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--eval-n", type=int, default=None, help="held-out series evaluated at the end (0: skip)")
    parser.add_argument("--eval-seed", type=int, default=424242, help="held-out set seed (default 424242)")
    parser.add_argument("--smoke", action="store_true",
                        help="CI smoke test: tiny data and a few steps into a temp dir (< 60 s)")


def output_dir(args: argparse.Namespace, model_dir: Path) -> Path:
    """Where model.onnx goes: ``--out``, a fresh temp dir for ``--smoke``, else the model folder.

    A folder other than the model folder also gets a copy of ``model.toml``, so it can be
    evaluated (``edge-deploy evaluate <out>``) like the model folder itself.
    """
    if args.out is not None:
        out = Path(args.out)
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix=f"{model_dir.name}-smoke-"))
    else:
        out = model_dir
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != model_dir.resolve():
        shutil.copy2(model_dir / "model.toml", out / "model.toml")
    return out


def finish(
    model: torch.nn.Module,
    example_shape: Sequence[int],
    out_dir: Path,
    *,
    eval_n: int,
    eval_seed: int,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Export ``model`` to ``out_dir/model.onnx``, check it against torch, evaluate it, report.

    ``example_shape`` is one sample's input shape (C, *spatial). The check runs batches of 1 and
    3 random inputs (dynamic batch) and fails above 1e-3 max abs difference. The evaluation is
    ``deploy.evaluate.evaluate_model`` on ``eval_n`` fresh series of set ``eval_seed`` (skipped
    for 0). Prints ``summary`` plus ONNX facts and metrics as one JSON line on stdout; returns it.
    """
    from deploy.evaluate import evaluate_model

    path = out_dir / "model.onnx"
    t0 = time.monotonic()
    export_onnx(model, _example(example_shape, 2), path)
    rng = np.random.default_rng(1234)
    diff = check_onnx(path, model, [rng.random((b, *example_shape), dtype=np.float32) for b in (1, 2)])
    facts = onnx_facts(path)
    log(f"exported {path} ({facts['bytes'] / 1e6:.2f} MB, opset {facts['opset']}) in "
        f"{time.monotonic() - t0:.1f} s; max |torch - onnxruntime| = {diff:.2e}")
    if diff > 1e-3:
        raise RuntimeError(f"ONNX output differs from torch by {diff}")
    report = {**summary, "onnx": str(path), "onnx_bytes": facts["bytes"], "opset": facts["opset"],
              "onnx_max_abs_diff": diff}
    if eval_n > 0:
        log(f"held-out evaluation: {eval_n} fresh series, seed {eval_seed}")
        report["heldout"] = evaluate_model(out_dir, eval_n, eval_seed)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return report


def _example(shape: Sequence[int], batch: int) -> torch.Tensor:
    import torch

    return torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0))
