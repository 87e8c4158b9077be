"""Build a result's objects: ``build_objects(req, kinds)`` -> {kind: Dataset}, and write them.

A segmentation result's SR references its SEG, so asking for ``sr`` of a segmentation builds the
SEG too (the same UIDs every time: ``request.object_uids``). The label map comes from the worker's
``.npz`` (``agent.core.labelmap``). Every failure to build is an ``ObjectRefusedError`` naming the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from agent.core.labelmap import read_label_map
from agent.core.util import atomic_path
from agent.export.request import ExportRequest
from agent.export.seg import build_seg
from agent.export.sources import ObjectRefusedError, read_sources
from agent.export.sr import build_sr


def load_label_map(path: str) -> npt.NDArray[np.uint8]:
    """The worker's label map of a result, or ObjectRefusedError saying why not."""
    if not path:
        raise ObjectRefusedError("no label map was kept for this result (export configured after it ran?)")
    try:
        return read_label_map(path)
    except FileNotFoundError as exc:
        raise ObjectRefusedError("the result's label map is gone from the state folder") from exc
    except (OSError, ValueError) as exc:
        raise ObjectRefusedError(f"the result's label map is unreadable: {exc}") from exc


def build_objects(req: ExportRequest, kinds: Iterable[str]) -> dict[str, Dataset]:
    """The objects ``kinds`` (seg, sr) of ``req``, built from its sources (see the module docstring)."""
    wanted = set(kinds)
    segmentation = req.task == "segmentation"
    if "seg" in wanted and not segmentation:
        raise ObjectRefusedError(f"a {req.task} result has no segmentation")
    sources = read_sources(req.sources, geometry=segmentation)
    out: dict[str, Dataset] = {}
    seg = build_seg(req, sources, load_label_map(req.label_map)) if segmentation else None
    if seg is not None and "seg" in wanted:
        out["seg"] = seg
    if "sr" in wanted:
        out["sr"] = build_sr(req, sources, seg)
    return out


def write_object(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (temp + fsync + rename), for the sends and their retries."""
    with atomic_path(path, mode=0o600) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path
