"""Model outputs -> published results: label statistics, class probabilities, Dice.

Shared by the daemon (results) and the deploy toolkit (evaluation, accuracy gate), so a volume
in ml or a Dice score means the same thing in both. numpy/scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from agent.core.errors import BackendError, EdgeAgentError, ModelSpecError
from agent.core.types import ClassificationOutput, LabelStats, SegmentationOutput


def largest_component(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Keep the largest connected component of a boolean mask.

    Takes a bool array of any dimension; connectivity is full (26 in 3D, 8 in 2D), because a
    thin organ boundary touching diagonally is still one organ. Returns a bool array of the same
    shape (all False for an empty mask). Ties go to the component found first in raster order.
    """
    binary = np.asarray(mask, dtype=bool)
    if not binary.any():
        return np.zeros(binary.shape, dtype=bool)
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    components: npt.NDArray[np.int32]  # scipy is untyped
    components, count = ndimage.label(binary, structure=structure)
    if count == 1:
        return binary.copy()
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0  # background
    return np.equal(components, int(np.argmax(sizes)))


def segmentation_outputs(
    label_map_source: npt.ArrayLike,
    labels: Sequence[str],
    spacing: tuple[float, ...],
    keep_largest: bool = True,
) -> tuple[SegmentationOutput, npt.NDArray[np.uint8]]:
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
    filtered = keep_largest_components(label_map, len(labels)) if keep_largest else label_map.astype(np.uint8)
    per_label = label_counts_and_boxes(filtered, len(labels))
    return segmentation_output_from_counts(labels, per_label, spacing), filtered


def label_counts_and_boxes(
    label_map: npt.NDArray[np.uint8], n_labels: int
) -> list[tuple[int, tuple[int, ...]]]:
    """Per label value ``1..n_labels-1`` of a uint8 label map: its voxel count and end-exclusive
    bbox ``(z0, y0, x0, z1, y1, x1)`` (``()`` when absent), from one bincount and one
    ``find_objects`` pass."""
    boxes = ndimage.find_objects(label_map, max_label=n_labels - 1)
    counts = np.bincount(label_map.ravel(), minlength=n_labels)
    per_label: list[tuple[int, tuple[int, ...]]] = []
    for value in range(1, n_labels):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        bbox = tuple(int(s.start) for s in box) + tuple(int(s.stop) for s in box) if box else ()
        per_label.append((int(counts[value]), bbox))
    return per_label


def segmentation_output_from_counts(
    labels: Sequence[str], per_label: Sequence[tuple[int, tuple[int, ...]]], spacing: Sequence[float]
) -> SegmentationOutput:
    """``SegmentationOutput`` from ``(voxels, bbox)`` of every foreground label (``labels[1:]``,
    in order) and the voxel spacing in mm (volume in ml = voxels * prod(spacing) / 1000)."""
    if len(per_label) != len(labels) - 1:
        raise ModelSpecError(f"{len(per_label)} label statistics for {len(labels) - 1} foreground labels")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return SegmentationOutput(labels={
        name: LabelStats(voxels=int(voxels), volume_ml=int(voxels) * voxel_ml, bbox=tuple(bbox))
        for name, (voxels, bbox) in zip(labels[1:], per_label, strict=True)
    })


def keep_largest_components(label_map: npt.ArrayLike, n_labels: int) -> npt.NDArray[np.uint8]:
    """A uint8 copy of ``label_map`` where each foreground label keeps only its largest connected
    component (the rest becomes background).

    One pass finds every label's bounding box; the per-label work runs on that crop only.
    """
    filtered = np.asarray(label_map).astype(np.uint8, copy=True)
    boxes = ndimage.find_objects(filtered, max_label=n_labels - 1)
    for value in range(1, n_labels):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        crop = filtered[box]  # a view: edits land in ``filtered``
        mask = crop == value
        crop[mask & ~largest_component(mask)] = 0
    return filtered


def classification_outputs(logits: npt.ArrayLike, labels: Sequence[str]) -> ClassificationOutput:
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


def dice(a: npt.ArrayLike, b: npt.ArrayLike, labels: Sequence[int]) -> dict[int, float]:
    """Dice coefficient per label value between two label maps of the same shape.

    Returns ``{label: 2|A&B| / (|A| + |B|)}``; 1.0 when the label is absent from both (nothing
    to find, nothing found).
    """
    map_a = np.asarray(a)
    map_b = np.asarray(b)
    if map_a.shape != map_b.shape:
        raise EdgeAgentError(f"dice: shapes differ ({map_a.shape} vs {map_b.shape})")
    scores: dict[int, float] = {}
    for value in labels:
        in_a = map_a == value
        in_b = map_b == value
        total = int(np.count_nonzero(in_a)) + int(np.count_nonzero(in_b))
        if total == 0:
            scores[int(value)] = 1.0
            continue
        scores[int(value)] = 2.0 * int(np.count_nonzero(in_a & in_b)) / total
    return scores
