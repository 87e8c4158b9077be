"""Synthetic 2-D brain MR slices (axial T1 post-contrast) for the mr-brain-cls classifier.

Public API: :func:`make_mr_slice` takes a seed and optional knobs (class, difficulty, noise,
manufacturer) and returns an :class:`MRPhantom` (the DICOM dataset, stored image, class, lesion
mask and ``truth.json`` content); :func:`write_mr_series` writes one to a folder.

Each phantom is one single-instance MR Image Storage series: a head (scalp, skull with diploe,
CSF, folded cortex, white matter, ventricles or skull-base structures) drawn from implicit
shapes in head-frame millimetres (:mod:`deploy.synth.mr_anatomy`), plus at most one lesion of
the requested class:

* ``no_tumour`` - normal anatomy only (including the normal enhancing structures a model must
  not mistake for lesions: choroid plexus, dural sinuses, cavernous sinuses, pituitary gland);
* ``glioma`` - irregular intra-axial hemispheric mass: enhancing rim, necrotic core, oedema;
* ``meningioma`` - extra-axial, dural-based, well-circumscribed, homogeneously bright, dural tail;
* ``pituitary`` - bright lesion at the midline sella on a skull-base slice.

Difficulty: ``obvious`` (large, high contrast), ``subtle`` (small, low contrast), ``artefact``
(medium lesion plus motion ghosting along the phase-encode axis, stronger Rician noise and a bias
field; :mod:`deploy.synth.mr_render`). Intensities are arbitrary MR units (0-4000) with a random
global scale per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import UID

from ._common import MR_CLASSES, MR_DIFFICULTIES, check_seed, rng_for
from .dicomio import (
    MR_IMAGE_STORAGE,
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
from .mr_anatomy import Head, Lesion, draw_head, draw_lesion, render_anatomy
from .mr_render import Acquired, acquire

#: (Manufacturer, ManufacturerModelName, field strength T)
MR_SCANNERS: tuple[tuple[str, str, float], ...] = (
    ("SIEMENS", "MAGNETOM Skyra", 3.0),
    ("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5),
    ("Philips Medical Systems", "Ingenia", 3.0),
    ("Canon Medical Systems", "Vantage Orian", 1.5),
)
SERIES_DESCRIPTIONS: tuple[str, ...] = ("AX T1 POST", "AX T1 +C", "T1 AX POST GAD", "AX T1 SE POST")
MATRIX_SIZES: tuple[int, ...] = (256, 256, 256, 256, 256, 224, 240)


@dataclass(frozen=True, eq=False)
class MRPhantom:
    """One synthetic MR slice.

    ``dataset``: the single instance (pixel data included). ``image``: float32 (y, x), the stored
    pixel values (exactly what ``dataset.pixel_array`` gives). ``cls``/``class_index``: the class
    name and its index in :data:`MR_CLASSES`. ``difficulty``: one of :data:`MR_DIFFICULTIES`.
    ``truth``: the ``truth.json`` content. ``lesion_mask``: bool (y, x) lesion extent (enhancing
    tumour / mass, oedema excluded), None for ``no_tumour``.
    """

    dataset: pydicom.Dataset
    image: npt.NDArray[np.float32]
    cls: str
    class_index: int
    difficulty: str
    truth: dict[str, Any]
    lesion_mask: npt.NDArray[np.bool_] | None = field(default=None)


@dataclass(frozen=True)
class _Drawn:
    """Acquisition values drawn from the seed, before any knob overrides them."""

    cls: str
    difficulty: str
    size: int
    spacing_frac: float  # where the pixel spacing falls between its minimum and 1.1 mm
    scanner: tuple[str, str, float]
    description: str
    body_part: str
    scale: float  # white-matter value: random global scaling
    sellar_draw: float
    rotation: float  # radians, head frame -> image plane
    shift: npt.NDArray[np.float64]  # (2,) image-plane x, y offset of the head, mm
    slice_z: float
    series_number: int
    pe_axis: int  # 0: phase encode along image y (COL), 1: along x (ROW)
    repetition_time: float
    echo_time: float


def _draw_acquisition(acq: np.random.Generator) -> _Drawn:
    """Every acquisition value, drawn in a fixed order from the acquisition stream whatever the
    knobs (a knob overrides the value afterwards, so it never shifts the stream)."""
    return _Drawn(
        cls=MR_CLASSES[int(acq.integers(0, len(MR_CLASSES)))],
        difficulty=MR_DIFFICULTIES[int(acq.integers(0, len(MR_DIFFICULTIES)))],
        size=int(acq.choice(MATRIX_SIZES)),
        spacing_frac=acq.uniform(),
        scanner=MR_SCANNERS[int(acq.integers(0, len(MR_SCANNERS)))],
        description=SERIES_DESCRIPTIONS[int(acq.integers(0, len(SERIES_DESCRIPTIONS)))],
        body_part="BRAIN" if acq.uniform() < 0.6 else "HEAD",
        scale=float(acq.uniform(350, 1450)),
        sellar_draw=acq.uniform(),
        rotation=math.radians(acq.uniform(-15, 15)),
        shift=acq.uniform(-10, 10, size=2),
        slice_z=float(acq.uniform(-40, 60)),
        series_number=int(acq.integers(3, 12)),
        pe_axis=int(acq.integers(0, 2)),
        repetition_time=float(acq.uniform(450, 650)),
        echo_time=float(acq.uniform(8, 15)),
    )


def _head_frame(
    size: int, spacing: float, drawn: _Drawn
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Head-frame coordinates (u, v) in mm of every pixel: centre, shift, rotate."""
    half = (size - 1) / 2.0
    xs = (np.arange(size) - half) * spacing - drawn.shift[0]
    ys = (np.arange(size) - half) * spacing - drawn.shift[1]
    xx, yy = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    cr, sr = math.cos(drawn.rotation), math.sin(drawn.rotation)
    return cr * xx + sr * yy, -sr * xx + cr * yy


