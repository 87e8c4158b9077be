"""agent.imaging.volume: DICOM series -> Volume (sorting, checks, rescale, decoding, multi-frame)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from agent.core.errors import MalformedDicomError, UnsupportedDicomError, VolumeError
from agent.core.modelspec import InputSpec
from agent.core.types import Volume
from agent.imaging import build_volume, load_series, prepare, read_datasets

CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
PATIENT_NAME = "SECRETNAME^TESTPATIENT"
PATIENT_ID = "PID-SECRET-4711"
STUDY_UID = "1.2.826.0.1.3680043.8.498.100"
SERIES_UID = "1.2.826.0.1.3680043.8.498.200"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --- synthetic DICOM --------------------------------------------------------------------------


def _base(sop_class: UID, sop_uid: str, series_uid: str = SERIES_UID) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "SECRET HOSPITAL"
    ds.StudyDate = "20240102"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Scanner 9000"
    ds.KVP = "120"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SeriesDescription = "ABD PORTAL"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def make_slice(
    pixels: np.ndarray,
    *,
    ipp: Sequence[float] | None,
    iop: Sequence[float] | None = AXIAL,
    pixel_spacing: Sequence[float] | None = (0.5, 0.5),
    sop_uid: str | None = None,
    series_uid: str = SERIES_UID,
    slope: float | None = None,
    intercept: float | None = None,
    thickness: float | None = 2.0,
    instance_number: int = 1,
) -> Dataset:
    """One single-frame CT slice with signed 16-bit stored ``pixels`` (rows, cols)."""
    ds = _base(CT_STORAGE, sop_uid or generate_uid(), series_uid)
    ds.InstanceNumber = instance_number
    if ipp is not None:
        ds.ImagePositionPatient = [f"{v:.6g}" for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in iop]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = f"{thickness:.6g}"
    if slope is not None:
        ds.RescaleSlope = f"{slope:.6g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:.6g}"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def write(tmp_path: Path, datasets: Sequence[Dataset]) -> list[Path]:
    paths = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i:04d}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_stack(
    n: int = 5,
    shape: tuple[int, int] = (6, 7),
    step: float = 2.0,
    z0: float = -10.0,
    seed: int = 0,
    **kwargs: object,
) -> tuple[list[Dataset], np.ndarray]:
    """``n`` axial slices at z0, z0 + step, ...; returns (datasets in ascending order, stored (n, r, c))."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(-1000, 3000, size=(n, *shape)).astype(np.int16)
    datasets = [
        make_slice(stored[k], ipp=(-20.0, -30.0, z0 + k * step), instance_number=k + 1, **kwargs)  # type: ignore[arg-type]
        for k in range(n)
    ]
    return datasets, stored


def assert_no_phi(message: str) -> None:
    assert PATIENT_NAME not in message
    assert "SECRETNAME" not in message
    assert PATIENT_ID not in message
    assert "SECRET HOSPITAL" not in message


# --- ordering, rescale, spacing ---------------------------------------------------------------


def test_axial_series_geometry_and_rescale(tmp_path: Path) -> None:
    datasets, stored = axial_stack(slope=2.5, intercept=-1024.0, pixel_spacing=(0.7, 0.9), step=2.5)
    vol = load_series(write(tmp_path, datasets))
    assert vol.array.dtype == np.float32
    assert vol.array.flags.c_contiguous
    assert vol.array.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) * 2.5 - 1024.0)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.9))
    assert vol.origin == pytest.approx((-20.0, -30.0, -10.0))
    np.testing.assert_allclose(np.array(vol.direction), np.eye(3))
    assert vol.modality == "CT"
    assert vol.series_uid == SERIES_UID and vol.study_uid == STUDY_UID
    assert vol.voxel_volume_ml == pytest.approx(2.5 * 0.7 * 0.9 / 1000)


