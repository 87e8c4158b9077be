"""A segmentation's label map on disk: written by the inference worker, read by the export stage.

The worker writes it (``save_label_map``: compressed ``.npz``, temp + fsync + rename) before it
answers the job, only when the job asks for it (``InferenceJob.label_map_path``: export of a
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
    with atomic_path(path, mode=0o600) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, label_map=np.ascontiguousarray(label_map, dtype=np.uint8))  # LABEL_MAP_KEY
            f.flush()
            os.fsync(f.fileno())


def read_label_map(path: Path | str) -> npt.NDArray[np.uint8]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arr = np.asarray(npz[LABEL_MAP_KEY])
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a label map file: {type(exc).__name__}") from exc
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"the label map is {arr.dtype} {arr.shape}, not uint8 (z, y, x)")
    return arr
