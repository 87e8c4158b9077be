"""Synthetic DICOM phantoms (no patient data ever): abdominal CT series and brain MR slices.

Python API (stable; the model-training code builds on it):

* :func:`deploy.synth.ct.make_ct_phantom` / :func:`deploy.synth.ct.write_ct_series`
* :func:`deploy.synth.mr.make_mr_slice` / :func:`deploy.synth.mr.write_mr_series`
* :func:`generate_ct` / :func:`generate_mr`: write a whole set plus ``manifest.json``
* :data:`CT_LABELS`, :data:`MR_CLASSES`, :data:`MR_DIFFICULTIES`, :func:`derive_seed`

Series ``i`` of a set generated with ``seed`` is ``make_*(derive_seed(seed, i), index=i, ...)``,
so any one series can be rebuilt on its own and sets with different seeds are disjoint.
CLI: ``edge-deploy synth ct|mr`` (:mod:`deploy.synth.cli`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import CT_LABELS, MR_CLASSES, MR_DIFFICULTIES, check_seed, derive_seed
from .ct import CTPhantom, make_ct_phantom, write_ct_series
from .dicomio import write_json
from .mr import MRPhantom, make_mr_slice, write_mr_series

__all__ = [
    "CT_LABELS",
    "MR_CLASSES",
    "MR_DIFFICULTIES",
    "CTPhantom",
    "MRPhantom",
    "derive_seed",
    "generate_ct",
    "generate_mr",
    "make_ct_phantom",
    "make_mr_slice",
    "mr_assignment",
    "write_ct_series",
    "write_mr_series",
]

#: Called after each series is written with (folder, number of instances).
Progress = Callable[[Path, int], None]


def _with_set_params(truth: dict[str, Any], seed: int, index: int) -> dict[str, Any]:
    """Copy of ``truth`` whose ``params`` also name the set seed and series index."""
    params = {**truth.get("params", {}), "set_seed": seed, "index": index}
    return {**truth, "params": params}


def generate_ct(
    out: str | Path, n: int, seed: int, *, progress: Progress | None = None, **knobs: Any
) -> list[Path]:
    """Write ``n`` CT series to ``out/ct-0000`` ... plus ``out/manifest.json``.

    Takes the output folder (created), the number of series, the set seed and any keyword of
    :func:`make_ct_phantom` (``size``, ``slices``, ``hu_offset``, ``noise``, ``slice_thickness``,
    ``manufacturer``, ``patient_position``) applied to every series; ``progress`` is called after
    each series. Returns the series folders in order.
    """
    seed = check_seed(seed)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    folders: list[Path] = []
    entries: list[dict[str, Any]] = []
    for i in range(n):
        phantom = make_ct_phantom(derive_seed(seed, i), index=i, **knobs)
        phantom = dataclasses.replace(phantom, truth=_with_set_params(phantom.truth, seed, i))
        folder = write_ct_series(phantom, root / f"ct-{i:04d}")
        folders.append(folder)
        t = phantom.truth
        entries.append(
            {
                "folder": folder.name,
                "series_uid": t["series_uid"],
                "study_uid": t["study_uid"],
                "seed": t["params"]["seed"],
                "n_instances": t["n_instances"],
                "patient_position": t["geometry"]["patient_position"],
                "spacing_zyx_mm": t["geometry"]["spacing_zyx_mm"],
                "manufacturer": t["acquisition"]["manufacturer"],
                "volume_ml": {name: v["volume_ml"] for name, v in t["labels"].items()},
            }
        )
        del phantom  # a 512 series is ~100 MB in memory: do not keep it across iterations
        if progress is not None:
            progress(folder, entries[-1]["n_instances"])
    write_json(root / "manifest.json", _manifest("CT", seed, n, knobs, entries))
    return folders


def mr_assignment(index: int, difficulty: str = "mixed") -> tuple[str, str]:
    """(class, difficulty) of series ``index`` in a generated MR set.

    Classes round-robin so any 4 consecutive series hold one of each; with ``"mixed"`` the
    difficulty advances every 4 series, so every 12 consecutive series hold each
    (class, difficulty) pair once.
    """
    cls = MR_CLASSES[index % len(MR_CLASSES)]
    if difficulty == "mixed":
        return cls, MR_DIFFICULTIES[(index // len(MR_CLASSES)) % len(MR_DIFFICULTIES)]
    if difficulty not in MR_DIFFICULTIES:
        raise ValueError(f"difficulty must be 'mixed' or one of {MR_DIFFICULTIES}, got {difficulty!r}")
    return cls, difficulty


def generate_mr(
    out: str | Path,
    n: int,
    seed: int,
    *,
    difficulty: str = "mixed",
    progress: Progress | None = None,
    **knobs: Any,
) -> list[Path]:
    """Write ``n`` single-slice MR series to ``out/mr-0000`` ... plus ``out/manifest.json``.

    Takes the output folder (created), the number of series, the set seed, ``difficulty``
    (``"mixed"`` or one of :data:`MR_DIFFICULTIES`) and any other keyword of
    :func:`make_mr_slice` (``noise``, ``manufacturer``). Classes are balanced (see
    :func:`mr_assignment`). Returns the series folders in order.
    """
    seed = check_seed(seed)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    mr_assignment(0, difficulty)  # validates difficulty before writing anything
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    folders: list[Path] = []
    entries: list[dict[str, Any]] = []
    for i in range(n):
        cls, diff = mr_assignment(i, difficulty)
        phantom = make_mr_slice(derive_seed(seed, i), cls=cls, difficulty=diff, index=i, **knobs)
        phantom = dataclasses.replace(phantom, truth=_with_set_params(phantom.truth, seed, i))
        folder = write_mr_series(phantom, root / f"mr-{i:04d}")
        folders.append(folder)
        t = phantom.truth
        entries.append(
            {
                "folder": folder.name,
                "series_uid": t["series_uid"],
                "study_uid": t["study_uid"],
                "seed": t["params"]["seed"],
                "n_instances": 1,
                "class": t["class"],
                "class_index": t["class_index"],
                "difficulty": t["difficulty"],
                "level": t["level"],
                "manufacturer": t["acquisition"]["manufacturer"],
            }
        )
        if progress is not None:
            progress(folder, 1)
    write_json(root / "manifest.json", _manifest("MR", seed, n, {"difficulty": difficulty, **knobs}, entries))
    return folders


def _manifest(
    modality: str, seed: int, n: int, knobs: dict[str, Any], entries: list[dict[str, Any]]
) -> dict[str, Any]:
    """``manifest.json`` content: what was generated, with which knobs, and each series' summary."""
    return {
        "generator": "edge-agent deploy.synth",
        "modality": modality,
        "seed": seed,
        "n": n,
        "knobs": {k: v for k, v in knobs.items() if v is not None},
        "series": entries,
    }