def test_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    datasets, stored = axial_stack(n=3)
    params = [(1.0, -1024.0), (2.0, -2048.0), (0.5, 10.0)]
    for ds, (slope, intercept) in zip(datasets, params, strict=True):
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    vol = load_series(write(tmp_path, datasets))
    for k, (slope, intercept) in enumerate(params):
        np.testing.assert_array_equal(vol.array[k], stored[k].astype(np.float32) * slope + intercept)


def test_missing_rescale_means_identity(tmp_path: Path) -> None:
    datasets, stored = axial_stack(n=3)
    vol = load_series(write(tmp_path, datasets))
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32))


def test_reversed_and_shuffled_order_give_the_same_volume(tmp_path: Path) -> None:
    datasets, stored = axial_stack(n=9, slope=1.0, intercept=-1024.0)
    paths = write(tmp_path, datasets)
    ref = load_series(paths)
    shuffled = list(paths)
    random.Random(3).shuffle(shuffled)
    assert shuffled != paths
    for order in (list(reversed(paths)), shuffled):
        vol = load_series(order)
        np.testing.assert_array_equal(vol.array, ref.array)
        assert vol.origin == ref.origin and vol.spacing == ref.spacing and vol.direction == ref.direction
    np.testing.assert_array_equal(ref.array, stored.astype(np.float32) - 1024.0)


def test_descending_acquisition_is_sorted_ascending(tmp_path: Path) -> None:
    # Positions written head to feet with instance numbers increasing: the volume is still
    # ascending along the normal and its origin is the lowest slice.
    datasets, stored = axial_stack(n=4, step=-3.0, z0=30.0)
    vol = load_series(write(tmp_path, datasets))
    np.testing.assert_array_equal(vol.array, stored[::-1].astype(np.float32))
    assert vol.origin == pytest.approx((-20.0, -30.0, 21.0))
    assert vol.spacing[0] == pytest.approx(3.0)


def test_meta_is_allow_listed_and_phi_free(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=3, pixel_spacing=(0.7, 0.9))
    vol = load_series(write(tmp_path, datasets))
    meta = dict(vol.meta)
    assert meta["manufacturer"] == "ACME"
    assert meta["manufacturer_model"] == "Scanner 9000"
    assert meta["kvp"] == 120.0
    assert meta["slice_thickness"] == 2.0
    assert meta["pixel_spacing"] == pytest.approx((0.7, 0.9))
    assert (meta["rows"], meta["columns"], meta["n_slices"]) == (6, 7, 3)
    assert meta["body_part"] == "ABDOMEN"
    assert meta["series_description"] == "ABD PORTAL"
    text = repr(meta)
    assert_no_phi(text)
    assert "19700101" not in text and "20240102" not in text
    assert not any(k.startswith(("patient", "institution", "study_date", "referring")) for k in meta)


# --- patient positions ------------------------------------------------------------------------

# Phantom box in LPS: axis counts and spacings chosen so every coordinate is an exact integer.
COUNTS = {0: 6, 1: 5, 2: 4}  # L, P, S
SPACINGS = {0: 1.0, 1: 2.0, 2: 3.0}


def phantom(points: np.ndarray) -> np.ndarray:
    """A value unique to every voxel of the box, so any flip or permutation is visible."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return x + 10 * y + 100 * z


def phantom_series(row: Sequence[float], col: Sequence[float]) -> list[Dataset]:
    """The phantom box acquired with slices of orientation (row, col), in acquisition order."""
    row_v, col_v = np.array(row, dtype=float), np.array(col, dtype=float)
    normal = np.cross(row_v, col_v)
    dirs = [row_v, col_v, normal]
    axis = [int(np.argmax(np.abs(d))) for d in dirs]
    corner = np.zeros(3)
    for d, p in zip(dirs, axis, strict=True):
        corner[p] = 0.0 if d[p] > 0 else (COUNTS[p] - 1) * SPACINGS[p]
    n_cols, n_rows, n_slices = (COUNTS[p] for p in axis)
    s_col, s_row, s_slice = (SPACINGS[p] for p in axis)
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    series_uid = generate_uid()
    datasets = []
    for k in range(n_slices):
        ipp = corner + k * s_slice * normal
        points = ipp + c[..., None] * s_col * row_v + r[..., None] * s_row * col_v
        datasets.append(
            make_slice(
                phantom(points).astype(np.int16),
                ipp=ipp,
                iop=(*row, *col),
                pixel_spacing=(s_row, s_col),
                series_uid=series_uid,
                instance_number=k + 1,
            )
        )
    return datasets


POSITIONS = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
}


def _voxel_points(vol: Volume) -> np.ndarray:
    """Patient coordinates of every voxel from origin/direction/spacing (ITK convention)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in vol.array.shape), indexing="ij")
    index_mm = np.stack([i * vol.spacing[2], j * vol.spacing[1], k * vol.spacing[0]], axis=-1)
    return np.asarray(vol.origin) + index_mm @ np.asarray(vol.direction).T


