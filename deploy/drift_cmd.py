"""``edge-deploy drift-profile``: a model's drift reference profile from synthetic phantoms.

``edge-deploy drift-profile MODEL_DIR [--n N] [--seed S] [--out PATH] [--threads T]`` generates
``N`` phantoms with :mod:`deploy.synth` (series ``i`` is phantom ``derive_seed(S, i)``, as
``edge-deploy synth`` would write it: MR classes round-robin with difficulty advancing every 4
slices, CT noise cycling over ``deploy.calibrate.CT_NOISE_LEVELS``; a series seed reserved for
training is refused), decodes each through the agent's own ``build_volume``, runs the model's FP32
ONNX on it through the agent's own pipeline (``agent.inference.pipeline.run_model_detailed`` on
ONNX Runtime, with ``drift_edges``: the very code the inference worker summarises live series
with) and writes the profile (``agent.core.manifest.DriftProfile`` JSON, per-series summaries in
``series``) to ``PATH``, by default ``drift.json`` beside the model's ONNX file, where the agent
looks for a models.dir model's reference (``agent.variants.installed``). The edges come from the
first series (``agent.imaging.summary.reference_edges``).

Defaults: seed :data:`DEFAULT_SEED` (disjoint from calibration 200001 and validation 300001);
``N`` = 36 CT volumes (about 4 minutes on 2 cores: ~3 s of sliding window each, plus phantom
generation) or 192 MR slices (a multiple of 12: balanced over class x difficulty; under a minute).
A registry build gets its profile from ``edge-deploy calibrate`` instead (``deploy.drift_profile``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from agent.core.errors import EdgeAgentError
from agent.core.manifest import DriftProfile
from agent.core.modelspec import ModelSpec, load_spec
from agent.core.types import ModelRef, Volume
from agent.core.util import atomic_write
from deploy.drift_profile import DriftAccumulator

__all__ = ["DEFAULT_SEED", "add_parser", "drift_profile", "phantom_volumes", "profile_json"]

#: the set seed of the reference phantoms (>= 100000 by convention: never a training seed)
DEFAULT_SEED = 400001
#: default series count per model dimensionality (3D volumes, 2D slices)
DEFAULT_N = {3: 36, 2: 192}


_NUMBER_LIST = re.compile(r"\[\s*((?:-?[0-9][0-9.eE+-]*,?\s*)+)\]")


class DriftProfileError(EdgeAgentError):
    """The profile cannot be built (no generator for the modality, a training seed, a failed run)."""


def phantom_volumes(spec: ModelSpec, seed: int, n: int) -> Any:
    """Yield ``n`` decoded phantom ``Volume``s for ``spec``'s modality (see the module docstring)."""
    from agent.imaging import build_volume
    from deploy.calibrate import CT_NOISE_LEVELS
    from deploy.evaluate import TRAINING_SEEDS
    from deploy.synth import derive_seed, make_ct_phantom, make_mr_slice, mr_assignment

    modality = spec.input.modality.upper()
    if modality not in ("MR", "CT"):
        raise DriftProfileError(f"no synthetic generator for modality {spec.input.modality!r}")
    for i in range(n):
        s = derive_seed(seed, i)
        if s in TRAINING_SEEDS:  # 63-bit hashes: astronomically unlikely, cheap to rule out
            raise DriftProfileError(f"set seed {seed}: series {i} would reuse a training phantom seed")
        if modality == "MR":
            cls, difficulty = mr_assignment(i)
            yield build_volume([make_mr_slice(s, cls=cls, difficulty=difficulty, index=i).dataset])
        else:
            ct = make_ct_phantom(s, noise=CT_NOISE_LEVELS[i % len(CT_NOISE_LEVELS)], index=i)
            yield build_volume(ct.datasets)
            del ct  # a 512x512 phantom holds ~0.5 GB of datasets: free it before the next


