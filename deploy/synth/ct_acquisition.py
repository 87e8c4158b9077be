"""Acquisition of a CT series: scanner tables, the values drawn per seed, and the slice grid.

Takes the phantom's acquisition random stream (:func:`draw_acquisition`; returns the drawn
:class:`Drawn` values: matrix, thickness, patient position, file order, rescale, scanner, ...)
and, once the knobs have overridden what they set, the anatomy (:func:`slice_grid`; returns the
:class:`Grid`: voxel centres in patient LPS mm, snapped to what the DICOM files will say).

The order of the draws is part of the phantom format (same seed -> same series): every value is
drawn whatever the knobs, so a knob never shifts the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .ct_anatomy import Anatomy
from .dicomio import snap

F64 = npt.NDArray[np.float64]

#: Image Orientation (Patient) per Patient Position for an axial acquisition, as scanners write
#: it (DICOM PS3.3 C.7.6.2.1.1 / C.7.3.1.1.2): the image x axis follows the gantry, so turning the
#: patient prone or feet-first flips the patient-based row/column directions.
IOP_BY_POSITION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "HFS": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "HFP": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "FFS": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "FFP": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
}

#: (Manufacturer, ManufacturerModelName, ConvolutionKernel)
CT_SCANNERS: tuple[tuple[str, str, str], ...] = (
    ("SIEMENS", "SOMATOM Definition AS", "Br40"),
    ("GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD"),
    ("Philips", "Ingenuity CT", "B"),
    ("Canon Medical Systems", "Aquilion ONE", "FC18"),
)

SLICE_THICKNESSES: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SERIES_DESCRIPTIONS: tuple[str, ...] = (
    "ABD PORTAL VENOUS {t}mm",
    "ABDOMEN PV {t}mm",
    "CT ABD W CONTRAST {t}mm",
    "AX ABD PORTAL {t}mm",
)


@dataclass(frozen=True)
class Drawn:
    """Acquisition values drawn from the seed, before any knob overrides them."""

    size: int
    thickness: float
    position: str
    ascending_files: bool
    instance_follows_files: bool
    slope: float
    signed: bool
    scanner: tuple[str, str, str]
    kvp: int
    ma: int
    description: str
    series_number: int
    body_center: F64  # patient LPS mm of the body-local origin
    fov_shift: F64  # (2,) x, y offset of the image centre from the body axis, mm
    fov_frac: float  # where the field of view falls between its minimum and maximum
    margins: F64  # (2,) z margins below / above the organs, mm
    noise_sigma: float  # HU at noise=1
    table_height: float


def draw_acquisition(acq: np.random.Generator) -> Drawn:
    """Every acquisition value of a series, drawn in a fixed order from the acquisition stream.

    All are drawn whatever the knobs (a knob overrides the value afterwards), so a knob never
    shifts the stream and never changes any other value.
    """
    return Drawn(
        size=int(acq.choice([256, 512])),
        thickness=float(acq.choice(SLICE_THICKNESSES)),
        position=str(acq.choice(list(IOP_BY_POSITION))),
        ascending_files=bool(acq.integers(0, 2)),
        instance_follows_files=bool(acq.integers(0, 2)),
        slope=0.5 if acq.uniform() < 0.3 else 1.0,
        signed=bool(acq.integers(0, 2)),
        scanner=CT_SCANNERS[int(acq.integers(0, len(CT_SCANNERS)))],
        kvp=int(acq.choice([100, 120, 140])),
        ma=int(acq.integers(120, 400)),
        description=SERIES_DESCRIPTIONS[int(acq.integers(0, len(SERIES_DESCRIPTIONS)))],
        series_number=int(acq.integers(2, 9)),
        body_center=np.array([acq.uniform(-20, 20), acq.uniform(-40, 40), acq.uniform(-900, 300)]),
        fov_shift=acq.uniform(-15, 15, size=2),
        fov_frac=acq.uniform(),
        margins=acq.uniform(10, 35, size=2),
        noise_sigma=float(acq.uniform(10, 20)),
        table_height=float(acq.uniform(120, 200)),
    )


@dataclass(frozen=True)
class Grid:
    """Voxel grid of a series in patient LPS (mm), snapped so what we render == what the files say."""

    size: int
    spacing: float
    thickness: float
    fov: float
    n_slices: int
    row_dir: F64
    col_dir: F64
    normal: F64  # +z for head first, -z for feet first
    origin: F64  # IPP of sorted slice 0
    x: F64  # (size,) patient x of each column
    y: F64  # (size,) patient y of each row
    z: F64  # (n_slices,) patient z of each sorted slice


def slice_grid(
    an: Anatomy, drawn: Drawn, *, size: int, position: str, thickness: float, slices: int | None
) -> Grid:
    """Slice grid covering the organs (plus margins), or ``slices`` slices centred on them."""
    # The field of view must hold the whole body: it sets the pixel spacing (0.6-1.0 mm at 512;
    # twice that at 256, which is how a 256 matrix covers an abdomen - see report).
    fov_min = max(2 * an.body[0] + 35, 0.6 * 512)
    fov = fov_min + drawn.fov_frac * (512 * 0.98 - fov_min)
    spacing = snap(fov / size, 6)
    row_dir, col_dir = (np.array(v, dtype=np.float64) for v in IOP_BY_POSITION[position])
    normal = np.cross(row_dir, col_dir)

    lo, hi = an.z_extent()
    if slices is None:
        n_slices = int(math.ceil((hi - lo + drawn.margins.sum()) / thickness)) + 1
        z_low = lo - drawn.margins[0]
    else:
        n_slices = int(slices)
        z_low = 0.5 * (lo + hi) - 0.5 * (n_slices - 1) * thickness

    body_center = drawn.body_center
    center = body_center.copy()
    center[:2] += drawn.fov_shift
    half = (size - 1) / 2.0 * spacing
    corner = center - half * row_dir - half * col_dir  # x, y of voxel (0, 0)
    z_first = body_center[2] + (z_low if normal[2] > 0 else z_low + (n_slices - 1) * thickness)
    origin = np.array([snap(corner[0]), snap(corner[1]), snap(z_first)])
    # z of sorted slice k: origin + k * thickness * normal (snapped per slice, as written).
    z_pat = np.array([snap(origin[2] + k * thickness * normal[2]) for k in range(n_slices)])
    return Grid(
        size=size,
        spacing=spacing,
        thickness=thickness,
        fov=fov,
        n_slices=n_slices,
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        origin=origin,
        x=origin[0] + np.arange(size) * spacing * row_dir[0],  # columns run along +-x
        y=origin[1] + np.arange(size) * spacing * col_dir[1],  # rows run along +-y
        z=z_pat,
    )
