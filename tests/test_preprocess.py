"""agent.imaging.preprocess (reorient, resample, normalise, restore) and sliding_window."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from agent.core.errors import BackendError, PreprocessError
from agent.core.modelspec import InputSpec
from agent.core.types import Volume
from agent.imaging import (
    gaussian_importance_map,
    patch_starts,
    prepare,
    restore_label_map,
    sliding_window_inference,
)
from agent.imaging.preprocess import source_grid_label_stats

CT_SOP = ("1.2.840.10008.5.1.4.1.1.2",)


def ct_spec(**overrides: object) -> InputSpec:
    base: dict[str, object] = {
        "modality": "CT",
        "sop_classes": CT_SOP,
        "dims": 3,
        "target_spacing_mm": (1.0, 1.0, 1.0),
        "normalisation": "window",
        "window": (-100.0, 300.0),
        "patch_size": (8, 8, 8),
    }
    base.update(overrides)
    return InputSpec(**base)  # type: ignore[arg-type]


def mr2d_spec(**overrides: object) -> InputSpec:
    base: dict[str, object] = {
        "modality": "MR",
        "sop_classes": ("1.2.840.10008.5.1.4.1.1.4",),
        "dims": 2,
        "target_size": (8, 8),
        "normalisation": "zscore",
    }
    base.update(overrides)
    return InputSpec(**base)  # type: ignore[arg-type]


def volume(array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), direction: np.ndarray | None = None,
           origin: Sequence[float] = (0.0, 0.0, 0.0), modality: str = "CT") -> Volume:
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    return Volume(
        array=np.asarray(array, dtype=np.float32),
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(tuple(float(v) for v in row) for row in d),
        modality=modality,
        series_uid="1.2.3.4.5",
    )


# --- a phantom sampled in any orientation -------------------------------------------------------


def rotations() -> list[np.ndarray]:
    """The 24 proper signed permutation matrices (every axis-aligned orientation)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for col, (row, sign) in enumerate(zip(perm, signs, strict=True)):
                m[row, col] = sign
            if np.linalg.det(m) > 0:
                out.append(m)
    return out


def sample_in_orientation(canonical: np.ndarray, canonical_spacing: Sequence[float], direction: np.ndarray) -> Volume:
    """The volume a scanner with array axes along ``direction`` would produce of ``canonical``.

    ``canonical`` is (z, y, x) with axes along +S, +P, +L (LPS) and voxel (0, 0, 0) at the
    origin; computed from patient coordinates only, independently of the code under test.
    """
    counts_lps = canonical.shape[::-1]  # L, P, S
    spacing_lps = tuple(canonical_spacing)[::-1]
    patient_axis = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]  # of ITK x, y, z
    origin = np.zeros(3)
    for a, p in enumerate(patient_axis):
        if direction[p, a] < 0:
            origin[p] = (counts_lps[p] - 1) * spacing_lps[p]
    shape_itk = [counts_lps[p] for p in patient_axis]
    spacing_itk = [spacing_lps[p] for p in patient_axis]
    iz, iy, ix = np.meshgrid(*(np.arange(n) for n in shape_itk[::-1]), indexing="ij")
    index_mm = np.stack([ix * spacing_itk[0], iy * spacing_itk[1], iz * spacing_itk[2]], axis=-1)
    points = origin + index_mm @ direction.T
    k = np.rint(points / np.asarray(spacing_lps)).astype(int)  # (L, P, S) canonical indices
    array = canonical[k[..., 2], k[..., 1], k[..., 0]]
    return volume(array, spacing=spacing_itk[::-1], direction=direction, origin=origin)


# --- reorientation ------------------------------------------------------------------------------


def test_every_orientation_canonicalises_to_lps() -> None:
    canonical = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    spec = ct_spec(target_spacing_mm=(3.0, 2.0, 1.0), window=(0.0, 1000.0))
    for direction in rotations():
        vol = sample_in_orientation(canonical, (3.0, 2.0, 1.0), direction)
        prepared = prepare(vol, spec)
        np.testing.assert_allclose(prepared.array[0] * 1000.0, canonical, atol=1e-3, err_msg=str(direction))
        assert prepared.geometry.canonical_spacing == (3.0, 2.0, 1.0)