def make_mr_slice(
    seed: int,
    *,
    cls: str | None = None,
    difficulty: str | None = None,
    noise: float = 1.0,
    manufacturer: str | None = None,
    index: int | None = None,
) -> MRPhantom:
    """Build one synthetic axial T1 post-contrast brain slice in memory.

    Takes the phantom ``seed`` (>= 0) and optional knobs: ``cls`` (one of :data:`MR_CLASSES`;
    drawn from the seed if None), ``difficulty`` (one of :data:`MR_DIFFICULTIES`; drawn if None),
    ``noise`` (scales the Rician noise; 0 disables it), ``manufacturer`` and ``index`` (only
    names the synthetic patient, ``PHANTOM^MR0003``; default from the seed). Returns an
    :class:`MRPhantom`. Same arguments -> identical pixel data and UIDs; with the same seed,
    changing ``cls`` keeps the head (anatomy, scale, noise) and changes only the lesion, except
    that pituitary slices are always at the skull base.
    """
    seed = check_seed(seed)
    if cls is not None and cls not in MR_CLASSES:
        raise ValueError(f"cls must be one of {MR_CLASSES}, got {cls!r}")
    if difficulty is not None and difficulty not in MR_DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {MR_DIFFICULTIES}, got {difficulty!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")

    # Separate streams: identity 4, acquisition 11, anatomy 12, lesion 13, artefacts 14.
    acq, anat, les_rng, art = rng_for(seed, 11), rng_for(seed, 12), rng_for(seed, 13), rng_for(seed, 14)
    ident = make_identity(rng_for(seed, 4), f"MR{(seed if index is None else index) % 10000:04d}")
    drawn = _draw_acquisition(acq)
    cls = drawn.cls if cls is None else cls
    difficulty = drawn.difficulty if difficulty is None else difficulty
    scanner = drawn.scanner
    if manufacturer is not None:
        known = {s[0].lower(): s for s in MR_SCANNERS}
        scanner = known.get(manufacturer.lower(), (manufacturer, "SYNTHETIC", 1.5))

    head = draw_head(anat)
    # Skull-base level: always for pituitary; often for no_tumour so that the level alone does
    # not give the class away; sometimes for the hemispheric tumours.
    sellar = cls == "pituitary" or drawn.sellar_draw < {"no_tumour": 0.35}.get(cls, 0.2)
    size = drawn.size
    fov_min = 2 * head.semi[1] + 16
    spacing = snap(max(0.8, fov_min / size) + drawn.spacing_frac * (1.1 - max(0.8, fov_min / size)), 6)
    lesion = draw_lesion(les_rng, cls, difficulty, head.semi, head.inner, head.sella_v)
    uu, vv = _head_frame(size, spacing, drawn)
    img, mask = render_anatomy(anat, les_rng, head, lesion, uu, vv, sellar=sellar, spacing=spacing)
    acquired = acquire(img, art, scale=drawn.scale, difficulty=difficulty, noise=noise, pe_axis=drawn.pe_axis)

    knobs = f"cls={cls!r};difficulty={difficulty!r};noise={float(noise)!r};manufacturer={manufacturer!r}"
    ds = _mr_dataset(
        make_uid("mr", seed, knobs, "instance", 0),
        drawn,
        scanner,
        ident,
        study_uid=make_uid("mr", seed, knobs, "study"),
        series_uid=make_uid("mr", seed, knobs, "series"),
        frame_uid=make_uid("mr", seed, knobs, "frame"),
        spacing=spacing,
        stored=acquired.stored,
    )
    class_index = MR_CLASSES.index(cls)
    truth: dict[str, Any] = {
        "modality": "MR",
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "n_instances": 1,
        "class": cls,
        "class_index": class_index,
        "difficulty": difficulty,
        "level": "sellar" if sellar else "ventricular",
        "lesion": _lesion_truth(lesion, mask, drawn, spacing),
        **_scene_truth(seed, head, drawn, scanner, acquired, ds, spacing=spacing, noise=noise),
    }
    return MRPhantom(
        dataset=ds,
        image=acquired.image,
        cls=cls,
        class_index=class_index,
        difficulty=difficulty,
        truth=truth,
        lesion_mask=mask,
    )


def _origin(size: int, spacing: float, slice_z: float) -> list[float]:
    """IPP of the first pixel (image plane centred, 20 mm posterior of the isocentre)."""
    half = (size - 1) / 2.0
    return [snap(-half * spacing), snap(-half * spacing + 20.0), snap(slice_z)]


def _mr_dataset(
    sop_uid: UID,
    drawn: _Drawn,
    scanner: tuple[str, str, float],
    ident: Identity,
    *,
    study_uid: UID,
    series_uid: UID,
    frame_uid: UID,
    spacing: float,
    stored: npt.NDArray[np.uint16],
) -> pydicom.Dataset:
    """The single MR Image Storage instance of the series (file meta and pixel data included)."""
    origin = _origin(drawn.size, spacing, drawn.slice_z)
    ds = new_dataset(MR_IMAGE_STORAGE, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.InstanceCreationDate = ident.study_date
    add_patient_study(ds, ident, study_uid)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
    ds.Modality = "MR"
    ds.Manufacturer, ds.ManufacturerModelName = scanner[0], scanner[1]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = drawn.series_number
    ds.SeriesDescription = drawn.description
    ds.BodyPartExamined = drawn.body_part
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ContrastBolusAgent = "GADOLINIUM"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = "5"
    ds.SpacingBetweenSlices = "6"
    ds.RepetitionTime = ds_str(round(drawn.repetition_time, 1))
    ds.EchoTime = ds_str(round(drawn.echo_time, 2))
    ds.EchoTrainLength = 1
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = ds_str(scanner[2])
    ds.ImagingFrequency = ds_str(round(42.577478 * scanner[2], 6))
    ds.FlipAngle = "90"
    ds.InPlanePhaseEncodingDirection = "ROW" if drawn.pe_axis == 1 else "COL"
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ds_multi(origin)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = ds_str(origin[2])
    ds.PixelSpacing = ds_multi([spacing, spacing])
    add_pixels(ds, stored, bits_stored=12, signed=False)
    ds.WindowCenter = ds_str(round(drawn.scale * 0.9))
    ds.WindowWidth = ds_str(round(drawn.scale * 1.8))
    return ds


def _lesion_truth(
    lesion: Lesion | None, mask: npt.NDArray[np.bool_] | None, drawn: _Drawn, spacing: float
) -> dict[str, Any] | None:
    """``truth.json`` lesion entry: where the lesion is, in head-frame mm and image pixels."""
    if lesion is None or mask is None:
        return None
    rows, cols = np.nonzero(mask)
    area = float(rows.size) * spacing * spacing
    half = (drawn.size - 1) / 2.0
    shift = drawn.shift
    cr, sr = math.cos(drawn.rotation), math.sin(drawn.rotation)
    cu, cv = lesion.center
    cx, cy = cr * cu - sr * cv, sr * cu + cr * cv  # head frame -> image-plane mm
    return {
        "kind": lesion.kind,
        "center_head_mm": [round(cu, 2), round(cv, 2)],
        "center_rc_px": [
            round(float((cy + shift[1]) / spacing + half), 2),
            round(float((cx + shift[0]) / spacing + half), 2),
        ],
        "radius_mm": round(lesion.radius, 2),
        "contrast": round(lesion.contrast, 3),
        "area_mm2": round(area, 1),
        "pixels": int(rows.size),
        "centroid_rc_px": [round(float(rows.mean()), 2), round(float(cols.mean()), 2)] if rows.size else None,
        "bbox_rc_px": [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]
        if rows.size
        else None,
    }


def _scene_truth(
    seed: int,
    head: Head,
    drawn: _Drawn,
    scanner: tuple[str, str, float],
    acquired: Acquired,
    ds: pydicom.Dataset,
    *,
    spacing: float,
    noise: float,
) -> dict[str, Any]:
    """``truth.json`` head, artefacts, geometry, acquisition and params entries."""
    size = drawn.size
    return {
        "head": {
            "semi_axes_mm": [round(head.semi[0], 2), round(head.semi[1], 2)],
            "inner_table_depth_mm": round(head.inner, 2),
            "sella_v_mm": round(head.sella_v, 2),
        },
        "artefacts": {
            **acquired.artefacts,
            "noise_sigma": round(acquired.sigma, 3),
            "phase_encode": ds.InPlanePhaseEncodingDirection,
        },
        "geometry": {
            "shape_yx": [size, size],
            "spacing_yx_mm": [spacing, spacing],
            "origin_lps_mm": _origin(size, spacing, drawn.slice_z),
            "row_dir": [1.0, 0.0, 0.0],
            "col_dir": [0.0, 1.0, 0.0],
            "rotation_deg": round(math.degrees(drawn.rotation), 3),
        },
        "acquisition": {
            "manufacturer": scanner[0],
            "model": scanner[1],
            "field_strength_t": scanner[2],
            "series_description": drawn.description,
            "wm_intensity": round(drawn.scale, 2),
        },
        "params": {"seed": seed, "noise": float(noise), "manufacturer": scanner[0], "size": size},
    }


def write_mr_series(phantom: MRPhantom, folder: str | Path) -> Path:
    """Write a phantom to ``folder`` (created): ``IM0001.dcm`` and ``truth.json``. Returns it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_dataset(phantom.dataset, out / "IM0001.dcm")
    write_json(out / "truth.json", phantom.truth)
    return out
