"""Synthetic abdominal CT phantoms: anatomy in patient LPS space, sampled onto DICOM slice grids.

Public API: :func:`make_ct_phantom` takes a seed and optional knobs and returns a
:class:`CTPhantom` (the DICOM datasets, label mask, HU volume and ``truth.json`` content);
:func:`write_ct_series` writes one to a folder. :data:`IOP_BY_POSITION` is the orientation table
the CLI offers.

The anatomy (:mod:`deploy.synth.ct_anatomy`: body, fat, muscle wall, spine, ribs, vessels, liver,
spleen, kidneys, stomach, bowel gas) is a set of implicit shapes in *body-local* LPS millimetres
(x: patient left, y: posterior, z: superior; origin at the body axis, z = 0 near the renal hila).
Each series then draws an acquisition geometry (:mod:`deploy.synth.ct_acquisition`: patient
position, IOP, slice order, spacing, rescale, pixel representation) and
:mod:`deploy.synth.ct_render` samples that same anatomy at the voxel centres of its grid, so a
phantom is anatomically right whatever the orientation - which is exactly what the agent's volume
builder must undo. This module overrides the drawn values with the knobs and assembles the DICOM
datasets and ``truth.json``.

Labels are laid out as the agent's volume builder returns a series: slices sorted ascending by
IPP projected on ``n = cross(row_dir, col_dir)``, axis 1 along ``col_dir`` (rows), axis 2 along
``row_dir`` (columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import UID

from ._common import CT_LABELS, check_seed, rng_for
from .ct_acquisition import CT_SCANNERS, IOP_BY_POSITION, Drawn, Grid, draw_acquisition, slice_grid
from .ct_anatomy import draw_anatomy
from .ct_render import INTERCEPT, render_series
from .dicomio import (
    CT_IMAGE_STORAGE,
    Identity,
    add_patient_study,
    add_pixels,
    ds_multi,
    ds_str,
    make_identity,
    make_uid,
    new_dataset,
    snap,
    write_dataset,
    write_json,
)

# The acquisition tables live in ct_acquisition; re-exported because the CLI and tests read them here.
__all__ = ["CT_SCANNERS", "IOP_BY_POSITION", "CTPhantom", "make_ct_phantom", "write_ct_series"]

# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CTPhantom:
    """One synthetic CT series.

    ``datasets``: the slices in file order (IM0001 first), pixel data included.
    ``labels``: uint8 (z, y, x) mask in volume-builder layout (see module docstring), values =
    index in :data:`CT_LABELS`.
    ``truth``: the ``truth.json`` content.
    ``hu``: float32 (z, y, x) HU in the same layout, exactly what decoding the files gives
    (noise and quantisation included).
    ``hu_clean``: float32 noise-free HU in the same layout, only with ``keep_clean=True``.
    """

    datasets: list[pydicom.Dataset]
    labels: npt.NDArray[np.uint8]
    truth: dict[str, Any]
    hu: npt.NDArray[np.float32]
    hu_clean: npt.NDArray[np.float32] | None = field(default=None)


# --------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------


def _check_knobs(
    size: int | None,
    slices: int | None,
    slice_thickness: float | None,
    noise: float,
    patient_position: str | None,
) -> None:
    """Raise ValueError for a knob outside what :func:`make_ct_phantom` supports."""
    if size is not None and size not in (256, 512):
        raise ValueError(f"size must be 256 or 512, got {size}")
    if slices is not None and slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    if slice_thickness is not None and not 0.1 <= slice_thickness <= 20:
        raise ValueError(f"slice_thickness must be within 0.1-20 mm, got {slice_thickness}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if patient_position is not None and patient_position not in IOP_BY_POSITION:
        raise ValueError(
            f"patient_position must be one of {sorted(IOP_BY_POSITION)}, got {patient_position!r}"
        )


def _knob_key(**knobs: object) -> str:
    """Canonical string of the knobs, mixed into UIDs: the same seed with different knobs is a
    different series (a drifted copy must not collide with its baseline on the agent)."""
    return ";".join(f"{k}={knobs[k]!r}" for k in sorted(knobs))


def make_ct_phantom(
    seed: int,
    *,
    size: int | None = None,
    slices: int | None = None,
    hu_offset: float = 0.0,
    noise: float = 1.0,
    slice_thickness: float | None = None,
    manufacturer: str | None = None,
    patient_position: str | None = None,
    index: int | None = None,
    keep_clean: bool = False,
) -> CTPhantom:
    """Build one synthetic abdominal CT series in memory.

    Takes the phantom ``seed`` (>= 0) and optional knobs: ``size`` (256 or 512 matrix; random per
    seed if None), ``slices`` (slice count; default covers all organs plus margins),
    ``hu_offset`` (added to every HU, for drift tests), ``noise`` (scales the ~10-20 HU noise; 0
    disables it), ``slice_thickness`` (mm; also the slice spacing), ``manufacturer``,
    ``index`` (only names the synthetic patient, ``PHANTOM^CT0003``; default from the seed) and
    ``keep_clean`` (also return the noise-free HU). Returns a :class:`CTPhantom`.

    The same arguments always give byte-identical pixel data and identical UIDs; every random
    draw happens whatever the knobs, so a knob never changes the anatomy.
    """
    seed = check_seed(seed)
    _check_knobs(size, slices, slice_thickness, noise, patient_position)
    # Separate streams: acquisition 1, anatomy 2, noise 3, identity 4.
    drawn = draw_acquisition(rng_for(seed, 1))
    an = draw_anatomy(rng_for(seed, 2))
    ident = make_identity(rng_for(seed, 4), f"CT{(seed if index is None else index) % 10000:04d}")

    position = drawn.position if patient_position is None else patient_position
    thickness = snap(drawn.thickness if slice_thickness is None else float(slice_thickness), 4)
    scanner = drawn.scanner
    if manufacturer is not None:
        known = {s[0].lower(): s for s in CT_SCANNERS}
        scanner = known.get(manufacturer.lower(), (manufacturer, "SYNTHETIC", "STANDARD"))
    grid = slice_grid(
        an,
        drawn,
        size=drawn.size if size is None else int(size),
        position=position,
        thickness=thickness,
        slices=slices,
    )
    bits_stored = 12 if (not drawn.signed and drawn.slope == 1.0) else 16
    rendered = render_series(
        an,
        grid.x - drawn.body_center[0],
        grid.y - drawn.body_center[1],
        grid.z - drawn.body_center[2],
        supine=position.endswith("S"),
        noise_rng=rng_for(seed, 3),
        noise_std=noise * drawn.noise_sigma,
        hu_offset=hu_offset,
        slope=drawn.slope,
        signed=drawn.signed,
        bits_stored=bits_stored,
        keep_clean=keep_clean,
    )

    knobs = _knob_key(
        size=grid.size,
        slices=slices,
        hu_offset=float(hu_offset),
        noise=float(noise),
        slice_thickness=slice_thickness,
        manufacturer=manufacturer,
        patient_position=patient_position,
    )
    header = _Header(
        study_uid=make_uid("ct", seed, knobs, "study"),
        series_uid=make_uid("ct", seed, knobs, "series"),
        frame_uid=make_uid("ct", seed, knobs, "frame"),
        ident=ident,
        position=position,
        iop=[*grid.row_dir.tolist(), *grid.col_dir.tolist()],
        spacing=grid.spacing,
        thickness=thickness,
        scanner=scanner,
        kvp=drawn.kvp,
        ma=drawn.ma,
        fov=grid.fov,
        table_height=drawn.table_height,
        description=drawn.description.format(t=f"{thickness:g}"),
        series_number=drawn.series_number,
        slope=drawn.slope,
        signed=drawn.signed,
        bits_stored=bits_stored,
    )
    datasets = _ct_datasets(seed, knobs, header, grid, drawn, rendered.stored)
    truth = _ct_truth(seed, header, grid, drawn, rendered.labels, hu_offset=hu_offset, noise=noise)
    return CTPhantom(
        datasets=datasets, labels=rendered.labels, truth=truth, hu=rendered.hu, hu_clean=rendered.clean
    )


# --------------------------------------------------------------------------------------------
# DICOM and truth
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """Series-wide values every slice of a series carries."""

    study_uid: UID
    series_uid: UID
    frame_uid: UID
    ident: Identity
    position: str
    iop: list[float]
    spacing: float
    thickness: float
    scanner: tuple[str, str, str]  # (manufacturer, model, convolution kernel)
    kvp: int
    ma: int
    fov: float
    table_height: float
    description: str
    series_number: int
    slope: float
    signed: bool
    bits_stored: int


def _ct_datasets(
    seed: int, knobs: str, h: _Header, grid: Grid, drawn: Drawn, stored: npt.NDArray[np.integer[Any]]
) -> list[pydicom.Dataset]:
    """The series' instances in file order (ascending or descending z, as drawn), with instance
    numbers that follow the files or run against them."""
    datasets = []
    n_slices = grid.n_slices
    order = list(range(n_slices)) if drawn.ascending_files else list(range(n_slices - 1, -1, -1))
    for file_idx, k in enumerate(order):
        instance_number = file_idx + 1 if drawn.instance_follows_files else n_slices - file_idx
        ipp = [grid.origin[0], grid.origin[1], grid.z[k]]
        sop_uid = make_uid("ct", seed, knobs, "instance", k)
        datasets.append(_ct_slice(h, sop_uid, instance_number, ipp, stored[k]))
    return datasets


def _ct_slice(
    h: _Header,
    sop_uid: UID,
    instance_number: int,
    ipp: list[float],
    stored: npt.NDArray[np.integer[Any]],
) -> pydicom.Dataset:
    """One CT Image Storage instance. Takes the series-wide values, the slice's SOP UID, number,
    IPP and stored frame; returns the dataset (file meta included)."""
    ident = h.ident
    ds = new_dataset(CT_IMAGE_STORAGE, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = ident.study_date
    ds.StudyDate = ident.study_date
    add_patient_study(ds, ident, h.study_uid)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
    ds.Modality = "CT"
    ds.Manufacturer, ds.ManufacturerModelName, kernel = h.scanner
    ds.SeriesInstanceUID = h.series_uid
    ds.SeriesNumber = h.series_number
    ds.SeriesDescription = h.description
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = h.position
    ds.FrameOfReferenceUID = h.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ContrastBolusAgent = "IV CONTRAST"
    ds.SliceThickness = ds_str(h.thickness)
    ds.KVP = ds_str(h.kvp)
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = ds_str(round(h.fov, 2))
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = ds_str(round(h.table_height, 1))
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = h.ma
    ds.ConvolutionKernel = kernel
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = ds_multi(ipp)
    ds.ImageOrientationPatient = ds_multi(h.iop)
    ds.SliceLocation = ds_str(ipp[2])
    ds.PixelSpacing = ds_multi([h.spacing, h.spacing])
    add_pixels(ds, stored, bits_stored=h.bits_stored, signed=h.signed)
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = ds_str(h.slope)
    ds.RescaleType = "HU"
    return ds


def _ct_truth(
    seed: int,
    h: _Header,
    grid: Grid,
    drawn: Drawn,
    labels: npt.NDArray[np.uint8],
    *,
    hu_offset: float,
    noise: float,
) -> dict[str, Any]:
    """``truth.json`` content: label volumes, geometry, acquisition and the generation params."""
    n_slices, size, thickness, spacing = grid.n_slices, grid.size, h.thickness, h.spacing
    voxel_ml = thickness * spacing * spacing / 1000.0
    # Per slice: a whole-volume bincount would convert the labels to intp (8 bytes a voxel).
    counts = np.zeros(len(CT_LABELS), dtype=np.intp)
    for lab in labels:
        counts += np.bincount(lab.ravel(), minlength=len(CT_LABELS))
    return {
        "modality": "CT",
        "study_uid": str(h.study_uid),
        "series_uid": str(h.series_uid),
        "n_instances": n_slices,
        "labels": {
            name: {"value": v, "volume_ml": round(float(counts[v]) * voxel_ml, 3), "voxels": int(counts[v])}
            for v, name in enumerate(CT_LABELS)
            if v > 0
        },
        "geometry": {
            "shape_zyx": [n_slices, size, size],
            "spacing_zyx_mm": [thickness, spacing, spacing],
            "origin_lps_mm": [float(v) for v in grid.origin],
            "row_dir": [float(v) for v in grid.row_dir],
            "col_dir": [float(v) for v in grid.col_dir],
            "slice_normal": [float(v) for v in grid.normal],
            "patient_position": h.position,
            "ascending_files": drawn.ascending_files,
            "instance_numbers_follow_files": drawn.instance_follows_files,
            "voxel_volume_ml": voxel_ml,
        },
        "acquisition": {
            "manufacturer": h.scanner[0],
            "model": h.scanner[1],
            "kvp": h.kvp,
            "slice_thickness_mm": thickness,
            "pixel_spacing_mm": spacing,
            "rescale_slope": h.slope,
            "rescale_intercept": INTERCEPT,
            "pixel_representation": int(h.signed),
            "bits_stored": h.bits_stored,
            "series_description": h.description,
        },
        "params": {
            "seed": seed,
            "size": size,
            "slices": n_slices,
            "hu_offset": float(hu_offset),
            "noise": float(noise),
            "noise_sigma_hu": drawn.noise_sigma * noise,
            "slice_thickness": thickness,
            "manufacturer": h.scanner[0],
        },
    }


def write_ct_series(phantom: CTPhantom, folder: str | Path) -> Path:
    """Write a phantom to ``folder`` (created): ``IM0001.dcm``... in file order, ``truth.json``
    and ``labels.npy``. Returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(phantom.datasets, start=1):
        write_dataset(ds, out / f"IM{i:04d}.dcm")
    np.save(out / "labels.npy", phantom.labels, allow_pickle=False)
    write_json(out / "truth.json", phantom.truth)
    return out