def test_oblique_direction_picks_nearest_axes() -> None:
    theta = np.deg2rad(20)  # rotated about S by 20 degrees, then feet-first (x, z flipped)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    direction = rot @ np.diag([-1.0, 1.0, -1.0])
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    prepared = prepare(volume(array, direction=direction), ct_spec(window=(0.0, 100.0)))
    assert prepared.geometry.permutation == (0, 1, 2)
    assert prepared.geometry.flips == (True, False, True)
    np.testing.assert_allclose(prepared.array[0] * 100.0, array[::-1, :, ::-1], atol=1e-4)


def test_prepare_does_not_modify_the_volume() -> None:
    array = np.linspace(-500, 500, 60, dtype=np.float32).reshape(3, 4, 5)
    vol = volume(array.copy())
    prepare(vol, ct_spec())
    prepare(vol, ct_spec(normalisation="zscore", window=None))
    np.testing.assert_array_equal(vol.array, array)


# --- normalisation ------------------------------------------------------------------------------


def test_window_normalisation_numbers() -> None:
    values = np.array([-1000.0, -100.0, 0.0, 100.0, 300.0, 2000.0], dtype=np.float32).reshape(1, 1, 6)
    prepared = prepare(volume(values), ct_spec())
    assert prepared.array.dtype == np.float32 and prepared.array.shape == (1, 1, 1, 6)
    np.testing.assert_allclose(prepared.array[0, 0, 0], [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-6)


def test_zscore_uses_foreground_above_5th_percentile() -> None:
    array = np.zeros((4, 5, 5), dtype=np.float32)  # 100 voxels: 10 background, 90 foreground
    fg = np.ones(array.shape, bool)
    fg.flat[:10] = False
    array[fg] = np.tile([10.0, 20.0], 45)
    prepared = prepare(volume(array, modality="MR"), ct_spec(modality="MR", normalisation="zscore", window=None))
    out = prepared.array[0]
    # foreground mean 15, std 5 -> 10 -> -1, 20 -> +1, background 0 -> -3
    np.testing.assert_allclose(np.unique(out), [-3.0, -1.0, 1.0], atol=1e-6)
    assert np.count_nonzero(np.isclose(out, -3.0)) == 10


def test_zscore_of_a_constant_image_is_finite() -> None:
    prepared = prepare(volume(np.full((3, 4, 4), 7.0)), ct_spec(normalisation="zscore", window=None))
    np.testing.assert_array_equal(prepared.array, 0.0)


def test_channels_are_repeated() -> None:
    array = np.random.default_rng(0).normal(size=(3, 6, 6)).astype(np.float32)
    prepared = prepare(volume(array), ct_spec(channels=3))
    assert prepared.array.shape == (3, 3, 6, 6) and prepared.array.flags.c_contiguous
    np.testing.assert_array_equal(prepared.array[0], prepared.array[2])


# --- resampling ---------------------------------------------------------------------------------


def test_resample_to_target_spacing_shape_and_zoom() -> None:
    array = np.zeros((30, 64, 64), dtype=np.float32)
    prepared = prepare(volume(array, spacing=(2.5, 0.8, 0.8)), ct_spec(target_spacing_mm=(1.5, 1.5, 1.5)))
    g = prepared.geometry
    assert prepared.array.shape == (1, 50, 34, 34)
    assert g.resampled_shape == (50, 34, 34)
    assert g.zoom == pytest.approx((50 / 30, 34 / 64, 34 / 64))
    assert g.resampled_spacing == pytest.approx((1.5, 64 * 0.8 / 34, 64 * 0.8 / 34))
    assert g.source_shape == (30, 64, 64) and g.canonical_shape == (30, 64, 64)


def test_resample_aligns_voxel_edges() -> None:
    # A ramp equal to each voxel centre's distance from the volume edge (mm) stays that ramp on
    # the new grid (away from the clamped border voxels): the physical extent is kept.
    n, s_old, s_new = 40, 0.7, 1.5
    ramp = ((np.arange(n) + 0.5) * s_old).astype(np.float32)
    array = np.broadcast_to(ramp, (2, 3, n)).copy()
    spec = ct_spec(target_spacing_mm=(1.0, 1.0, s_new), window=(0.0, 100.0))
    out = prepare(volume(array, spacing=(1.0, 1.0, s_old)), spec).array[0, 0, 0] * 100.0
    m = round(n * s_old / s_new)
    expected = (np.arange(m) + 0.5) * (n * s_old / m)
    np.testing.assert_allclose(out[1:-1], expected[1:-1], atol=1e-3)


def test_bad_specs_raise_preprocess_error() -> None:
    vol = volume(np.zeros((2, 4, 4)))
    with pytest.raises(PreprocessError, match="MR"):
        prepare(vol, ct_spec(modality="MR"))
    with pytest.raises(PreprocessError, match="target_spacing_mm"):
        prepare(vol, ct_spec(target_spacing_mm=(1.0, 1.0)))
    with pytest.raises(PreprocessError, match="window"):
        prepare(vol, ct_spec(window=(100.0, 100.0)))


# --- 2D models ----------------------------------------------------------------------------------


def test_2d_takes_the_middle_slice() -> None:
    array = np.stack([np.full((8, 8), k, np.float32) for k in range(4)])
    array[:, 0, 0] = -1.0  # not constant, so zscore does not collapse it
    prepared = prepare(volume(array, modality="MR"), mr2d_spec(normalisation="window", window=(-1.0, 9.0)))
    assert prepared.array.shape == (1, 8, 8)
    assert prepared.geometry.slice_index == 2
    assert prepared.array[0, 4, 4] == pytest.approx(0.3)


def test_2d_target_size_and_channels() -> None:
    array = np.random.default_rng(1).normal(100, 20, size=(1, 64, 48)).astype(np.float32)
    prepared = prepare(volume(array, spacing=(5.0, 0.5, 0.5), modality="MR"), mr2d_spec(target_size=(32, 24), channels=3))
    assert prepared.array.shape == (3, 32, 24)
    assert prepared.geometry.zoom == (0.5, 0.5)
    np.testing.assert_array_equal(prepared.array[0], prepared.array[1])


def test_2d_target_spacing() -> None:
    array = np.random.default_rng(3).normal(size=(3, 64, 48)).astype(np.float32)
    prepared = prepare(volume(array, spacing=(5.0, 0.5, 0.5), modality="MR"), mr2d_spec(target_size=None, target_spacing_mm=(1.0, 1.5)))
    assert prepared.array.shape == (1, 32, 16)
    assert prepared.geometry.resampled_spacing == pytest.approx((1.0, 1.5))
    with pytest.raises(PreprocessError, match="target_spacing_mm"):
        prepare(volume(array, modality="MR"), mr2d_spec(target_size=None, target_spacing_mm=(1.0, 1.0, 1.0)))


@pytest.mark.parametrize(
    ("name", "direction", "expected"),
    [
        # canonical display of a 2D slice: rows (y) go posterior (axial) or inferior (coronal,
        # sagittal); columns (x) go left (axial, coronal) or posterior (sagittal)
        ("axial HFS", np.eye(3), lambda a: a),
        ("axial HFP", np.diag([-1.0, -1.0, 1.0]), lambda a: a[::-1, ::-1]),
        ("axial rotated", np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]]), lambda a: a.T),
    ],
)
def test_2d_in_plane_orientation_axial(name: str, direction: np.ndarray, expected: object) -> None:
    plane = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)  # (P, L) as displayed for HFS
    # build the source slice whose patient-space content is ``plane`` (rows P, columns L)
    vol = sample_in_orientation(plane[None], (1.0, 1.0, 1.0), direction)
    spec = mr2d_spec(modality="CT", target_size=(4, 6), normalisation="window", window=(0.0, 100.0))
    out = prepare(vol, spec).array[0] * 100.0
    np.testing.assert_allclose(out, plane, atol=1e-4, err_msg=name)
    assert callable(expected)
    np.testing.assert_allclose(expected(vol.array[0]), plane, atol=0, err_msg=name)


