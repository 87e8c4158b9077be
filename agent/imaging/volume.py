"""DICOM instances of one series -> a :class:`~agent.core.types.Volume` in patient space.

The one place where slices are read, decoded, sorted, checked and rescaled, used by the daemon
and by the deploy toolkit alike (no train/serve skew). numpy/pydicom only.

Geometry conventions (DICOM patient coordinates are LPS: +x left, +y posterior, +z head):

* ``row_dir = IOP[0:3]`` is the direction of increasing column index (array x),
  ``col_dir = IOP[3:6]`` the direction of increasing row index (array y) and
  ``n = row_dir x col_dir`` the slice normal (array z).
* Slices are sorted by ``ImagePositionPatient . n`` ascending, so ``Volume.direction`` (columns
  ``row_dir, col_dir, n``) is always right-handed and ``origin`` is the first slice's position.

Consistency rules (a series that breaks one raises :class:`VolumeError` naming the series UID,
never a patient field):

* all frames share ImageOrientationPatient (within ``IOP_TOLERANCE``), Rows/Columns and
  PixelSpacing (relative ``SPACING_RTOL``);
* the same SOPInstanceUID (and frame) received twice is read once; two *different* instances at
  the same position (within ``DUPLICATE_TOLERANCE_MM``) are an error, because picking one
  silently (by AcquisitionNumber or InstanceNumber) can pick the wrong reconstruction;
* slices are stacked along the normal: an in-plane offset between slices beyond
  ``SHEAR_TOLERANCE`` pixel (gantry tilt, shifted stacks) is an error rather than a silently
  sheared volume;
* slice spacing is uniform: every gap between neighbours is within ``GAP_RTOL`` (plus
  ``GAP_ATOL_MM``) of the median gap (a missing slice is a 100 % deviation); the z spacing is
  the mean gap;
* a series of one slice may lack ImagePositionPatient/ImageOrientationPatient/PixelSpacing
  (identity orientation, origin 0, spacing 1 mm are assumed); several slices may not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder  # type: ignore[attr-defined]  # public API, not re-exported as such

from agent.core.errors import LimitExceededError, MalformedDicomError, UnsupportedDicomError, VolumeError
from agent.core.limits import DEFAULT_LIMITS, DecodeLimits, declared_pixel_bytes
from agent.core.types import Volume

#: largest absolute difference between direction cosines of frames of one series
IOP_TOLERANCE = 1e-3
#: largest relative difference of PixelSpacing between frames
SPACING_RTOL = 1e-3
#: two frames closer than this along the normal are at "the same position" (mm)
DUPLICATE_TOLERANCE_MM = 1e-2
#: largest relative deviation of one slice gap from the median gap
GAP_RTOL = 0.05
#: plus this much absolute slack (mm), for positions written with few decimals
GAP_ATOL_MM = 1e-2
#: largest in-plane offset between slices, as a fraction of the smaller pixel spacing
SHEAR_TOLERANCE = 0.1

_ENHANCED_GROUPS = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")

#: uncompressed little-endian syntaxes whose PixelData bytes are the pixel values as they are
_NATIVE_LE = frozenset({
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (inflated when read)
})


def read_datasets(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    """Read DICOM files (with pixel data) in the given order.

    Takes file paths; returns one ``pydicom.Dataset`` per path. Raises
    :class:`MalformedDicomError` naming the file's index (and SOPInstanceUID when the file could
    be parsed that far) for an unreadable or non-DICOM file; never a patient field.
    """
    datasets: list[pydicom.Dataset] = []
    for index, path in enumerate(paths):
        try:
            datasets.append(pydicom.dcmread(Path(path)))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            # The exception text is left out on purpose: pydicom messages can quote element
            # values. The chained exception keeps the detail for local debugging.
            sop = _peek_sop_uid(Path(path))
            where = f"file #{index}" + (f" (SOPInstanceUID {sop})" if sop else "")
            raise MalformedDicomError(f"{where}: not a readable DICOM file ({type(exc).__name__})") from exc
    return datasets


def load_series(paths: Sequence[Path]) -> Volume:
    """``build_volume(read_datasets(paths))``: file paths of one series -> Volume."""
    return build_volume(read_datasets(paths))


@dataclass
class _Frame:
    """One 2D image of the series (a single-frame instance or one frame of a multi-frame one)."""

    ds_index: int
    frame: int  # frame index inside its instance (0 for single-frame)
    sop_uid: str
    position: npt.NDArray[np.float64] | None  # (3,) IPP, mm
    orientation: npt.NDArray[np.float64] | None  # (6,) IOP
    pixel_spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x), mm
    thickness: float | None
    slope: float
    intercept: float
    rows: int
    columns: int


def build_volume(datasets: Sequence[pydicom.Dataset]) -> Volume:
    """Assemble the instances of one series into a Volume.

    Takes parsed datasets (single-frame CT/MR slices in any order, or enhanced multi-frame
    instances); returns a Volume with ``array`` (z, y, x) float32 in modality units (Rescale
    Slope/Intercept applied per frame), ``spacing`` (z, y, x) mm, ``origin``, ``direction`` and
    non-PHI ``meta``. Raises VolumeError for instances that do not form one regular volume,
    MalformedDicomError for missing pixel data or corrupt pixels, UnsupportedDicomError for a
    transfer syntax or photometric interpretation we cannot decode.
    """
    if not datasets:
        raise VolumeError("no instances to build a volume from")
    first = datasets[0]
    series_uid = str(first.get("SeriesInstanceUID", ""))
    study_uid = str(first.get("StudyInstanceUID", ""))
    other_series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets} - {series_uid}
    if other_series:
        raise VolumeError(
            f"series {series_uid}: instances of other series mixed in ({', '.join(sorted(other_series))})"
        )

    frames = _dedupe(series_uid, [f for i, ds in enumerate(datasets) for f in _frames_of(i, ds)])
    _check_in_plane(series_uid, frames)
    frames, spacing_z, origin, direction = _sort_and_check_geometry(series_uid, frames)

    rows, columns = frames[0].rows, frames[0].columns
    array = np.empty((len(frames), rows, columns), dtype=np.float32)
    # Decode each instance once, and drop its pixels after its last frame is copied, so peak
    # memory stays near the float32 volume (not volume + every decoded slice).
    remaining: dict[int, int] = {}
    for fr in frames:
        remaining[fr.ds_index] = remaining.get(fr.ds_index, 0) + 1
    decoded: dict[int, npt.NDArray[Any]] = {}  # ds index -> (frames, rows, cols), stored dtype
    for z, fr in enumerate(frames):
        if fr.ds_index not in decoded:
            decoded[fr.ds_index] = _decode(series_uid, datasets[fr.ds_index])
        pixels = decoded[fr.ds_index][fr.frame]
        # float32 arithmetic: exact for the integer stored values of CT/MR (< 2**24) and the usual
        # slopes, and half the memory of float64 for a 300-slice CT.
        np.multiply(pixels, np.float32(fr.slope), out=array[z], dtype=np.float32)
        array[z] += np.float32(fr.intercept)
        remaining[fr.ds_index] -= 1
        if remaining[fr.ds_index] == 0:
            del decoded[fr.ds_index]

    ps = frames[0].pixel_spacing or (1.0, 1.0)
    spacing = (float(spacing_z), float(ps[0]), float(ps[1]))
    return Volume(
        array=array,
        spacing=spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple((float(row[0]), float(row[1]), float(row[2])) for row in direction),
        modality=str(first.get("Modality", "")),
        study_uid=study_uid,
        series_uid=series_uid,
        meta=_meta(first, frames, ps),
    )


# --- reading frames ---------------------------------------------------------------------------


def _peek_sop_uid(path: Path) -> str:
    """SOPInstanceUID of a file that failed to read fully, or '' when even the header fails."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.get("SOPInstanceUID", ""))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
        return ""