def drift_profile(model_dir: Path, n: int, seed: int, threads: int = 2, progress: bool = True) -> dict[str, Any]:
    """The profile of ``n`` phantoms of set ``seed`` through ``model_dir``'s FP32 model, as a dict
    valid as ``DriftProfile`` (see the module docstring)."""
    from agent.imaging import prepare
    from agent.inference import catalog
    from agent.inference.pipeline import run_model_detailed
    from deploy.gate_runtime import warmup_shape

    if n < 1:
        raise DriftProfileError("--n must be at least 1")
    spec = load_spec(model_dir)
    onnx = Path(model_dir) / spec.onnx
    if not onnx.is_file():
        raise DriftProfileError(f"{onnx}: FP32 model not found")
    backend = catalog.create("onnxruntime")
    warm = warmup_shape(spec)
    backend.load(onnx, precision="fp32", threads=threads, options={"warmup_shape": warm} if warm else {})
    ref = ModelRef(spec.name, spec.version)
    acc = DriftAccumulator(spec.input.modality, spec=spec)
    t0 = time.perf_counter()
    volume: Volume
    for i, volume in enumerate(phantom_volumes(spec, seed, n)):
        if acc.edges is None:  # the first series fixes the edges (prepared once more, as the pipeline will)
            acc.edges_for(volume.array, prepare(volume, spec.input).array)
        run = run_model_detailed([], spec, backend, ref, want_label_map=False, volume=volume,
                                 drift_edges=acc.edges)
        if run.summary is None:
            raise DriftProfileError(f"series {i}: summarising failed (see the log)")
        acc.add_summary(run.summary)
        if progress:
            print(f"\rdrift-profile {spec.name}: {i + 1}/{n} series ({time.perf_counter() - t0:.0f} s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    doc = acc.profile(f"edge-deploy drift-profile: deploy.synth seed {seed}, {n} series, FP32 outputs")
    DriftProfile.model_validate(doc)  # never write a profile the agent would refuse
    return doc


def profile_json(doc: dict[str, Any]) -> str:
    """The profile as JSON text: aggregates indented, one line per series (a few hundred lines for
    hundreds of series, and a diff shows which series changed)."""
    head = {k: v for k, v in doc.items() if k != "series"}
    text = json.dumps(head, indent=2, sort_keys=True, allow_nan=False)
    # lists of numbers (edges, counts) on one line each rather than one number per line
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
    series = ",\n".join("    " + json.dumps(s, sort_keys=True, separators=(",", ":"), allow_nan=False)
                        for s in doc.get("series", []))
    return text[:-2] + ',\n  "series": [\n' + series + "\n  ]\n}\n"


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy drift-profile``."""
    p = subparsers.add_parser(
        "drift-profile",
        help="a model's drift reference profile from synthetic phantoms (drift.json beside model.onnx)",
        description="Generate synthetic phantoms, run them through the agent's own imaging code and the "
        "FP32 model, and write the drift reference profile (DriftProfile JSON with per-series summaries).",
    )
    p.add_argument("model_dir", type=Path, help="model folder with model.toml (e.g. models/mr-brain-cls)")
    p.add_argument("--n", type=int, default=None, help="series (default: 36 CT volumes / 192 MR slices)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"set seed (default {DEFAULT_SEED})")
    p.add_argument("--out", type=Path, default=None, help="output file (default: drift.json beside the ONNX file)")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="ONNX Runtime intra-op threads (default: 2)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    spec = load_spec(args.model_dir)
    n = args.n if args.n is not None else DEFAULT_N[spec.input.dims]
    out = args.out or (Path(args.model_dir) / spec.onnx).parent / "drift.json"
    t0 = time.perf_counter()
    doc = drift_profile(args.model_dir, n, args.seed, args.threads)
    atomic_write(out, profile_json(doc))
    print(f"{spec.name}: {n} series (seed {args.seed}) -> {out} ({out.stat().st_size / 1024:.0f} KiB, "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0