def test_2d_sagittal_slice_is_displayed_anterior_left_superior_up() -> None:
    # sagittal single slice: row_dir = +P, col_dir = +I (DICOM default display) and the same
    # slice acquired with row_dir = A, col_dir = S must both come out as rows->I, cols->P.
    plane = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)  # rows: superior -> inferior, cols: A -> P
    p_count, s_count = 7, 5
    results = []
    for row_dir, col_dir in (((0, 1, 0), (0, 0, -1)), ((0, -1, 0), (0, 0, 1))):
        row_v, col_v = np.array(row_dir, float), np.array(col_dir, float)
        r, c = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
        # patient coordinates of source pixel (r, c); content defined on (P index, S index)
        p0 = 0 if row_v[1] > 0 else p_count - 1
        s0 = s_count - 1 if col_v[2] < 0 else 0
        p_idx = p0 + c * int(row_v[1])
        s_idx = s0 + r * int(col_v[2])
        source = plane[(s_count - 1) - s_idx, p_idx]
        direction = np.column_stack([row_v, col_v, np.cross(row_v, col_v)])
        vol = volume(source[None], direction=direction, modality="MR")
        results.append(prepare(vol, mr2d_spec(target_size=(5, 7), normalisation="window", window=(0.0, 100.0))).array[0] * 100)
    np.testing.assert_allclose(results[0], plane, atol=1e-4)
    np.testing.assert_allclose(results[1], plane, atol=1e-4)