@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_volume_geometry_maps_voxels_to_patient_space(tmp_path: Path, position: str) -> None:
    row, col = POSITIONS[position]
    datasets = phantom_series(row, col)
    random.Random(1).shuffle(datasets)
    vol = load_series(write(tmp_path, datasets))
    # array value at every voxel == phantom at the patient point origin + D @ (index * spacing)
    np.testing.assert_array_equal(vol.array, phantom(_voxel_points(vol)).astype(np.float32))
    assert np.linalg.det(np.asarray(vol.direction)) == pytest.approx(1.0)


def test_every_patient_position_canonicalises_to_the_same_array(tmp_path: Path) -> None:
    spec = InputSpec(
        modality="CT",
        sop_classes=(str(CT_STORAGE),),
        dims=3,
        target_spacing_mm=(SPACINGS[2], SPACINGS[1], SPACINGS[0]),
        normalisation="window",
        window=(0.0, 1000.0),
        patch_size=(4, 4, 4),
    )
    kz, ky, kx = np.meshgrid(*(np.arange(COUNTS[p]) for p in (2, 1, 0)), indexing="ij")
    lps = np.stack([kx * SPACINGS[0], ky * SPACINGS[1], kz * SPACINGS[2]], axis=-1)
    expected = (phantom(lps) / 1000.0).astype(np.float32)
    for position, (row, col) in POSITIONS.items():
        folder = tmp_path / position
        folder.mkdir()
        prepared = prepare(load_series(write(folder, phantom_series(row, col))), spec)
        assert prepared.array.shape == (1, 4, 5, 6), position
        np.testing.assert_allclose(prepared.array[0], expected, rtol=0, atol=1e-6, err_msg=position)


# --- consistency errors -----------------------------------------------------------------------


def _expect_volume_error(tmp_path: Path, datasets: Sequence[Dataset], *fragments: str) -> str:
    paths = write(tmp_path, datasets)
    with pytest.raises(VolumeError) as info:
        load_series(paths)
    message = str(info.value)
    assert SERIES_UID in message
    for fragment in fragments:
        assert fragment in message, message
    assert_no_phi(message)
    return message


def test_gap_raises_naming_series_and_gap(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=6, step=2.0)
    del datasets[3]
    _expect_volume_error(tmp_path, datasets, "gap of 4.000 mm", "median gap is 2.000 mm")


def test_small_position_jitter_is_tolerated(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=5, step=2.0)
    datasets[2].ImagePositionPatient = ["-20", "-30", "-5.99"]  # 0.01 mm off
    vol = load_series(write(tmp_path, datasets))
    assert vol.spacing[0] == pytest.approx(2.0, abs=0.01)


def test_two_instances_at_one_position_raise(tmp_path: Path) -> None:
    datasets, stored = axial_stack(n=4)
    datasets.append(make_slice(stored[1], ipp=(-20.0, -30.0, -8.0), instance_number=9))
    _expect_volume_error(tmp_path, datasets, "same position")


def test_the_same_instance_twice_is_read_once(tmp_path: Path) -> None:
    datasets, stored = axial_stack(n=4)
    paths = write(tmp_path, datasets)
    vol = load_series([*paths, paths[2]])
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32))


