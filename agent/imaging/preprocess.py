"""Volume -> model input (reorient, resample, normalise) and model-space label map -> source grid.

The same code prepares inputs in the daemon and in the deploy toolkit (training validation,
calibration, evaluation), so what a model sees in the exam room is what it was checked on.
numpy/scipy only.

Steps of :func:`prepare`:

1. **Reorient** with axis permutations and flips only (no interpolation). 3D models: array
   (z, y, x) axes point to patient superior, posterior and left (LPS, direction ~ identity), so
   head-first/feet-first, supine/prone and ascending/descending series look alike. 2D models
   take the middle slice of the acquired stack (index ``n // 2`` of the slices sorted along the
   normal) and orient it in-plane like a radiology display: x toward patient left (axial,
   coronal) or posterior (sagittal), y toward posterior (axial) or inferior (coronal, sagittal).
   Axial slices therefore look the same to 2D and 3D models.
2. **Resample** with ``scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")``: linear,
   voxel *edges* aligned (the physical extent ``n * spacing`` is kept, like
   ``align_corners=False``), no prefilter (irrelevant for order 1), float32 throughout. The
   output shape is ``round(n * spacing / target_spacing)`` (at least 1) or ``target_size``;
   the actual spacing is ``n * spacing / out`` and is recorded in :class:`Geometry`.
3. **Normalise** on the resampled grid (cheaper, and exactly what the model sees):
   ``window``: clip to [low, high], then ``(x - low) / (high - low)`` in [0, 1];
   ``zscore``: ``(x - mean) / std`` with mean/std over the foreground, the voxels strictly above
   the 5th percentile (drops the air/background mode of CT and MR); all voxels when that set is
   empty (near-constant image); ``std`` below 1e-6 counts as 1 (a blank image stays finite).
4. Channels: the one modality image is repeated ``spec.channels`` times.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from agent.core.errors import PreprocessError
from agent.core.modelspec import InputSpec
from agent.core.types import Volume
from agent.imaging.postprocess import label_counts_and_boxes

#: zscore: foreground = voxels strictly above this percentile
ZSCORE_FOREGROUND_PERCENTILE = 5.0
#: zscore: a standard deviation below this is treated as 1 (constant image)
ZSCORE_MIN_STD = 1e-6

_T = TypeVar("_T")
_S = TypeVar("_S", bound=np.generic)


@dataclass(frozen=True)
class Geometry:
    """How a prepared input relates to its source volume (enough to map outputs back).

    Axis tuples are in numpy order. ``permutation[k]`` is the source axis that became canonical
    axis ``k`` (``np.transpose(source, permutation)``); ``flips[k]`` says canonical axis ``k``
    was reversed after the transpose. ``canonical_shape`` is the (z, y, x) shape after
    reorientation. ``resampled_shape`` and ``zoom`` (= resampled / canonical size) have one
    entry per model spatial axis: 3 for 3D, 2 (y, x) for 2D models, whose input is the
    canonical slice ``slice_index`` (the source slice index; 2D reorientation never touches z).
    """

    dims: int
    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    canonical_shape: tuple[int, int, int]
    canonical_spacing: tuple[float, float, float]
    resampled_shape: tuple[int, ...]
    zoom: tuple[float, ...]
    resampled_spacing: tuple[float, ...]
    slice_index: int | None = None


@dataclass(frozen=True)
class PreparedInput:
    """Model input: ``array`` (C, *spatial) float32 in model space, and its geometry."""

    array: npt.NDArray[np.float32]
    geometry: Geometry


def prepare(volume: Volume, spec: InputSpec) -> PreparedInput:
    """Turn a Volume into the input the model of ``spec`` takes.

    Takes a Volume (array (z, y, x) in modality units) and the model's InputSpec; returns a
    PreparedInput whose array is (C, Z, Y, X) for 3D models or (C, H, W) for 2D models, float32,
    C-contiguous. A 3D volume smaller than the patch is fine (the sliding window pads).
    Raises PreprocessError (with what to change) for a modality the model does not take, a
    spec/volume mismatch or non-finite values.
    """
    if volume.modality.upper() != spec.modality.upper():
        raise PreprocessError(
            f"series {volume.series_uid}: model takes {spec.modality} images, series is "
            f"{volume.modality or 'of unknown modality'}; check the model's routing"
        )
    array = np.asarray(volume.array)
    if array.ndim != 3 or array.size == 0:
        raise PreprocessError(f"series {volume.series_uid}: volume array must be non-empty (z, y, x), got {array.shape}")
    spacing = tuple(float(s) for s in volume.spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise PreprocessError(f"series {volume.series_uid}: invalid voxel spacing {volume.spacing}")
    direction = np.asarray(volume.direction, dtype=np.float64)
    if direction.shape != (3, 3):
        raise PreprocessError(f"series {volume.series_uid}: direction must be 3x3, got {direction.shape}")

    dims = spec.dims
    if dims == 3:
        permutation, flips = _canonical_axes_3d(direction)
        slice_index = None
    else:
        permutation, flips = _canonical_axes_2d(direction)
        slice_index = array.shape[0] // 2
    canonical = _reorient(array, permutation, flips)
    canonical_shape = tuple(int(n) for n in canonical.shape)
    canonical_spacing = tuple(spacing[p] for p in permutation)
    if dims == 2:
        canonical = canonical[slice_index]  # 2D reorientation keeps z, so this is the source slice

    grid_shape = canonical.shape
    grid_spacing = canonical_spacing[3 - dims :]
    out_shape = _target_shape(volume.series_uid, spec, grid_shape, grid_spacing)
    resampled = _resample(canonical, out_shape)
    zoom = tuple(o / n for o, n in zip(out_shape, grid_shape, strict=True))
    resampled_spacing = tuple(s * n / o for s, n, o in zip(grid_spacing, grid_shape, out_shape, strict=True))

    _normalise(volume.series_uid, resampled, spec)
    if not np.isfinite(resampled).all():
        raise PreprocessError(f"series {volume.series_uid}: non-finite values in the prepared input")
    channels = np.ascontiguousarray(np.broadcast_to(resampled, (spec.channels, *resampled.shape)))

    geometry = Geometry(
        dims=dims,
        source_shape=_three([int(n) for n in array.shape]),
        source_spacing=_three(spacing),
        permutation=permutation,
        flips=flips,
        canonical_shape=_three(canonical_shape),
        canonical_spacing=_three(canonical_spacing),
        resampled_shape=tuple(out_shape),
        zoom=zoom,
        resampled_spacing=resampled_spacing,
        slice_index=slice_index,
    )
    return PreparedInput(array=channels, geometry=geometry)


def restore_label_map(label_map_model_space: npt.ArrayLike, geometry: Geometry) -> npt.NDArray[np.uint8]:
    """Map a model-space label map back onto the source volume's grid.

    Takes integer labels in model space: (Z, Y, X) for 3D models, (H, W) or (1, H, W) for 2D
    ones, with the shape ``geometry.resampled_shape``. Returns a uint8 array of exactly
    ``geometry.source_shape`` (z, y, x): nearest-neighbour resampling with the same voxel-edge
    alignment :func:`prepare` used, then the reorientation undone. For 2D models only the slice
    ``geometry.slice_index`` is filled; the others are 0.
    """
    labels = np.asarray(label_map_model_space)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise PreprocessError(f"label map must hold integers, got {labels.dtype}")
    if geometry.dims == 2 and labels.ndim == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if tuple(labels.shape) != tuple(geometry.resampled_shape):
        raise PreprocessError(
            f"label map shape {labels.shape} does not match the model-space shape {geometry.resampled_shape}"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise PreprocessError(f"label values must be in 0..255, got {int(labels.min())}..{int(labels.max())}")

    index = _nearest_model_indices(geometry.canonical_shape[3 - geometry.dims :], geometry.resampled_shape)
    restored = labels.astype(np.uint8, copy=False)[np.ix_(*index)]
    if geometry.dims == 2:
        full = np.zeros(geometry.canonical_shape, dtype=np.uint8)
        full[geometry.slice_index] = restored
        restored = full
    return np.ascontiguousarray(_undo_reorient(restored, geometry.permutation, geometry.flips))


def source_grid_label_stats(
    label_map_model_space: npt.ArrayLike, geometry: Geometry, n_labels: int
) -> list[tuple[int, tuple[int, ...]]]:
    """Per label value ``1..n_labels-1``: its voxel count and end-exclusive bbox (source numpy
    order, ``(z0, y0, x0, z1, y1, x1)``; ``()`` when absent) in the map that
    :func:`restore_label_map` would return, computed without building that map.

    Nearest-neighbour restoring is separable: every model voxel becomes a box of source voxels
    whose size is the product of per-axis replication counts (0 where the source grid is coarser
    and skips a model index). So one weighted bincount over the model-space map gives every
    label's source voxel count, and a model-space bbox maps to a source bbox through the same
    index arrays. A 512x512x300 CT restored then scanned costs about 0.5 s; this costs a few ms
    on the model-space grid (a test holds the two equal).
    """
    if geometry.dims != 3:  # a 2D model fills one source slice: restoring it is cheap
        return label_counts_and_boxes(restore_label_map(label_map_model_space, geometry), n_labels)
    labels = np.asarray(label_map_model_space)
    if tuple(labels.shape) != tuple(geometry.resampled_shape):
        raise PreprocessError(
            f"label map shape {labels.shape} does not match the model-space shape {geometry.resampled_shape}"
        )
    index = _nearest_model_indices(geometry.canonical_shape, geometry.resampled_shape)
    reps = [np.bincount(ix, minlength=o) for ix, o in zip(index, geometry.resampled_shape, strict=True)]
    first = [np.cumsum(r) - r for r in reps]  # first canonical voxel of each model index
    sampled = [np.flatnonzero(r) for r in reps]  # model indices some canonical voxel maps to
    sub = labels.astype(np.uint8, copy=False)[np.ix_(*sampled)]
    weights = reps[0][sampled[0]][:, None, None] * reps[1][sampled[1]][None, :, None] * reps[2][sampled[2]][None, None, :]
    counts = np.bincount(sub.ravel(), weights=weights.ravel().astype(np.float64), minlength=n_labels)
    boxes = ndimage.find_objects(sub, max_label=n_labels - 1)
    out: list[tuple[int, tuple[int, ...]]] = []
    for value in range(1, n_labels):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            out.append((0, ()))
            continue
        lo = [0, 0, 0]
        hi = [0, 0, 0]
        for k, sl in enumerate(box):  # canonical axis k
            m0, m1 = sampled[k][sl.start], sampled[k][sl.stop - 1]
            c0, c1 = int(first[k][m0]), int(first[k][m1] + reps[k][m1])
            if geometry.flips[k]:
                n = geometry.canonical_shape[k]
                c0, c1 = n - c1, n - c0
            axis = geometry.permutation[k]  # the source axis canonical axis k came from
            lo[axis], hi[axis] = c0, c1
        out.append((int(round(counts[value])), tuple(lo) + tuple(hi)))
    return out


def _nearest_model_indices(
    grid_shape: Sequence[int], model_shape: Sequence[int]
) -> list[npt.NDArray[np.int64]]:
    """Per axis, the model-space index nearest to each source-grid index.

    With the voxel-edge alignment :func:`prepare` uses, source voxel c maps to
    o = (c + 0.5) * out / n - 0.5, rounded half up = floor((c + 0.5) * out / n), computed in exact
    integer arithmetic (no .5 rounding drift).
    """
    return [
        np.minimum(((2 * np.arange(n, dtype=np.int64) + 1) * o) // (2 * n), o - 1)
        for n, o in zip(grid_shape, model_shape, strict=True)
    ]


def _three(values: Sequence[_T]) -> tuple[_T, _T, _T]:
    """The first three values as a 3-tuple (for a sequence already known to hold three)."""
    return values[0], values[1], values[2]


# --- orientation ------------------------------------------------------------------------------


def _best_assignment(direction: npt.NDArray[np.float64], array_axes: Sequence[int]) -> tuple[int, ...]:
    """Distinct patient axes (LPS 0, 1, 2) for the given ITK array axes (x=0, y=1, z=2),
    maximising the summed |cosine|; ties go to the first permutation (deterministic)."""
    best: tuple[int, ...] = ()
    best_score = -1.0
    for patient_axes in itertools.permutations(range(3), len(array_axes)):
        score = sum(abs(direction[p, a]) for p, a in zip(patient_axes, array_axes, strict=True))
        if score > best_score + 1e-9:
            best, best_score = patient_axes, score
    return best


def _canonical_axes_3d(
    direction: npt.NDArray[np.float64],
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Permutation/flips (numpy order) that bring the array closest to LPS identity."""
    patient_of = _best_assignment(direction, (0, 1, 2))  # patient axis of ITK axis a
    itk_of = {p: a for a, p in enumerate(patient_of)}  # ITK axis along patient axis p
    # Canonical numpy axis k holds patient axis 2 - k (z=S, y=P, x=L); ITK axis a is numpy 2 - a.
    permutation = _three([2 - itk_of[2 - k] for k in range(3)])
    flips = _three([bool(direction[2 - k, itk_of[2 - k]] < 0) for k in range(3)])
    return permutation, flips