# --- restore_label_map --------------------------------------------------------------------------


def block_labels() -> np.ndarray:
    """Canonical (8, 12, 18) labels with boxes aligned to factors (1, 2, 3)."""
    labels = np.zeros((8, 12, 18), dtype=np.uint8)
    labels[1:4, 2:6, 3:9] = 1
    labels[5:8, 6:12, 12:18] = 2
    labels[2:3, 8:10, 0:3] = 3
    return labels


@pytest.mark.parametrize("index", range(24))
def test_restore_round_trip_is_exact_in_every_orientation(index: int) -> None:
    direction = rotations()[index]
    canonical = block_labels()
    vol = sample_in_orientation(canonical, (3.0, 1.0, 0.5), direction)  # anisotropic
    source_labels = vol.array.astype(np.uint8)
    # integer down-sampling (1, 2, 3) of box-aligned labels: linear interpolation stays exact
    spec = ct_spec(target_spacing_mm=(3.0, 2.0, 1.5), window=(0.0, 255.0))
    prepared = prepare(vol, spec)
    assert prepared.geometry.resampled_shape == (8, 6, 6)
    model_labels = np.rint(prepared.array[0] * 255.0).astype(np.int64)
    restored = restore_label_map(model_labels, prepared.geometry)
    assert restored.dtype == np.uint8 and restored.shape == vol.array.shape
    np.testing.assert_array_equal(restored, source_labels)


def test_restore_without_resampling_is_identity_in_every_orientation() -> None:
    rng = np.random.default_rng(5)
    canonical = rng.integers(0, 5, size=(5, 6, 7)).astype(np.uint8)
    for direction in rotations():
        vol = sample_in_orientation(canonical, (2.0, 0.7, 0.9), direction)
        prepared = prepare(vol, ct_spec(target_spacing_mm=(2.0, 0.7, 0.9), window=(0.0, 255.0)))
        np.testing.assert_allclose(prepared.array[0] * 255.0, canonical, atol=1e-3)
        restored = restore_label_map(np.rint(prepared.array[0] * 255.0).astype(np.int32), prepared.geometry)
        np.testing.assert_array_equal(restored, vol.array.astype(np.uint8))


