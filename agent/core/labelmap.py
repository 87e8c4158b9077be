"""A segmentation's label map on disk: written by the inference worker, read by the export stage.

The worker writes it (``save_label_map``: an ``.npz`` holding only the bounding box of the labelled
voxels, deflated at level 1, temp + fsync + rename: about 10 ms for a 100 x 512 x 512 CT map
against 70 ms for ``np.savez_compressed`` of the whole map) before it answers the job, only when the job asks for it (``InferenceJob.label_map_path``: export of a
segmentation is configured), so the job thread's transaction that commits the result and its export
rows always refers to a file that is already durable. ``read_label_map`` raises OSError (gone) or
ValueError (not a uint8 (z, y, x) map).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.core.util import atomic_path

#: the array's name inside the .npz
LABEL_MAP_KEY = "label_map"


def save_label_map(path: Path, label_map: npt.NDArray[np.uint8]) -> None:
    lm = np.asarray(label_map, dtype=np.uint8)
    if lm.ndim != 3:
        raise ValueError(f"the label map is {lm.shape}, not (z, y, x)")
    # the job path waits for this write: keep only the box around the labels (most of a CT is
    # background) and deflate fast
    lo, hi = _bounding_box(lm)
    crop = np.ascontiguousarray(lm[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    with atomic_path(path, mode=0o600) as tmp:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                for name, arr in ((LABEL_MAP_KEY, crop), (_SHAPE_KEY, np.array(lm.shape, np.int64)),
                                  (_ORIGIN_KEY, np.array(lo, np.int64))):
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())


def read_label_map(path: Path | str) -> npt.NDArray[np.uint8]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            crop = np.asarray(npz[LABEL_MAP_KEY])
            shape = tuple(int(v) for v in npz[_SHAPE_KEY]) if _SHAPE_KEY in npz else crop.shape
            origin = tuple(int(v) for v in npz[_ORIGIN_KEY]) if _ORIGIN_KEY in npz else (0, 0, 0)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a label map file: {type(exc).__name__}") from exc
    if crop.ndim != 3 or crop.dtype != np.uint8 or len(shape) != 3 or len(origin) != 3:
        raise ValueError(f"the label map is {crop.dtype} {crop.shape}, not uint8 (z, y, x)")
    if any(o < 0 or o + c > s for o, c, s in zip(origin, crop.shape, shape, strict=True)):
        raise ValueError(f"the label map's box {origin} + {crop.shape} lies outside {shape}")
    full = np.zeros(shape, np.uint8)
    full[origin[0]:origin[0] + crop.shape[0], origin[1]:origin[1] + crop.shape[1],
         origin[2]:origin[2] + crop.shape[2]] = crop
    return full


#: the full map's shape and the box's first voxel, beside the box itself
_SHAPE_KEY = "shape"
_ORIGIN_KEY = "origin"


def _bounding_box(lm: npt.NDArray[np.uint8]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """[lo, hi) per axis around the non-zero voxels; an empty box at 0 when there are none."""
    lo, hi = [0, 0, 0], [0, 0, 0]
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(lm.any(axis=others))
        if idx.size == 0:
            return (0, 0, 0), (0, 0, 0)
        lo[axis], hi[axis] = int(idx[0]), int(idx[-1]) + 1
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])
