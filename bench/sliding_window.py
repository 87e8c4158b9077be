"""The agent's own cost of a 3D sliding window: everything except the model.

``agent.imaging.sliding_window_inference`` over a CT-shaped volume (ct-abdomen-seg: 1 x 88 x 159 x
159 at 3 mm, 5 labels, 64 x 96 x 96 patches, overlap 0.25: 8 patches) with a model that costs
nothing (it returns a ready array), so what is timed is patch extraction, Gaussian weighting,
accumulation, the non-finite check and the final normalisation: the part of a full-volume time
that no engine can speed up. Two kinds of "model": one returning a fresh array per call (what the
backends return) and one returning the same buffer every call (a backend's reused output buffer).

``--compare FILE`` times another implementation of the module side by side (interleaved rounds,
best kept), e.g. the one before a change::

    git show b5281e7:agent/imaging/sliding_window.py > /tmp/sliding_window_old.py
    .venv/bin/python bench/sliding_window.py --compare /tmp/sliding_window_old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line  # noqa: E402

sys.path.insert(0, str(REPO))
from agent.imaging import sliding_window as current  # noqa: E402


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("sliding_window_compared", path)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds, best kept (default 7)")
    parser.add_argument("--compare", type=Path, help="another sliding_window.py to time side by side")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    volume = rng.standard_normal((1, 88, 159, 159)).astype(np.float32)
    logits = rng.standard_normal((1, 5, 64, 96, 96)).astype(np.float32)
    models = {"fresh array per call": lambda batch: logits.copy(), "reused buffer": lambda batch: logits}
    impls = {"agent": current}
    if args.compare:
        impls[f"compared ({args.compare.name})"] = _load(args.compare)
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for impl_name, impl in impls.items():
            for model_name, model in models.items():
                t = time.perf_counter()
                impl.sliding_window_inference(volume, (64, 96, 96), 0.25, model)
                ms = (time.perf_counter() - t) * 1000.0
                best[(impl_name, model_name)] = min(best.get((impl_name, model_name), float("inf")), ms)
    copies = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        logits.copy()
        copies.append((time.perf_counter() - t) * 1000.0)
    print(f"{machine_line()}; volume 1x88x159x159, 5 labels, patch 64x96x96, overlap 0.25 (8 patches); "
          f"best of {args.rounds} interleaved rounds")
    print("| implementation | model returns | ms per volume |")
    print("|---|---|---|")
    for (impl_name, model_name), ms in best.items():
        print(f"| {impl_name} | {model_name} | {ms:.1f} |")
    print(f"(one 12 MB output copy, as in 'fresh array per call': {min(copies):.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