def _spheres(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Canonical labels: two balls defined in mm (not aligned to any grid)."""
    z, y, x = np.meshgrid(*((np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    labels = np.zeros(shape, np.uint8)
    labels[(z - 20) ** 2 + (y - 14) ** 2 + (x - 12) ** 2 < 8.0**2] = 1
    labels[(z - 30) ** 2 + (y - 30) ** 2 + (x - 28) ** 2 < 6.0**2] = 2
    return labels


@pytest.mark.parametrize("index", [0, 5, 11, 17, 23])
def test_restore_after_fractional_resampling_keeps_blobs_in_place(index: int) -> None:
    direction = rotations()[index]
    spacing = (2.5, 0.9, 0.8)  # canonical
    canonical = _spheres((20, 45, 50), spacing)
    vol = sample_in_orientation(canonical, spacing, direction)
    source_labels = vol.array.astype(np.uint8)
    spec = ct_spec(target_spacing_mm=(1.7, 1.3, 1.1), window=(0.0, 255.0))
    geometry = prepare(vol, spec).geometry
    model_labels = np.zeros(geometry.resampled_shape, np.uint8)
    for value in (1, 2):  # one channel per label, thresholded: what an argmax would give
        mask_vol = Volume(array=(vol.array == value).astype(np.float32), spacing=vol.spacing, origin=vol.origin,
                          direction=vol.direction, modality="CT")
        mask = prepare(mask_vol, ct_spec(target_spacing_mm=(1.7, 1.3, 1.1), window=(0.0, 1.0))).array[0] >= 0.5
        model_labels[mask] = value
    restored = restore_label_map(model_labels, geometry)
    assert restored.shape == source_labels.shape
    for value in (1, 2):
        a, b = restored == value, source_labels == value
        dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
        assert dice > 0.9, (value, dice)
        centroid_a, centroid_b = np.argwhere(a).mean(axis=0), np.argwhere(b).mean(axis=0)
        np.testing.assert_allclose(centroid_a, centroid_b, atol=0.5)


def _scanned_stats(restored: np.ndarray, n_labels: int) -> list[tuple[int, tuple[int, ...]]]:
    out = []
    for value in range(1, n_labels):
        where = np.argwhere(restored == value)
        bbox = tuple(int(v) for v in where.min(axis=0)) + tuple(int(v) + 1 for v in where.max(axis=0)) if len(where) else ()
        out.append((len(where), bbox))
    return out


@pytest.mark.parametrize("index", range(24))
@pytest.mark.parametrize("target", [(1.7, 1.3, 1.1), (3.0, 0.6, 2.2), (0.9, 0.45, 0.4)])
def test_source_grid_stats_equal_those_of_the_restored_map(index: int, target: tuple[float, float, float]) -> None:
    # down-, up- and mixed resampling in every orientation; labels 3 and 5 absent, 4 a single voxel
    rng = np.random.default_rng(index)
    vol = sample_in_orientation(np.zeros((9, 17, 14), np.uint8), (2.5, 0.9, 0.8), rotations()[index])
    geometry = prepare(vol, ct_spec(target_spacing_mm=target, window=(0.0, 1.0))).geometry
    model = rng.integers(0, 3, size=geometry.resampled_shape).astype(np.uint8)
    model[tuple(n // 2 for n in geometry.resampled_shape)] = 4
    expected = _scanned_stats(restore_label_map(model, geometry), 6)
    assert source_grid_label_stats(model, geometry, 6) == expected
    assert expected[2] == (0, ()) and expected[4] == (0, ())


def test_source_grid_stats_2d_and_shape_check() -> None:
    prepared = prepare(volume(np.ones((3, 10, 12)), modality="MR"), mr2d_spec(target_size=(5, 6)))
    labels = np.zeros((5, 6), np.uint8)
    labels[1:3, 2:4] = 1
    stats = source_grid_label_stats(labels, prepared.geometry, 3)
    assert stats == _scanned_stats(restore_label_map(labels, prepared.geometry), 3)
    assert stats[0][0] == 16 and stats[1] == (0, ())
    geometry_3d = prepare(volume(np.ones((6, 6, 6))), ct_spec(target_spacing_mm=(2.0, 2.0, 2.0))).geometry
    with pytest.raises(PreprocessError, match="does not match the model-space shape"):
        source_grid_label_stats(np.zeros((2, 2, 2), np.uint8), geometry_3d, 2)


def test_restore_2d_fills_the_source_slice() -> None:
    rng = np.random.default_rng(2)
    array = rng.normal(size=(3, 10, 12)).astype(np.float32)
    direction = np.diag([-1.0, -1.0, 1.0])  # prone: both in-plane axes flipped
    prepared = prepare(volume(array, direction=direction, modality="MR"), mr2d_spec(target_size=(5, 6)))
    labels = np.zeros((5, 6), np.int64)
    labels[0, 0] = 1  # model-space top-left: canonical rows 0-1, cols 0-1
    restored = restore_label_map(labels[None], prepared.geometry)
    assert restored.shape == (3, 10, 12)
    assert restored[[0, 2]].max() == 0
    expected = np.zeros((10, 12), np.uint8)
    expected[-2:, -2:] = 1  # flipped back to the source's bottom-right
    np.testing.assert_array_equal(restored[1], expected)


def test_restore_rejects_wrong_shape_and_values() -> None:
    prepared = prepare(volume(np.zeros((4, 4, 4))), ct_spec())
    with pytest.raises(PreprocessError, match="shape"):
        restore_label_map(np.zeros((4, 4, 5), np.int64), prepared.geometry)
    with pytest.raises(PreprocessError, match="0..255"):
        restore_label_map(np.full((4, 4, 4), 300, np.int64), prepared.geometry)
    with pytest.raises(PreprocessError, match="integers"):
        restore_label_map(np.zeros((4, 4, 4), np.float32), prepared.geometry)


# --- sliding window -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "patch", "overlap", "expected"),
    [
        (10, 4, 0.25, [0, 3, 6]),
        (10, 4, 0.5, [0, 2, 4, 6]),
        (10, 4, 0.0, [0, 4, 6]),
        (4, 4, 0.5, [0]),
        (3, 4, 0.5, [0]),
        (5, 4, 0.5, [0, 1]),
        (200, 96, 0.25, [0, 72, 104]),
    ],
)
def test_patch_starts(size: int, patch: int, overlap: float, expected: list[int]) -> None:
    assert patch_starts(size, patch, overlap) == expected


def test_patch_starts_cover_with_overlap() -> None:
    for size, patch, overlap in itertools.product((1, 7, 64, 97, 300), (1, 8, 64, 96), (0.0, 0.25, 0.5, 0.9)):
        starts = patch_starts(size, patch, overlap)
        assert starts[0] == 0
        assert starts[-1] == max(size - patch, 0)
        assert all(b > a for a, b in itertools.pairwise(starts))
        step = max(1, int(patch * (1 - overlap)))
        assert all(b - a <= step for a, b in itertools.pairwise(starts))


def test_patch_starts_rejects_bad_overlap() -> None:
    with pytest.raises(PreprocessError):
        patch_starts(10, 4, 1.0)


def test_gaussian_importance_map() -> None:
    w = gaussian_importance_map((9, 8, 5))
    assert w.shape == (9, 8, 5) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[4, 3, 2] == w.max() and w[4, 4, 2] == w.max()  # centre (odd) and central pair (even)
    np.testing.assert_array_equal(w, w[::-1, ::-1, ::-1])
    assert w[0, 0, 0] < w[4, 3, 2]


def _linear(batch: np.ndarray) -> np.ndarray:
    """A pointwise two-channel "model": logits (2x + 1, -x)."""
    x = batch[:, 0]
    return np.stack([2.0 * x + 1.0, -x], axis=1)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_sliding_window_equals_direct_prediction_for_pointwise_models(overlap: float) -> None:
    image = np.random.default_rng(0).normal(size=(1, 20, 23, 17)).astype(np.float32)
    out = sliding_window_inference(image, (8, 8, 8), overlap, _linear, batch_size=3)
    assert out.shape == (2, 20, 23, 17) and out.dtype == np.float32
    np.testing.assert_allclose(out, _linear(image[None])[0], rtol=1e-5, atol=1e-5)


def test_sliding_window_pads_volumes_smaller_than_the_patch() -> None:
    image = np.random.default_rng(1).normal(size=(1, 3, 12, 5)).astype(np.float32)
    seen: list[np.ndarray] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return _linear(batch)

    out = sliding_window_inference(image, (8, 8, 8), 0.25, predict)
    assert out.shape == (2, 3, 12, 5)
    np.testing.assert_allclose(out, _linear(image[None])[0], rtol=1e-5, atol=1e-5)
    assert all(b.shape == (1, 1, 8, 8, 8) for b in seen)
    # z: 3 -> 8 padded 2 before, 3 after, with the image minimum
    first = seen[0][0, 0]
    np.testing.assert_array_equal(first[:2], image.min())
    np.testing.assert_array_equal(first[5:], image.min())
    np.testing.assert_array_equal(first[2:5, :, 1:6], image[0, :, :8, :])


def test_sliding_window_reads_a_reused_backend_buffer_without_writing_it() -> None:
    # Backends may hand back their own output buffer, overwritten by the next call (OpenVINO's
    # shared outputs): each patch must be consumed before the next call and never written to.
    image = np.random.default_rng(3).normal(size=(1, 13, 21, 18)).astype(np.float32)
    shared = np.empty((1, 2, 6, 8, 8), dtype=np.float32)
    snapshots: list[np.ndarray] = []

    def reusing_backend(batch: np.ndarray) -> np.ndarray:
        if snapshots:  # what was handed out last time is unchanged by the blending
            np.testing.assert_array_equal(shared, snapshots[-1])
        shared.setflags(write=True)
        shared[...] = _linear(batch)
        shared.setflags(write=False)  # a write by the sliding window would raise
        snapshots.append(shared.copy())
        return shared

    out = sliding_window_inference(image, (6, 8, 8), 0.5, reusing_backend)
    fresh = sliding_window_inference(image, (6, 8, 8), 0.5, _linear)
    assert len(snapshots) > 8
    np.testing.assert_array_equal(out, fresh)
    np.testing.assert_allclose(out, _linear(image[None])[0], rtol=1e-5, atol=1e-5)


def test_sliding_window_reports_non_finite_logits_from_any_patch() -> None:
    image = np.zeros((1, 12, 16, 16), np.float32)
    for bad_call, value in ((0, np.nan), (3, np.inf), (7, -np.inf)):
        calls = iter(range(100))

        def predict(batch: np.ndarray, calls: Iterator[int] = calls, bad_call: int = bad_call,
                    value: float = value) -> np.ndarray:
            out = _linear(batch)
            if next(calls) == bad_call:
                out[0, 1, 2, 3, 4] = value  # one voxel of one patch
            return out

        with pytest.raises(BackendError, match="non-finite"):
            sliding_window_inference(image, (6, 8, 8), 0.0, predict)


def test_sliding_window_is_batch_size_invariant() -> None:
    image = np.random.default_rng(2).normal(size=(2, 14, 19, 11)).astype(np.float32)
    calls: list[int] = []

    def context_model(batch: np.ndarray) -> np.ndarray:
        # depends on the whole patch (its mean), so blending weights matter
        calls.append(batch.shape[0])
        means = batch.mean(axis=(1, 2, 3, 4), keepdims=True)
        return np.concatenate([batch[:, :1] * means, batch[:, 1:] - means, batch[:, :1] ** 2], axis=1)

    results = [sliding_window_inference(image, (6, 8, 8), 0.5, context_model, batch_size=b) for b in (1, 2, 4)]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    n_patches = len(patch_starts(14, 6, 0.5)) * len(patch_starts(19, 8, 0.5)) * len(patch_starts(11, 8, 0.5))
    assert calls[:n_patches] == [1] * n_patches
    assert sum(calls) == 3 * n_patches
    assert results[0].shape == (3, 14, 19, 11)


def test_sliding_window_rejects_bad_model_output() -> None:
    image = np.zeros((1, 8, 8, 8), np.float32)
    with pytest.raises(BackendError, match="shape"):
        sliding_window_inference(image, (4, 4, 4), 0.0, lambda b: b[:, :, :2])
    with pytest.raises(BackendError, match="non-finite"):
        sliding_window_inference(image, (4, 4, 4), 0.0, lambda b: b * np.nan)
    with pytest.raises(PreprocessError):
        sliding_window_inference(image[0], (4, 4, 4), 0.0, _linear)