def _canonical_axes_2d(
    direction: npt.NDArray[np.float64],
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Permutation/flips (numpy order) of the in-plane axes to radiology display orientation.

    The slice axis stays first and unflipped. Of the two in-plane axes, the one along the
    patient axis of higher LPS index becomes y (posterior for axial, superior-inferior for
    coronal/sagittal); x points to +L or +P, y to +P (axial) or inferior (superior at the top).
    """
    px, py = _best_assignment(direction, (0, 1))  # patient axes of ITK x (columns) and y (rows)
    desired = {0: 1.0, 1: 1.0, 2: -1.0}  # L, P increase rightward/downward; S is up on screen
    if py > px:
        y_itk, x_itk = 1, 0
    else:
        y_itk, x_itk = 0, 1
    p_of = {0: px, 1: py}
    permutation = (0, 2 - y_itk, 2 - x_itk)
    flips = (
        False,
        bool(np.sign(direction[p_of[y_itk], y_itk]) != desired[p_of[y_itk]]),
        bool(np.sign(direction[p_of[x_itk], x_itk]) != desired[p_of[x_itk]]),
    )
    return permutation, flips


def _reorient(
    array: npt.NDArray[_S], permutation: Sequence[int], flips: Sequence[bool]
) -> npt.NDArray[_S]:
    """``transpose`` then ``flip`` (a view; resampling copies)."""
    out = np.transpose(array, permutation)
    axes = tuple(k for k, f in enumerate(flips) if f)
    return np.flip(out, axes) if axes else out


def _undo_reorient(
    array: npt.NDArray[_S], permutation: Sequence[int], flips: Sequence[bool]
) -> npt.NDArray[_S]:
    """Inverse of :func:`_reorient`."""
    axes = tuple(k for k, f in enumerate(flips) if f)
    out = np.flip(array, axes) if axes else array
    return np.transpose(out, np.argsort(permutation))


# --- resampling and normalisation --------------------------------------------------------------


def _target_shape(
    series_uid: str, spec: InputSpec, shape: Sequence[int], spacing: Sequence[float]
) -> tuple[int, ...]:
    """Model-space shape: from ``target_spacing_mm`` when set, else ``target_size``."""
    dims = spec.dims
    if spec.target_spacing_mm is not None:
        target = spec.target_spacing_mm
        if len(target) != dims or not all(t > 0 for t in target):
            raise PreprocessError(
                f"target_spacing_mm {tuple(target)} must be {dims} positive values "
                f"({'(z, y, x)' if dims == 3 else '(y, x)'}) for a {dims}D model; fix model.toml"
            )
        return tuple(max(1, int(np.floor(n * s / t + 0.5))) for n, s, t in zip(shape, spacing, target, strict=True))
    size = spec.target_size
    if size is None or len(size) != dims or not all(int(v) >= 1 for v in size):
        raise PreprocessError(
            f"target_size {size} must be {dims} positive sizes for a {dims}D model; fix model.toml"
        )
    return tuple(int(v) for v in size)


def _resample(array: npt.NDArray[Any], out_shape: Sequence[int]) -> npt.NDArray[np.float32]:
    """Linear resampling (voxel edges aligned) to ``out_shape``; always a new float32 array."""
    if tuple(array.shape) == tuple(out_shape):
        return np.array(array, dtype=np.float32, copy=True, order="C")
    factors = [o / n for o, n in zip(out_shape, array.shape, strict=True)]
    out: npt.NDArray[np.float32] = ndimage.zoom(  # scipy is untyped
        np.asarray(array, dtype=np.float32),
        factors,
        output=np.float32,
        order=1,
        mode="nearest",
        grid_mode=True,
        prefilter=False,
    )
    if tuple(out.shape) != tuple(out_shape):  # zoom rounds shape * factor; guard float drift
        raise PreprocessError(f"resampling produced {out.shape}, expected {tuple(out_shape)}")
    return out


def _normalise(series_uid: str, array: npt.NDArray[np.float32], spec: InputSpec) -> None:
    """Normalise ``array`` in place as ``spec.normalisation`` says (see module docstring)."""
    if spec.normalisation == "window":
        if spec.window is None:
            raise PreprocessError("normalisation 'window' needs `window = [low, high]` in model.toml")
        low, high = float(spec.window[0]), float(spec.window[1])
        if not high > low:
            raise PreprocessError(f"window {spec.window}: high must be above low; fix model.toml")
        np.clip(array, low, high, out=array)
        array -= np.float32(low)
        array *= np.float32(1.0 / (high - low))
        return
    if spec.normalisation == "zscore":
        threshold = np.percentile(array, ZSCORE_FOREGROUND_PERCENTILE)
        foreground = array[array > threshold]
        if foreground.size == 0:
            foreground = array.ravel()
        mean = float(foreground.mean(dtype=np.float64))
        std = float(foreground.std(dtype=np.float64))
        if std < ZSCORE_MIN_STD:
            std = 1.0
        array -= np.float32(mean)
        array /= np.float32(std)
        return
    raise PreprocessError(f"series {series_uid}: unknown normalisation {spec.normalisation!r}")
