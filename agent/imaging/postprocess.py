"""Model outputs -> published results: label statistics, class probabilities, Dice.

Shared by the daemon (results) and the deploy toolkit (evaluation, accuracy gate), so a volume
in ml or a Dice score means the same thing in both. numpy/scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from agent.errors import BackendError, EdgeAgentError, ModelSpecError
from agent.types import ClassificationOutput, LabelStats, SegmentationOutput


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of a boolean mask.

    Takes a bool array of any dimension; connectivity is full (26 in 3D, 8 in 2D), because a
    thin organ boundary touching diagonally is still one organ. Returns a bool array of the same
    shape (all False for an empty mask). Ties go to the component found first in raster order.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count == 1:
        return mask.copy()
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0  # background
    return components == int(np.argmax(sizes))


def segmentation_outputs(
    label_map_source: np.ndarray,
    labels: Sequence[str],
    spacing: tuple[float, ...],
    keep_largest: bool = True,
) -> tuple[SegmentationOutput, np.ndarray]:
    """Per-label statistics of a label map on the source grid.

    Takes a (z, y, x) integer label map (value i = ``labels[i]``; 0 is background and skipped),
    the label names, the source voxel spacing (z, y, x) in mm and whether to keep only the
    largest connected component of each label. Returns ``(SegmentationOutput, filtered map)``:
    for every foreground label its voxel count, volume in ml (``voxels * prod(spacing) / 1000``)
    and bbox ``(z0, y0, x0, z1, y1, x1)`` end-exclusive (``()`` and 0 for an absent label), and
    the uint8 label map after filtering (removed components become background).
    Raises ModelSpecError when the map holds a value with no label name.
    """
    label_map = np.asarray(label_map_source)
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == np.bool_):
        raise BackendError(f"label map must hold integers, got {label_map.dtype}")
    if len(spacing) != label_map.ndim:
        raise ModelSpecError(f"spacing {spacing} does not match a {label_map.ndim}-D label map")
    if label_map.size and (int(label_map.min()) < 0 or int(label_map.max()) >= len(labels)):
        raise ModelSpecError(
            f"label map holds values {int(label_map.min())}..{int(label_map.max())} but the model "
            f"declares {len(labels)} labels ({', '.join(labels)})"
        )
    if len(labels) > 256:
        raise ModelSpecError(f"{len(labels)} labels do not fit a uint8 label map")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0

    filtered = label_map.astype(np.uint8, copy=True)
    # One pass finds every label's bounding box; the per-label work then runs on that crop only,
    # which keeps a 512x512x300 map with small organs fast.
    boxes = ndimage.find_objects(filtered, max_label=len(labels) - 1)
    stats: dict[str, LabelStats] = {}
    for value in range(1, len(labels)):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            stats[labels[value]] = LabelStats(voxels=0, volume_ml=0.0, bbox=())
            continue
        crop = filtered[box]
        mask = crop == value
        if keep_largest:
            kept = largest_component(mask)
            crop[mask & ~kept] = 0  # crop is a view: this edits ``filtered``
            mask = kept
        voxels = int(np.count_nonzero(mask))
        inner = ndimage.find_objects(mask.astype(np.uint8))[0]
        offsets = [s.start for s in box]
        bbox = tuple(int(o + s.start) for o, s in zip(offsets, inner, strict=True)) + tuple(
            int(o + s.stop) for o, s in zip(offsets, inner, strict=True)
        )
        stats[labels[value]] = LabelStats(voxels=voxels, volume_ml=voxels * voxel_ml, bbox=bbox)
    return SegmentationOutput(labels=stats), filtered


def classification_outputs(logits: np.ndarray, labels: Sequence[str]) -> ClassificationOutput:
    """Softmax of one sample's logits.

    Takes logits (K,) (a (1, K) batch of one is accepted) and the K class names; returns the
    top label, its probability as ``confidence`` and every class's probability, as Python
    floats. Raises ModelSpecError when K differs from the number of labels, BackendError for
    non-finite logits.
    """
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 1 or values.shape[0] != len(labels):
        raise ModelSpecError(f"model returned logits of shape {np.shape(logits)} for {len(labels)} labels")
    if not np.isfinite(values).all():
        raise BackendError("model returned non-finite logits")
    exp = np.exp(values - values.max())  # shift by the max: no overflow for large logits
    probs = exp / exp.sum()
    top = int(np.argmax(probs))
    return ClassificationOutput(
        label=labels[top],
        confidence=float(probs[top]),
        probabilities={name: float(p) for name, p in zip(labels, probs, strict=True)},
    )


def dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice coefficient per label value between two label maps of the same shape.

    Returns ``{label: 2|A&B| / (|A| + |B|)}``; 1.0 when the label is absent from both (nothing
    to find, nothing found).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise EdgeAgentError(f"dice: shapes differ ({a.shape} vs {b.shape})")
    scores: dict[int, float] = {}
    for value in labels:
        in_a = a == value
        in_b = b == value
        total = int(np.count_nonzero(in_a)) + int(np.count_nonzero(in_b))
        if total == 0:
            scores[int(value)] = 1.0
            continue
        scores[int(value)] = 2.0 * int(np.count_nonzero(in_a & in_b)) / total
    return scores