def _floats(value: Any) -> npt.NDArray[np.float64] | None:
    """A multi-valued DS element as float64 array, or None when absent/empty/unparsable."""
    if value is None or value == "":
        return None
    try:
        seq = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        arr = np.array([float(v) for v in seq], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size and np.all(np.isfinite(arr)) else None


def _float_or_none(value: Any) -> float | None:
    arr = _floats(value)
    return float(arr[0]) if arr is not None and arr.size == 1 else None


def _item(ds: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    """First item of sequence ``keyword`` in ``ds``, or None."""
    if ds is None:
        return None
    seq = ds.get(keyword)
    if seq is None or len(seq) == 0:
        return None
    item: pydicom.Dataset = seq[0]  # ds.get is typed Any: the element's value, here a Sequence
    return item


def _fg_value(
    per_frame: pydicom.Dataset | None, shared: pydicom.Dataset | None, macro: str, keyword: str
) -> Any:
    """Attribute ``keyword`` of functional-group macro ``macro``: per-frame first, then shared."""
    for group in (per_frame, shared):
        item = _item(group, macro)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _frames_of(ds_index: int, ds: pydicom.Dataset) -> list[_Frame]:
    """Geometry of every frame of one instance (without decoding the pixels)."""
    sop_uid = str(ds.get("SOPInstanceUID", f"#{ds_index}"))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MalformedDicomError(f"instance {sop_uid}: no pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise MalformedDicomError(f"instance {sop_uid}: Rows/Columns/NumberOfFrames missing or invalid") from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise UnsupportedDicomError(
            f"instance {sop_uid}: {samples} samples per pixel (colour) images are not supported; "
            "models take monochrome CT/MR"
        )

    enhanced = any(k in ds for k in _ENHANCED_GROUPS)
    if n_frames > 1 and not enhanced:
        raise VolumeError(
            f"series {ds.get('SeriesInstanceUID', '')}: instance {sop_uid} has {n_frames} frames but "
            "no per-frame functional groups, so frame positions are unknown"
        )

    top_slope = _float_or_none(ds.get("RescaleSlope"))
    top_intercept = _float_or_none(ds.get("RescaleIntercept"))
    top_ps = _floats(ds.get("PixelSpacing"))
    frames: list[_Frame] = []
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    for f in range(n_frames):
        if enhanced:
            per = per_frame_seq[f] if per_frame_seq is not None and f < len(per_frame_seq) else None
            position = _floats(_fg_value(per, shared, "PlanePositionSequence", "ImagePositionPatient"))
            orientation = _floats(_fg_value(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient"))
            ps = _floats(_fg_value(per, shared, "PixelMeasuresSequence", "PixelSpacing"))
            thickness = _float_or_none(_fg_value(per, shared, "PixelMeasuresSequence", "SliceThickness"))
            slope = _float_or_none(_fg_value(per, shared, "PixelValueTransformationSequence", "RescaleSlope"))
            intercept = _float_or_none(
                _fg_value(per, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            )
            # Some writers keep the plane modules at the top level as well; use them as fallback.
            position = position if position is not None else _floats(ds.get("ImagePositionPatient"))
            orientation = orientation if orientation is not None else _floats(ds.get("ImageOrientationPatient"))
            ps = ps if ps is not None else top_ps
            thickness = thickness if thickness is not None else _float_or_none(ds.get("SliceThickness"))
            slope = slope if slope is not None else top_slope
            intercept = intercept if intercept is not None else top_intercept
        else:
            position = _floats(ds.get("ImagePositionPatient"))
            orientation = _floats(ds.get("ImageOrientationPatient"))
            ps, thickness = top_ps, _float_or_none(ds.get("SliceThickness"))
            slope, intercept = top_slope, top_intercept
        if position is not None and position.size != 3:
            raise MalformedDicomError(f"instance {sop_uid}: ImagePositionPatient has {position.size} values, not 3")
        if orientation is not None and orientation.size != 6:
            raise MalformedDicomError(
                f"instance {sop_uid}: ImageOrientationPatient has {orientation.size} values, not 6"
            )
        if ps is not None and (ps.size != 2 or np.any(ps <= 0)):
            raise MalformedDicomError(f"instance {sop_uid}: invalid PixelSpacing")
        frames.append(
            _Frame(
                ds_index=ds_index,
                frame=f,
                sop_uid=sop_uid,
                position=position,
                orientation=orientation,
                pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else None,
                thickness=thickness,
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
                rows=rows,
                columns=columns,
            )
        )
    return frames


def _native_pixels(ds: pydicom.Dataset, transfer_syntax: str) -> npt.NDArray[np.integer[Any]] | None:
    """The stored values of an uncompressed little-endian monochrome instance, straight from
    its PixelData bytes: what pydicom's native decoder returns (values masked to BitsStored,
    signed ones sign-extended; a test holds the two equal) at a tenth of its cost, which is a
    third of loading a 512x512 CT series. None for anything else: pydicom decodes those.
    """
    if transfer_syntax not in _NATIVE_LE or "PixelData" not in ds:
        return None
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        count = int(ds.get("NumberOfFrames", 1) or 1) * int(ds.Rows) * int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None  # pydicom's decoder names what is missing
    if allocated not in (8, 16, 32) or not 1 <= stored <= allocated or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    raw = ds.PixelData
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    if not isinstance(raw, bytes | bytearray) or len(raw) < count * dtype.itemsize:
        return None
    values: npt.NDArray[np.integer[Any]] = np.frombuffer(raw, dtype=dtype, count=count)
    unused = allocated - stored
    if unused:
        values = (values << unused) >> unused if signed else values & ((1 << stored) - 1)
    return values


def _decode(series_uid: str, ds: pydicom.Dataset) -> npt.NDArray[Any]:
    """Stored pixel values of every frame of ``ds`` as (frames, rows, cols).

    Compressed transfer syntaxes go through pydicom's decoders (pylibjpeg, openjpeg, rle, gdcm
    plugins); a syntax without an available decoder is UnsupportedDicomError, a decode failure
    of a supported one MalformedDicomError.
    """
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    native = _native_pixels(ds, str(ts or ""))
    decoder = None
    if native is None and ts is not None:  # the fast path needs no decoder (and no lookup)
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            raise UnsupportedDicomError(
                f"series {series_uid}: instance {sop_uid}: no decoder for transfer syntax {ts}"
            ) from exc
        if not decoder.is_available:
            raise UnsupportedDicomError(
                f"series {series_uid}: instance {sop_uid}: transfer syntax {ts} ({ts.name}) needs a "
                "decoder plugin that is not installed (pylibjpeg-openjpeg, pylibjpeg-rle, python-gdcm)"
            )
    if native is None:
        _check_declared_size(series_uid, sop_uid, ds)
    try:
        # The decoder directly rather than ``ds.pixel_array``, which would keep a cached copy
        # of every slice alive on the datasets for as long as the caller holds them.
        if native is not None:
            pixels = native
        else:
            pixels = decoder.as_array(ds)[0] if decoder is not None else ds.pixel_array
    except NotImplementedError as exc:
        raise UnsupportedDicomError(
            f"series {series_uid}: instance {sop_uid}: pixel data in a form pydicom cannot decode"
        ) from exc
    except (ValueError, RuntimeError, AttributeError, TypeError, KeyError, EOFError) as exc:
        raise MalformedDicomError(
            f"series {series_uid}: instance {sop_uid}: pixel data cannot be decoded ({type(exc).__name__})"
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if pixels.size != n_frames * rows * columns:
        raise MalformedDicomError(
            f"series {series_uid}: instance {sop_uid}: decoded {pixels.shape}, expected "
            f"{n_frames} x {rows} x {columns}"
        )
    return pixels.reshape(n_frames, rows, columns)


_decode_limits = DEFAULT_LIMITS


def use_decode_limits(limits: DecodeLimits) -> None:
    """The bound ``_check_declared_size`` applies from now on, in this process (the inference
    worker sets it from each job's ``SeriesLimits``, i.e. the configured ``dicom.limits``)."""
    global _decode_limits
    _decode_limits = limits


def _check_declared_size(series_uid: str, sop_uid: str, ds: pydicom.Dataset) -> None:
    """Refuse, before decoding, pixel data that declares more than the decode limits allow (a
    codec bomb: a small RLE or JPEG stream declaring huge Rows x Columns x Frames), raising
    ``LimitExceededError``; the listener refused such instances on arrival (0xC212), this is the
    worker's own bound for anything already in the spool."""
    try:
        declared = declared_pixel_bytes(int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1),
                                        int(ds.BitsAllocated), int(ds.get("SamplesPerPixel", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        return  # the decoder names what is missing
    raw = ds.get("PixelData")
    encoded = len(raw) if isinstance(raw, bytes | bytearray) else 0
    try:
        _decode_limits.check(declared, encoded, "the compressed pixel data")
    except LimitExceededError as exc:
        raise LimitExceededError(f"series {series_uid}: instance {sop_uid}: {exc}") from exc


# --- checks and sorting -----------------------------------------------------------------------


def _dedupe(series_uid: str, frames: list[_Frame]) -> list[_Frame]:
    """Drop repeated (SOPInstanceUID, frame) pairs: the same instance received twice."""
    seen: set[tuple[str, int]] = set()
    unique: list[_Frame] = []
    for fr in frames:
        key = (fr.sop_uid, fr.frame)
        if key in seen:
            continue  # a re-sent instance: identical by definition of the SOP Instance UID
        seen.add(key)
        unique.append(fr)
    if not unique:
        raise VolumeError(f"series {series_uid}: no frames")
    return unique


def _check_in_plane(series_uid: str, frames: list[_Frame]) -> None:
    """Same matrix size, pixel spacing and orientation on every frame."""
    ref = frames[0]
    for fr in frames[1:]:
        if (fr.rows, fr.columns) != (ref.rows, ref.columns):
            raise VolumeError(
                f"series {series_uid}: mixed image sizes ({ref.rows}x{ref.columns} and "
                f"{fr.rows}x{fr.columns}, instance {fr.sop_uid})"
            )
        if (fr.pixel_spacing is None) != (ref.pixel_spacing is None) or (
            fr.pixel_spacing is not None
            and ref.pixel_spacing is not None  # implied by the line above; said again for mypy
            and not np.allclose(fr.pixel_spacing, ref.pixel_spacing, rtol=SPACING_RTOL, atol=0.0)
        ):
            raise VolumeError(
                f"series {series_uid}: mixed PixelSpacing ({ref.pixel_spacing} and {fr.pixel_spacing}, "
                f"instance {fr.sop_uid})"
            )
        if (fr.orientation is None) != (ref.orientation is None) or (
            fr.orientation is not None
            and ref.orientation is not None  # implied by the line above; said again for mypy
            and float(np.max(np.abs(fr.orientation - ref.orientation))) > IOP_TOLERANCE
        ):
            raise VolumeError(
                f"series {series_uid}: mixed ImageOrientationPatient (instance {fr.sop_uid}); "
                "localizers or several stacks in one series"
            )


def _unit_axes(
    series_uid: str, iop: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit row direction, column direction and normal from an IOP."""
    row, col = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 1e-6 or nc < 1e-6 or abs(float(row @ col)) / (nr * nc) > 1e-2:
        raise VolumeError(f"series {series_uid}: ImageOrientationPatient is not two orthogonal directions")
    row, col = row / nr, col / nc
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _sort_and_check_geometry(
    series_uid: str, frames: list[_Frame]
) -> tuple[list[_Frame], float, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Sort frames along the normal and check the stack is regular.

    Returns (sorted frames, z spacing mm, origin (3,), direction 3x3 with columns row, col, n).
    """
    ref = frames[0]
    if len(frames) == 1:
        # A single slice (2D MR, one CT image): missing geometry gets identity/0 so 2D models can
        # still run; z spacing is the slice thickness (only used for volumes in ml).
        orientation = ref.orientation if ref.orientation is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
        row, col, normal = _unit_axes(series_uid, orientation)
        origin = ref.position if ref.position is not None else np.zeros(3)
        spacing_z = ref.thickness if ref.thickness is not None and ref.thickness > 0 else 1.0
        return frames, spacing_z, origin, np.column_stack([row, col, normal])

    missing = [fr.sop_uid for fr in frames if fr.position is None]
    if missing or ref.orientation is None:
        raise VolumeError(
            f"series {series_uid}: {len(frames)} slices but ImagePositionPatient/ImageOrientationPatient "
            f"missing (e.g. instance {missing[0] if missing else ref.sop_uid}); cannot order them"
        )
    if ref.pixel_spacing is None:
        raise VolumeError(f"series {series_uid}: PixelSpacing missing; cannot build a volume")
    row, col, normal = _unit_axes(series_uid, ref.orientation)
    # every frame has a position (checked above); the filter says so to the type checker
    positions = np.stack([fr.position for fr in frames if fr.position is not None])
    depth = positions @ normal
    # Stable sort on (depth, original order): ties are caught just below, so the order is only a
    # matter of determinism.
    order = np.argsort(depth, kind="stable")
    frames = [frames[i] for i in order]
    positions, depth = positions[order], depth[order]

    gaps = np.diff(depth)
    dup = np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        i = int(dup[0])
        raise VolumeError(
            f"series {series_uid}: instances {frames[i].sop_uid} and {frames[i + 1].sop_uid} are at the "
            f"same position ({depth[i]:.3f} mm along the slice normal); several acquisitions in one series?"
        )

    # In-plane offset of every slice from the line through the first one along the normal.
    rel = positions - positions[0]
    in_plane = rel - np.outer(rel @ normal, normal)
    shear = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if shear > SHEAR_TOLERANCE * min(ref.pixel_spacing):
        raise VolumeError(
            f"series {series_uid}: slices are not stacked along their normal (in-plane offset up to "
            f"{shear:.2f} mm; gantry tilt or shifted stacks are not supported)"
        )

    median = float(np.median(gaps))
    deviation = np.abs(gaps - median)
    bad = np.flatnonzero(deviation > GAP_RTOL * median + GAP_ATOL_MM)
    if bad.size:
        # Report the worst gap; on a tie the larger one (a missing slice is the usual cause).
        i = int(max(bad, key=lambda j: (deviation[j], gaps[j])))
        raise VolumeError(
            f"series {series_uid}: non-uniform slice spacing: gap of {gaps[i]:.3f} mm between slices "
            f"{i} and {i + 1} (at {depth[i]:.3f} and {depth[i + 1]:.3f} mm along the normal) where the "
            f"median gap is {median:.3f} mm; missing slices?"
        )
    # Mean spacing (first to last over n - 1) rather than the median: with jittered positions it
    # keeps the last slice where the file says it is.
    spacing_z = float((depth[-1] - depth[0]) / (len(frames) - 1))
    return frames, spacing_z, positions[0], np.column_stack([row, col, normal])


# --- metadata ---------------------------------------------------------------------------------


def _meta(ds: pydicom.Dataset, frames: list[_Frame], pixel_spacing: tuple[float, float]) -> dict[str, object]:
    """Acquisition metadata for drift monitoring and routing; an allow-list, so no patient,
    person, institution or date field can slip in."""

    def text(keyword: str) -> str:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()

    kernel = ds.get("ConvolutionKernel")
    if isinstance(kernel, MultiValue):
        kernel = "\\".join(str(k) for k in kernel)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "manufacturer": text("Manufacturer"),
        "manufacturer_model": text("ManufacturerModelName"),
        "slice_thickness": frames[0].thickness,
        "kvp": _float_or_none(ds.get("KVP")),
        "magnetic_field_strength": _float_or_none(ds.get("MagneticFieldStrength")),
        "convolution_kernel": "" if kernel is None else str(kernel).strip(),
        "pixel_spacing": (float(pixel_spacing[0]), float(pixel_spacing[1])),
        "rows": frames[0].rows,
        "columns": frames[0].columns,
        "n_slices": len(frames),
        "body_part": text("BodyPartExamined"),
        "series_description": text("SeriesDescription"),
        "sop_class_uid": text("SOPClassUID"),
        "transfer_syntax": "" if ts is None else str(ts),
    }