def test_mixed_sizes_raise(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=4)
    datasets[2] = make_slice(np.zeros((8, 7), np.int16), ipp=(-20.0, -30.0, -6.0))
    _expect_volume_error(tmp_path, datasets, "mixed image sizes")


def test_mixed_orientation_raises(tmp_path: Path) -> None:
    datasets, stored = axial_stack(n=4)
    datasets[1].ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    _expect_volume_error(tmp_path, datasets, "ImageOrientationPatient")


def test_mixed_pixel_spacing_raises(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=4)
    datasets[3].PixelSpacing = ["0.6", "0.5"]
    _expect_volume_error(tmp_path, datasets, "PixelSpacing")


def test_positions_missing_on_multislice_raise(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=3)
    del datasets[1].ImagePositionPatient
    _expect_volume_error(tmp_path, datasets, "ImagePositionPatient")


def test_sheared_stack_raises(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=4)
    for k, ds in enumerate(datasets):  # 1 mm in-plane shift per slice, like a gantry tilt
        ds.ImagePositionPatient = ["-20", str(-30 + k), str(-10 + 2 * k)]
    _expect_volume_error(tmp_path, datasets, "not stacked")


def test_other_series_mixed_in_raise(tmp_path: Path) -> None:
    datasets, stored = axial_stack(n=3)
    datasets.append(make_slice(stored[0], ipp=(-20.0, -30.0, -4.0), series_uid="1.2.3.999"))
    message = _expect_volume_error(tmp_path, datasets, "1.2.3.999")
    assert "other series" in message


def test_empty_series_raises() -> None:
    with pytest.raises(VolumeError):
        build_volume([])


# --- single slices ----------------------------------------------------------------------------


def test_single_slice_without_geometry_gets_identity(tmp_path: Path) -> None:
    ds = make_slice(np.arange(12, dtype=np.int16).reshape(3, 4), ipp=None, iop=None, pixel_spacing=(0.8, 0.6), thickness=None)
    vol = load_series(write(tmp_path, [ds]))
    assert vol.array.shape == (1, 3, 4)
    assert vol.spacing == pytest.approx((1.0, 0.8, 0.6))
    assert vol.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(np.array(vol.direction), np.eye(3))


def test_ct_small_single_slice_in_hounsfield() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    vol = load_series([path])
    assert vol.array.shape == (1, 128, 128)
    np.testing.assert_array_equal(vol.array[0], ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert vol.spacing == pytest.approx((float(ds.SliceThickness), 0.661468, 0.661468))
    assert vol.origin == pytest.approx((-158.135803, -179.035797, -75.699997))
    assert vol.modality == "CT"
    assert_no_phi(repr(dict(vol.meta)))
    assert str(ds.PatientName) not in repr(dict(vol.meta))


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_bundled_encodings_decode_like_the_uncompressed_twin(name: str) -> None:
    ref = load_series([Path(get_testdata_file("MR_small.dcm"))])
    vol = load_series([Path(get_testdata_file(name))])
    assert vol.array.shape == (1, 64, 64)
    np.testing.assert_array_equal(vol.array, ref.array)
    assert vol.spacing == ref.spacing and vol.origin == ref.origin
    assert vol.modality == "MR"


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_equals_uncompressed(tmp_path: Path, syntax: UID) -> None:
    # 32x32: OpenJPEG's default number of resolutions needs images larger than a few pixels
    datasets, stored = axial_stack(n=4, shape=(32, 32), slope=1.0, intercept=-1024.0)
    (tmp_path / "raw").mkdir()
    ref = load_series(write(tmp_path / "raw", datasets))
    for ds in datasets:
        ds.compress(syntax)
        assert ds.file_meta.TransferSyntaxUID == syntax
    (tmp_path / "enc").mkdir()
    vol = load_series(write(tmp_path / "enc", datasets))
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) - 1024.0)
    assert vol.meta["transfer_syntax"] == str(syntax)


