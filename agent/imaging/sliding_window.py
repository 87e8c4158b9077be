"""Patch-wise inference over a 3D volume with Gaussian blending (numpy only).

Behaves like MONAI's ``sliding_window_inference(mode="gaussian")`` so a model validated with
MONAI during training sees the same tiling here, but with no torch dependency:

* a volume smaller than the patch along an axis is padded symmetrically (``before = d // 2``)
  with the per-channel minimum of the image (air/background after window or zscore
  normalisation, rather than 0, which is mid-grey for zscore), and the padding is cropped off
  the output;
* patch starts cover every axis with the given overlap, the last patch flush with the end
  (:func:`patch_starts`);
* each patch's output is weighted by a separable Gaussian (sigma = ``sigma_scale * patch``,
  peak 1, floored at ``IMPORTANCE_FLOOR`` so corners of a patch that alone covers a voxel still
  count), accumulated, and divided by the summed weights.

Patches are visited in a fixed (z, y, x) raster order and accumulated in that order whatever
the batch size, so results are bit-identical for any ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from agent.core.errors import BackendError, PreprocessError

#: z-slices blended per step: a slab of a 96 x 96 patch channel (8 x 96 x 96 float32, 288 KiB)
#: stays in a core's L2 cache between the weighting and the accumulation
_SLAB = 8

#: smallest importance weight (relative to the peak of 1)
IMPORTANCE_FLOOR = 1e-4

#: a batch (N, C, pz, py, px) float32 -> its logits (N, K, pz, py, px)
Predict = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of patches of length ``patch`` covering ``0..size`` along one axis.

    Step is ``max(1, int(patch * (1 - overlap)))`` (MONAI's scan interval); the last start is
    ``size - patch`` so the last patch ends flush with the volume. ``size <= patch`` -> ``[0]``.
    Returns strictly increasing starts.
    """
    if patch < 1 or size < 1:
        raise PreprocessError(f"patch ({patch}) and size ({size}) must be positive")
    if not 0.0 <= overlap < 1.0:
        raise PreprocessError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    return [*range(0, size - patch, step), size - patch]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> npt.NDArray[np.float32]:
    """Separable Gaussian weights of shape ``patch_size`` (float32, max 1, >= IMPORTANCE_FLOOR).

    Centred on the patch centre ``(p - 1) / 2`` with sigma ``sigma_scale * p`` per axis.
    """
    if sigma_scale <= 0:
        raise PreprocessError(f"sigma_scale must be positive, got {sigma_scale}")
    weights = np.ones((), dtype=np.float64)
    for p in patch_size:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        g = np.exp(-0.5 * (x / (sigma_scale * p)) ** 2)
        weights = np.multiply.outer(weights, g)
    weights /= weights.max()
    return np.maximum(weights, IMPORTANCE_FLOOR).astype(np.float32)


def sliding_window_inference(
    image: npt.ArrayLike,
    patch_size: tuple[int, int, int],
    overlap: float,
    predict: Predict,
    batch_size: int = 1,
    sigma_scale: float = 0.125,
) -> npt.NDArray[np.float32]:
    """Run ``predict`` on overlapping patches of ``image`` and blend the outputs.

    Takes ``image`` (C, Z, Y, X), the patch size (z, y, x), the overlap fraction and ``predict``,
    which maps a batch (N, C, pz, py, px) float32 to (N, K, pz, py, px) logits. Returns
    (K, Z, Y, X) float32 blended logits on the image's grid. Raises PreprocessError for bad
    arguments and BackendError when ``predict`` returns the wrong shape or non-finite values.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4 or image.size == 0:
        raise PreprocessError(f"sliding window needs a non-empty (C, Z, Y, X) image, got {image.shape}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise PreprocessError(f"patch_size must be 3 positive sizes (z, y, x), got {patch_size}")
    if batch_size < 1:
        raise PreprocessError(f"batch_size must be >= 1, got {batch_size}")

    spatial = image.shape[1:]
    pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch, strict=True)]
    needs_padding = any(b or a for b, a in pad)
    if needs_padding:
        padded = np.empty((image.shape[0], *(s + b + a for s, (b, a) in zip(spatial, pad, strict=True))), dtype=np.float32)
        for c in range(image.shape[0]):
            padded[c] = np.pad(image[c], pad, mode="constant", constant_values=float(image[c].min()))
        image = padded
    full = image.shape[1:]

    starts = [
        (z, y, x)
        for z in patch_starts(full[0], patch[0], overlap)
        for y in patch_starts(full[1], patch[1], overlap)
        for x in patch_starts(full[2], patch[2], overlap)
    ]
    weights_patch = gaussian_importance_map(patch, sigma_scale)
    weight_sum = np.zeros(full, dtype=np.float32)
    for z, y, x in starts:
        weight_sum[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += weights_patch

    out: npt.NDArray[np.float32] | None = None
    # one slab of one channel's weighted logits, reused for every patch
    weighted = np.empty((min(_SLAB, patch[0]), *patch[1:]), dtype=np.float32)
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first : first + batch_size]
        batch = np.stack(
            [image[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in batch_starts]
        )
        logits = np.asarray(predict(batch))
        if logits.ndim != 5 or logits.shape[0] != len(batch_starts) or tuple(logits.shape[2:]) != patch:
            raise BackendError(
                f"model returned shape {logits.shape} for a batch of shape {batch.shape}; "
                f"expected ({len(batch_starts)}, K, {patch[0]}, {patch[1]}, {patch[2]})"
            )
        if out is None:
            out = np.zeros((logits.shape[1], *full), dtype=np.float32)
        elif logits.shape[1] != out.shape[0]:
            raise BackendError(f"model returned {logits.shape[1]} channels, earlier {out.shape[0]}")
        # Accumulate patch by patch in raster order: the float sums, hence the result, do not
        # depend on how the patches were batched. Weighting goes through a scratch buffer, so the
        # caller's array (possibly a backend's own output buffer) is read once and never written.
        for (z, y, x), patch_logits in zip(batch_starts, logits, strict=True):
            region = out[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]
            # slab by slab, so the scratch stays in cache between the multiply and the add
            for k in range(region.shape[0]):
                for z0 in range(0, patch[0], _SLAB):
                    z1 = min(z0 + _SLAB, patch[0])
                    scratch = weighted[: z1 - z0]
                    np.multiply(patch_logits[k, z0:z1], weights_patch[z0:z1], out=scratch, casting="same_kind")
                    np.add(region[k, z0:z1], scratch, out=region[k, z0:z1])

    if out is None:  # unreachable: patch_starts never returns an empty list
        raise PreprocessError("no patches to run")
    # A NaN or Inf in any patch survives the positive-weighted sums: one check of the blend
    # covers every patch.
    if not np.isfinite(out).all():
        raise BackendError("model returned non-finite logits")
    # divide by the summed weights while cropping the padding: one pass, one output array
    inverse = np.reciprocal(weight_sum, out=weight_sum)
    crop = tuple(slice(b, n - a) for (b, a), n in zip(pad, full, strict=True))
    if not needs_padding:
        np.multiply(out, inverse, out=out)
        return out
    result = np.empty((out.shape[0], *spatial), dtype=np.float32)
    np.multiply(out[(slice(None), *crop)], inverse[crop], out=result)
    return result