def test_the_worker_applies_the_configured_decode_limit_before_the_codec_runs(tmp_path: Path) -> None:
    """Compressed pixel data is checked from its declared size against the decode limits the
    worker was given (``dicom.limits`` through each job's SeriesLimits) before decoding."""
    from agent.core.errors import LimitExceededError
    from agent.core.limits import DEFAULT_LIMITS, DecodeLimits
    from agent.imaging.volume import use_decode_limits

    datasets, _ = axial_stack(n=2, shape=(1024, 1024), slope=1.0, intercept=-1024.0)  # 2 MiB per slice
    for ds in datasets:
        ds.compress(RLELossless)
    paths = write(tmp_path, datasets)
    assert load_series(paths).array.shape == (2, 1024, 1024)  # the default limits take it
    try:
        use_decode_limits(DecodeLimits.from_mb(1, 100.0))
        with pytest.raises(LimitExceededError, match="max_decompressed_mb") as info:
            load_series(paths)
        assert datasets[0].SOPInstanceUID in str(info.value)
        assert_no_phi(str(info.value))
    finally:
        use_decode_limits(DEFAULT_LIMITS)


def test_transfer_syntax_without_decoder_is_unsupported() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder
    with pytest.raises(UnsupportedDicomError) as info:
        build_volume([ds])
    assert "1.2.840.10008.1.2.4.100" in str(info.value)
    assert str(ds.PatientName) not in str(info.value)


def test_missing_pixel_data_is_malformed(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=2)
    del datasets[1].PixelData
    with pytest.raises(MalformedDicomError) as info:
        load_series(write(tmp_path, datasets))
    assert datasets[1].SOPInstanceUID in str(info.value)
    assert_no_phi(str(info.value))


def test_truncated_pixel_data_is_malformed() -> None:
    path = Path(get_testdata_file("MR_truncated.dcm"))
    name = str(pydicom.dcmread(path, stop_before_pixels=True).PatientName)
    with pytest.raises(MalformedDicomError, match="cannot be decoded") as info:
        load_series([path])
    assert name not in str(info.value)


def test_unreadable_file_names_its_index(tmp_path: Path) -> None:
    datasets, _ = axial_stack(n=2)
    paths = write(tmp_path, datasets)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(MalformedDicomError) as info:
        read_datasets([paths[0], junk, paths[1]])
    assert "file #1" in str(info.value)


# --- enhanced multi-frame ---------------------------------------------------------------------


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def make_enhanced(stored: np.ndarray, z_positions: Sequence[float], frame_order: Sequence[int], *, slope: float, intercept: float) -> Dataset:
    """Enhanced CT instance holding ``stored[k]`` at ``z_positions[k]``, frames in ``frame_order``."""
    ds = _base(ENHANCED_CT_STORAGE, generate_uid())
    ds.NumberOfFrames = len(frame_order)
    ds.Rows, ds.Columns = stored.shape[1:]
    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [
            _item(
                PixelMeasuresSequence=DicomSequence([_item(PixelSpacing=["0.7", "0.9"], SliceThickness="2.5")]),
                PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=[str(v) for v in AXIAL])]),
                PixelValueTransformationSequence=DicomSequence(
                    [_item(RescaleSlope=str(slope), RescaleIntercept=str(intercept), RescaleType="HU")]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [
            _item(
                PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=["-20", "-30", str(z_positions[k])])]),
                FrameContentSequence=DicomSequence([_item(InStackPositionNumber=k + 1)]),
            )
            for k in frame_order
        ]
    )
    ds.PixelData = np.ascontiguousarray(stored[list(frame_order)], dtype="<i2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


@pytest.mark.parametrize("syntax", [None, RLELossless])
def test_enhanced_multiframe_matches_single_frame_series(tmp_path: Path, syntax: UID | None) -> None:
    n = 5
    rng = np.random.default_rng(7)
    stored = rng.integers(-500, 2000, size=(n, 6, 7)).astype(np.int16)
    z = [-10.0 + 2.5 * k for k in range(n)]
    enhanced = make_enhanced(stored, z, frame_order=[3, 0, 4, 1, 2], slope=2.0, intercept=-1024.0)
    if syntax is not None:
        enhanced.compress(syntax)
    (tmp_path / "mf").mkdir()
    vol = load_series(write(tmp_path / "mf", [enhanced]))
    singles = [
        make_slice(stored[k], ipp=(-20.0, -30.0, z[k]), pixel_spacing=(0.7, 0.9), slope=2.0, intercept=-1024.0)
        for k in range(n)
    ]
    ref = load_series(write(tmp_path, singles))
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) * 2.0 - 1024.0)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.9))
    assert vol.origin == pytest.approx(ref.origin)
    assert vol.direction == ref.direction
    assert vol.meta["n_slices"] == n and vol.meta["slice_thickness"] == 2.5


def test_enhanced_multiframe_gap_raises(tmp_path: Path) -> None:
    stored = np.zeros((3, 4, 4), np.int16)
    enhanced = make_enhanced(stored, [0.0, 2.0, 6.0], frame_order=[0, 1, 2], slope=1.0, intercept=0.0)
    _expect_volume_error(tmp_path, [enhanced], "gap of 4.000 mm")


# --- the native pixel fast path ---------------------------------------------------------------


def _native_ds(values: np.ndarray, allocated: int, stored: int, signed: bool, frames: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = values.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = values.astype(f"<u{allocated // 8}").tobytes()
    return ds


@pytest.mark.parametrize(("allocated", "stored", "signed"),
                         [(16, 12, False), (16, 12, True), (16, 16, True), (16, 16, False), (8, 8, False),
                          (8, 6, True), (32, 32, True), (32, 20, False)])
def test_native_fast_path_equals_pydicoms_decoder(allocated: int, stored: int, signed: bool) -> None:
    from pydicom.pixels import get_decoder

    from agent.imaging.volume import _native_pixels

    rng = np.random.default_rng(allocated * 100 + stored)
    # every bit pattern, high bits above BitsStored included (overlay garbage must be masked off)
    values = rng.integers(0, 2**allocated, size=(3, 5, 7), dtype=np.uint64)
    ds = _native_ds(values, allocated, stored, signed, frames=3)
    ours = _native_pixels(ds, ExplicitVRLittleEndian)
    assert ours is not None
    theirs = get_decoder(ExplicitVRLittleEndian).as_array(ds)[0]
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours.reshape(theirs.shape), theirs)


@pytest.mark.filterwarnings("ignore")  # several bundled files are deliberately non-conformant
def test_native_fast_path_matches_pydicom_on_its_test_files() -> None:
    from pydicom.data import DATA_ROOT
    from pydicom.pixels import get_decoder

    from agent.imaging.volume import _native_pixels

    checked = 0
    # the files bundled with pydicom (get_testdata_files() would also try to download others)
    for path in sorted((Path(DATA_ROOT) / "test_files").rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - some bundled files are deliberately broken
            continue
        ours = _native_pixels(ds, ts)
        if ours is None:
            continue  # big endian, compressed, colour: left to pydicom
        try:
            theirs = get_decoder(ts).as_array(ds)[0]
        except Exception:  # noqa: BLE001 - pydicom cannot decode it either (e.g. short pixel data)
            continue
        np.testing.assert_array_equal(ours.reshape(-1), theirs.reshape(-1), err_msg=str(path))
        checked += 1
    assert checked >= 8  # 9 of the bundled files are native monochrome (pydicom 3.x)


def test_native_fast_path_declines_short_or_unusual_data() -> None:
    from agent.imaging.volume import _native_pixels

    ds = _native_ds(np.zeros((4, 4)), 16, 12, False)
    ds.PixelData = ds.PixelData[:-2]  # truncated: pydicom's decoder reports it
    assert _native_pixels(ds, ExplicitVRLittleEndian) is None
    ds = _native_ds(np.zeros((4, 4)), 16, 12, False)
    ds.BitsAllocated = 12
    assert _native_pixels(ds, ExplicitVRLittleEndian) is None
    assert _native_pixels(_native_ds(np.zeros((4, 4)), 16, 16, False), str(RLELossless)) is None
