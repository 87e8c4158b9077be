"""Synthetic abdominal CT phantoms: anatomy in patient LPS space, sampled onto DICOM slice grids.

The anatomy (body, fat, muscle wall, spine, ribs, vessels, liver, spleen, kidneys, stomach, bowel
gas) is a set of implicit shapes in *body-local* LPS millimetres (x: patient left, y: posterior,
z: superior; origin at the body axis, z = 0 near the renal hila). Each series then picks an
acquisition geometry (patient position, IOP, slice order, spacing, rescale, pixel representation)
and samples that same anatomy at the voxel centres of its grid, so a phantom is anatomically right
whatever the orientation - which is exactly what the agent's volume builder must undo.

Labels are laid out as the agent's volume builder returns a series: slices sorted ascending by
IPP projected on ``n = cross(row_dir, col_dir)``, axis 1 along ``col_dir`` (rows), axis 2 along
``row_dir`` (columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage

from ._common import CT_LABELS, check_seed, rng_for
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

# --------------------------------------------------------------------------------------------
# Acquisition tables
# --------------------------------------------------------------------------------------------

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

#: Slices rendered at once: bounds temporary memory (a few float32 slabs) whatever the series
#: size; fixed so the noise stream is consumed identically for every series (determinism).
CHUNK = 24

# 2-D tissue codes of the z-invariant cross-section (looked up per slice in a HU table).
AIR, TABLE, FAT, MUSCLE, CAVITY, VB_CORTEX, VB_CORE, CANAL, POST_EL, PARASPINAL, PSOAS, AORTA, IVC = range(13)
RIB0 = 13
#: Cavity texture grid: TEX_N x TEX_N samples every TEX_MM mm, centred on the body axis.
TEX_N, TEX_MM = 201, 2.0
#: Standard deviation of the sum of two independent uniform int8 values.
TRI_STD = math.sqrt(2 * (256**2 - 1) / 12)


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
    labels: np.ndarray
    truth: dict[str, Any]
    hu: np.ndarray
    hu_clean: np.ndarray | None = field(default=None)


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """Deformed ellipsoid: inside where ``d^T M d < 1 + sum(amp * cos(kx dx + px) cos(ky dy + py)
    cos(kz dz + pz))`` with ``d`` the offset (mm) from ``center`` in body-local coordinates.

    The quadratic form and the product-of-cosines perturbation are both separable, so a 3-D
    evaluation costs a handful of broadcast operations instead of a rotated-coordinate transform.
    """

    center: np.ndarray  # (3,) x, y, z mm, body-local
    matrix: np.ndarray  # (3, 3) R diag(1/s^2) R^T
    extent: np.ndarray  # (3,) half-size of an axis-aligned box that contains the deformed blob
    waves: tuple[tuple[float, float, float, float, float, float, float], ...] = ()

    def q(self, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        """Signed level (``< 0`` inside) on the grid ``dz x dy x dx`` (1-D offsets, mm); float32."""
        m = self.matrix
        xy = m[0, 0] * dx[None, :] ** 2 + m[1, 1] * dy[:, None] ** 2 + 2 * m[0, 1] * dy[:, None] * dx[None, :]
        zx = m[2, 2] * dz[:, None] ** 2 + 2 * m[0, 2] * dz[:, None] * dx[None, :]
        zy = 2 * m[1, 2] * dz[:, None] * dy[None, :]
        level = (xy - 1.0).astype(np.float32)[None] + zx.astype(np.float32)[:, None, :]
        level += zy.astype(np.float32)[:, :, None]
        for amp, kx, ky, kz, px, py, pz in self.waves:
            plane = amp * np.cos(kx * dx[None, :] + px) * np.cos(ky * dy[:, None] + py)
            level -= plane.astype(np.float32)[None] * np.cos(kz * dz + pz).astype(np.float32)[:, None, None]
        return level


def _rotation(rz: float, ry: float = 0.0, rx: float = 0.0) -> np.ndarray:
    """Rotation matrix R = Rz(rz) Ry(ry) Rx(rx) (radians)."""
    cz, sz, cy, sy, cx, sx = (
        math.cos(rz),
        math.sin(rz),
        math.cos(ry),
        math.sin(ry),
        math.cos(rx),
        math.sin(rx),
    )
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return r_z @ r_y @ r_x


def _blob(
    rng: np.random.Generator,
    center: tuple[float, float, float],
    semi: tuple[float, float, float],
    rot: np.ndarray | None = None,
    *,
    n_waves: int = 3,
    amp: tuple[float, float] = (0.08, 0.22),
    wavelength: tuple[float, float] = (70.0, 180.0),
) -> _Blob:
    """Random smooth deformation of an ellipsoid with semi-axes ``semi`` (mm) rotated by ``rot``.

    Low-frequency cosine waves (wavelengths ``wavelength`` mm) perturb the level set so every
    seed gives a different, still organ-like, outline.
    """
    r = np.eye(3) if rot is None else rot
    s = np.asarray(semi, dtype=np.float64)
    matrix = r @ np.diag(1.0 / s**2) @ r.T
    waves = []
    total = 0.0
    for _ in range(n_waves):
        a = float(rng.uniform(*amp))
        k = [2 * math.pi / float(rng.uniform(*wavelength)) for _ in range(3)]
        p = [float(rng.uniform(0, 2 * math.pi)) for _ in range(3)]
        waves.append((a, k[0], k[1], k[2], p[0], p[1], p[2]))
        total += a
    # q < 1 + total  =>  the blob stays inside the ellipsoid scaled by sqrt(1 + total); the
    # axis-aligned half-extent of a rotated ellipsoid is sqrt(diag(R diag(s^2) R^T)).
    extent = np.sqrt(np.diag(r @ np.diag(s**2) @ r.T) * (1.0 + total)) + 2.0
    return _Blob(np.asarray(center, dtype=np.float64), matrix, extent, tuple(waves))


@dataclass(frozen=True)
class _Anatomy:
    """All random anatomy of one phantom (body-local mm, HU values)."""

    body: tuple[float, float]  # semi-axes of the skin ellipse (x, y)
    fat: float  # subcutaneous fat thickness
    wall: float  # muscle wall thickness
    spine_y: float  # y of the vertebral body centre
    vb_radius: float
    vertebra_period: float
    vertebra_phase: float
    ribs: tuple[tuple[float, float, float, float, float], ...]  # (x, y, radius, z_start, phase)
    hu: dict[str, float]
    liver: tuple[_Blob, _Blob]
    spleen: _Blob
    kidneys: tuple[_Blob, _Blob]  # (left, right)
    kidney_medulla: float  # level below which the kidney is medulla (fraction of q range)
    stomach: _Blob
    gas: tuple[_Blob, ...]
    texture_fields: np.ndarray  # (F, TEX_N, TEX_N) float32, unit std, on the TEX_MM grid
    texture: tuple[tuple[float, float], ...]  # (angular frequency in z, phase) per field
    table_gap: float

    @property
    def cavity(self) -> tuple[float, float]:
        a, b = self.body
        inset = self.fat + self.wall
        return a - inset, b - inset

    def z_extent(self) -> tuple[float, float]:
        """Lowest and highest z (mm, body-local) reached by any labelled organ."""
        blobs = [*self.liver, self.spleen, *self.kidneys]
        lo = min(float(b.center[2] - b.extent[2]) for b in blobs)
        hi = max(float(b.center[2] + b.extent[2]) for b in blobs)
        return lo, hi


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one random abdomen. Takes the anatomy stream; returns an :class:`_Anatomy`.

    Sizes are absolute (mm) and tuned so that organ volumes stay plausible (liver 1200-2000 mL,
    spleen 150-350 mL, kidneys 120-220 mL); positions follow the body so organs stay inside it.
    """
    u = rng.uniform
    body = (u(138, 168), u(102, 125))
    fat = u(10, 30)
    wall = u(8, 13)
    ca, cb = body[0] - fat - wall, body[1] - fat - wall
    spine_y = cb * u(0.42, 0.5)
    vb = u(17, 21)

    # Ribs: cross-sections in the muscle wall, lateral and posterolateral arcs, lower laterally.
    ribs = []
    for side in (-1.0, 1.0):
        for theta_deg in np.linspace(-40, 55, 7) + u(-4, 4):
            theta = math.radians(theta_deg)
            x = side * (ca + wall * 0.5) * math.cos(theta)
            y = (cb + wall * 0.5) * math.sin(theta)
            z_start = -45 + 70 * abs(math.sin(theta)) + u(-8, 8)
            ribs.append((x, y, u(5.0, 7.0), z_start, u(0, 30)))

    hu = {
        "fat": u(-110, -90),
        "muscle": u(45, 55),
        "liver": u(56, 64),
        "spleen": u(45.5, 49.5),
        "cortex": u(150, 180),
        "medulla": u(42, 58),
        "bone_cortex": u(850, 1000),
        "bone_core": u(400, 480),
        "disc": u(70, 95),
        "canal": u(10, 25),
        "aorta": u(150, 185),
        "ivc": u(125, 150),
        "stomach": u(5, 20),
        "table": u(200, 300),
    }

    # Liver: big right lobe against the right wall plus a thinner left lobe crossing the midline
    # anteriorly; the cavity clips it so it conforms to the abdominal wall.
    z_liver = u(35, 55)
    right = _blob(
        rng,
        (-(ca - u(62, 72)), -cb * u(0.02, 0.12), z_liver),
        (u(79.5, 86), u(72, 79), u(67, 73)),
        _rotation(u(-0.2, 0.2)),
    )
    left = _blob(
        rng,
        (u(5, 20), -cb * u(0.45, 0.55), z_liver + u(15, 30)),
        (u(55, 68), u(26, 34), u(38, 48)),
        _rotation(u(-0.25, 0.1)),
        n_waves=2,
    )
    # Spleen: posterolateral left, elongated along the ribs, thin axis pointing at the wall.
    spleen = _blob(
        rng,
        (ca - u(48, 56), cb * u(0.28, 0.38), z_liver + u(0, 15)),
        (u(40, 45), u(23, 26.5), u(60, 68)),
        _rotation(math.radians(u(-60, -40)), math.radians(u(-15, 15)), math.radians(u(10, 25))),
        wavelength=(60.0, 140.0),
    )
    # Kidneys: beside the spine, lateral to psoas, hila anteromedial, upper poles medial; the
    # right one a little lower (pushed down by the liver).
    kidneys = []
    for side, dz in ((1.0, u(-12, 0)), (-1.0, u(-28, -14))):
        kidneys.append(
            _blob(
                rng,
                (side * u(64, 72), spine_y + u(0, 12), dz),
                (u(29.5, 32), u(23.5, 25.5), u(55, 60)),
                _rotation(side * math.radians(u(20, 35)), side * math.radians(u(-14, -6))),
                n_waves=2,
                amp=(0.04, 0.1),
            )
        )
    stomach = _blob(
        rng,
        (u(20, 45), -cb * u(0.25, 0.4), z_liver + u(0, 20)),
        (u(30, 42), u(25, 32), u(38, 50)),
        _rotation(u(-0.5, 0.0)),
        n_waves=2,
    )
    gas = tuple(
        _blob(
            rng,
            (u(-0.6, 0.6) * ca, -cb * u(0.1, 0.7), u(-90, -20)),
            (u(7, 18), u(6, 14), u(8, 20)),
            n_waves=1,
            amp=(0.05, 0.15),
            wavelength=(30.0, 60.0),
        )
        for _ in range(int(rng.integers(2, 7)))
    )
    # Bowel / mesentery texture: a few smooth random 2-D fields on a fixed patient-space grid
    # (2 mm, +-200 mm), blended along z by slow cosines. Sampling them in patient space keeps the
    # texture identical whatever the image grid, and costs a few 2-D operations per series.
    fields = ndimage.gaussian_filter(
        rng.standard_normal((4, TEX_N, TEX_N)).astype(np.float32), sigma=(0, 4.5, 4.5), mode="wrap"
    )
    fields /= fields.std(axis=(1, 2), keepdims=True)
    texture = tuple((2 * math.pi / u(50, 120), u(0, 2 * math.pi)) for _ in range(fields.shape[0]))
    return _Anatomy(
        body=body,
        fat=fat,
        wall=wall,
        spine_y=spine_y,
        vb_radius=vb,
        vertebra_period=u(30, 36),
        vertebra_phase=u(0, 36),
        ribs=tuple(ribs),
        hu=hu,
        liver=(right, left),
        spleen=spleen,
        kidneys=(kidneys[0], kidneys[1]),
        kidney_medulla=u(0.45, 0.55),
        stomach=stomach,
        gas=gas,
        texture_fields=fields,
        texture=texture,
        table_gap=u(0, 8),
    )


def _cross_section(an: _Anatomy, x: np.ndarray, y: np.ndarray, supine: bool) -> np.ndarray:
    """2-D tissue code map (H, W) of the z-invariant structures on body-local x (W,) and y (H,).

    Painted back to front: later structures overwrite earlier ones.
    """
    xx, yy = x[None, :], y[:, None]
    code = np.full((y.size, x.size), AIR, dtype=np.uint8)
    a, b = an.body
    ca, cb = an.cavity
    # Table behind the patient's back when supine, under the belly when prone (LPS is
    # patient-based, so the table moves in patient space, not the patient).
    back = b + an.table_gap
    ty = yy if supine else -yy
    curve = back + 25.0 - 25.0 * np.sqrt(np.clip(1 - (xx / 260.0) ** 2, 0, 1))
    code[(ty > curve) & (ty < curve + 7.0) & (np.abs(xx) < 240)] = TABLE
    code[(xx / a) ** 2 + (yy / b) ** 2 < 1] = FAT
    code[(xx / (ca + an.wall)) ** 2 + (yy / (cb + an.wall)) ** 2 < 1] = MUSCLE
    code[(xx / ca) ** 2 + (yy / cb) ** 2 < 1] = CAVITY
    sy, r = an.spine_y, an.vb_radius
    for side in (-1.0, 1.0):
        code[((xx - side * 32) / 24) ** 2 + ((yy - sy - 48) / 24) ** 2 < 1] = PARASPINAL
        code[((xx - side * (r + 10)) / 13) ** 2 + ((yy - sy + 2) / 15) ** 2 < 1] = PSOAS
    canal_y = sy + r + 11
    code[((xx / 15) ** 2 + ((yy - canal_y) / 13) ** 2 < 1)] = POST_EL
    code[(np.abs(xx) < 4.5) & (yy > canal_y) & (yy < canal_y + 38)] = POST_EL
    code[(xx / 8.5) ** 2 + ((yy - canal_y) / 7.5) ** 2 < 1] = CANAL
    code[(xx / r) ** 2 + ((yy - sy) / (r * 0.9)) ** 2 < 1] = VB_CORTEX
    code[(xx / (r - 3)) ** 2 + ((yy - sy) / (r * 0.9 - 3)) ** 2 < 1] = VB_CORE
    # Aorta left-anterior of the spine, IVC right-anterior (patient left is +x).
    code[(xx - 14) ** 2 + (yy - sy + r + 12) ** 2 < 11.0**2] = AORTA
    code[((xx + 22) / 13) ** 2 + ((yy - sy + r + 8) / 9) ** 2 < 1] = IVC
    for j, (rx, ry, rr, _z0, _ph) in enumerate(an.ribs):
        code[(xx - rx) ** 2 + (yy - ry) ** 2 < rr**2] = RIB0 + j
    return code


def _hu_table(an: _Anatomy, z: np.ndarray) -> np.ndarray:
    """Per-slice HU of every tissue code: (K, n_codes) float32 for body-local slice z (K,)."""
    hu = an.hu
    table = np.zeros((z.size, RIB0 + len(an.ribs)), dtype=np.float32)
    table[:, AIR] = -1000.0
    table[:, TABLE] = hu["table"]
    table[:, FAT] = hu["fat"]
    table[:, MUSCLE] = hu["muscle"]
    table[:, CAVITY] = 0.0  # replaced by the cavity texture
    # Intervertebral discs: a periodic band of low HU through the vertebral body.
    disc = ((z - an.vertebra_phase) % an.vertebra_period) < 7.0
    table[:, VB_CORTEX] = np.where(disc, hu["disc"], hu["bone_cortex"])
    table[:, VB_CORE] = np.where(disc, hu["disc"], hu["bone_core"])
    table[:, CANAL] = hu["canal"]
    table[:, POST_EL] = hu["bone_cortex"] * 0.85
    table[:, PARASPINAL] = hu["muscle"]
    table[:, PSOAS] = hu["muscle"] - 3.0
    table[:, AORTA] = hu["aorta"]
    table[:, IVC] = hu["ivc"]
    for j, (_rx, _ry, _rr, z0, phase) in enumerate(an.ribs):
        # Oblique ribs cut by axial planes: present in bands, only above their lowest level.
        present = (z > z0) & (((z - phase) % 28.0) < 13.0)
        table[:, RIB0 + j] = np.where(present, hu["bone_cortex"] * 0.8, hu["muscle"])
    return table


def _span(coord: np.ndarray, lo: float, hi: float) -> slice:
    """Index slice of the (monotonic, either direction) 1-D ``coord`` falling inside [lo, hi]."""
    idx = np.nonzero((coord >= lo) & (coord <= hi))[0]
    if idx.size == 0:
        return slice(0, 0)
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _render_chunk(
    an: _Anatomy,
    code: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    supine: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Clean HU (K, H, W) float32 and labels (K, H, W) uint8 for body-local coords z (K,)."""
    # Most slices share the same per-code HU row (discs and ribs come and go), so build each
    # distinct cross-section once and copy it: far cheaper than a 3-D fancy-index gather.
    lut = _hu_table(an, z)
    patterns, inverse = np.unique(lut, axis=0, return_inverse=True)
    hu = np.empty((z.size, *code.shape), dtype=np.float32)
    for i, pattern in enumerate(patterns):
        hu[inverse.ravel() == i] = pattern[code]
    labels = np.zeros(hu.shape, dtype=np.uint8)
    cavity = code == CAVITY
    rows = np.nonzero(cavity.any(axis=1))[0]
    cols = np.nonzero(cavity.any(axis=0))[0]
    if rows.size == 0 or cols.size == 0:
        return hu, labels
    rs, cs = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
    xc, yc = x[cs], y[rs]
    inside = cavity[rs, cs][None]

    # Mesentery / bowel: fat and soft-tissue loops from the smooth patient-space texture fields.
    gy, gx = np.meshgrid(yc / TEX_MM + TEX_N // 2, xc / TEX_MM + TEX_N // 2, indexing="ij")
    tex = np.zeros((z.size, yc.size, xc.size), dtype=np.float32)
    for f, (kz, pz) in zip(an.texture_fields, an.texture, strict=True):
        plane = ndimage.map_coordinates(f, [gy, gx], order=1, mode="nearest")
        tex += plane[None] * np.cos(kz * z + pz).astype(np.float32)[:, None, None]
    np.clip(tex * 1.2 + 0.3, -1.0, 1.0, out=tex)
    fat, soft = an.hu["fat"], 38.0
    cav = (0.5 * (fat + soft)) + (0.5 * (soft - fat)) * tex
    sub_hu = hu[:, rs, cs]
    sub_lab = labels[:, rs, cs]
    np.copyto(sub_hu, cav, where=inside)

    def paint(blob: _Blob, value: float | None, label: int) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Evaluate ``blob`` in its box; set HU (if value) and label (if label) where still free.

        Returns (box slices into sub_hu, level with +inf outside the painted mask), or None
        when the blob misses this chunk.
        """
        c, e = blob.center, blob.extent
        box = (
            _span(z, c[2] - e[2], c[2] + e[2]),
            _span(yc, c[1] - e[1], c[1] + e[1]),
            _span(xc, c[0] - e[0], c[0] + e[0]),
        )
        if any(b.stop == b.start for b in box):
            return None
        level = blob.q(xc[box[2]] - c[0], yc[box[1]] - c[1], z[box[0]] - c[2])
        mask = (level < 0) & inside[:, box[1], box[2]]
        if label:
            mask &= sub_lab[box] == 0
            sub_lab[box][mask] = label
        if value is not None:
            sub_hu[box][mask] = value
        return box, np.where(mask, level, np.inf)

    # Gas and stomach first (unlabelled), then organs in priority order: kidneys and spleen
    # carve the liver where they touch, never the other way round.
    for g in an.gas:
        paint(g, -950.0, 0)
    paint(an.stomach, an.hu["stomach"], 0)
    _paint_stomach_gas(an, sub_hu, inside, xc, yc, z, supine)
    for label, blob in ((3, an.kidneys[0]), (4, an.kidneys[1])):
        painted = paint(blob, an.hu["cortex"], label)
        if painted is not None:
            box, level = painted
            # level runs from about -1 at the centre to 0 at the surface: the inner part is
            # medulla, a rim of cortex stays (both labelled kidney).
            sub_hu[box][level < -an.kidney_medulla] = an.hu["medulla"]
    paint(an.spleen, an.hu["spleen"], 2)
    for lobe in an.liver:
        paint(lobe, an.hu["liver"], 1)
    return hu, labels


def _paint_stomach_gas(
    an: _Anatomy,
    sub_hu: np.ndarray,
    inside: np.ndarray,
    xc: np.ndarray,
    yc: np.ndarray,
    z: np.ndarray,
    supine: bool,
) -> None:
    """Gas cap in the non-dependent part of the stomach: anterior (small y) when supine,
    posterior when prone - gas rises whatever the patient-based coordinates say."""
    s = an.stomach
    c, e = s.center, s.extent
    ks = _span(z, c[2] - e[2], c[2] + e[2])
    if supine:
        ys = _span(yc, c[1] - e[1], c[1] - e[1] * 0.55)
    else:
        ys = _span(yc, c[1] + e[1] * 0.55, c[1] + e[1])
    xs = _span(xc, c[0] - e[0], c[0] + e[0])
    if ks.stop - ks.start == 0 or ys.stop - ys.start == 0 or xs.stop - xs.start == 0:
        return
    level = s.q(xc[xs] - c[0], yc[ys] - c[1], z[ks] - c[2])
    sub_hu[ks, ys, xs][(level < 0) & inside[:, ys, xs]] = -980.0


# --------------------------------------------------------------------------------------------
# Acquisition and DICOM
# --------------------------------------------------------------------------------------------


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

    acq = rng_for(seed, 1)
    an = _draw_anatomy(rng_for(seed, 2))
    ident = make_identity(rng_for(seed, 4), f"CT{(seed if index is None else index) % 10000:04d}")

    # --- acquisition parameters (all drawn, then overridden: knobs never shift the streams) ---
    drawn_size = int(acq.choice([256, 512]))
    drawn_thickness = float(acq.choice(SLICE_THICKNESSES))
    position = str(acq.choice(list(IOP_BY_POSITION)))
    ascending_files = bool(acq.integers(0, 2))
    instance_follows_files = bool(acq.integers(0, 2))
    slope = 0.5 if acq.uniform() < 0.3 else 1.0
    signed = bool(acq.integers(0, 2))
    scanner = CT_SCANNERS[int(acq.integers(0, len(CT_SCANNERS)))]
    kvp = int(acq.choice([100, 120, 140]))
    ma = int(acq.integers(120, 400))
    description = SERIES_DESCRIPTIONS[int(acq.integers(0, len(SERIES_DESCRIPTIONS)))]
    series_number = int(acq.integers(2, 9))
    body_center = np.array([acq.uniform(-20, 20), acq.uniform(-40, 40), acq.uniform(-900, 300)])
    fov_shift = acq.uniform(-15, 15, size=2)
    fov_frac = acq.uniform()
    margins = acq.uniform(10, 35, size=2)
    noise_sigma = float(acq.uniform(10, 20))
    table_height = float(acq.uniform(120, 200))

    size = drawn_size if size is None else int(size)
    position = position if patient_position is None else patient_position
    thickness = snap(drawn_thickness if slice_thickness is None else float(slice_thickness), 4)
    # The field of view must hold the whole body: it sets the pixel spacing (0.6-1.0 mm at 512;
    # twice that at 256, which is how a 256 matrix covers an abdomen - see report).
    fov_min = max(2 * an.body[0] + 35, 0.6 * 512)
    fov = fov_min + fov_frac * (512 * 0.98 - fov_min)
    spacing = snap(fov / size, 6)
    if manufacturer is not None:
        known = {s[0].lower(): s for s in CT_SCANNERS}
        scanner = known.get(manufacturer.lower(), (manufacturer, "SYNTHETIC", "STANDARD"))

    row_dir, col_dir = (np.array(v) for v in IOP_BY_POSITION[position])
    normal = np.cross(row_dir, col_dir)  # +z for head first, -z for feet first

    # z coverage (body-local): all organs plus margins, or --slices centred on the organs.
    lo, hi = an.z_extent()
    if slices is None:
        n_slices = int(math.ceil((hi - lo + margins.sum()) / thickness)) + 1
        z_low = lo - margins[0]
    else:
        n_slices = int(slices)
        z_low = 0.5 * (lo + hi) - 0.5 * (n_slices - 1) * thickness

    # Geometry in patient LPS (mm), snapped so what we render == what the files say.
    center = body_center.copy()
    center[:2] += fov_shift
    half = (size - 1) / 2.0 * spacing
    corner = center - half * row_dir - half * col_dir  # x, y of voxel (0, 0)
    z_first = body_center[2] + (z_low if normal[2] > 0 else z_low + (n_slices - 1) * thickness)
    origin = np.array([snap(corner[0]), snap(corner[1]), snap(z_first)])
    # z of sorted slice k: origin + k * thickness * normal (snapped per slice, as written).
    z_pat = np.array([snap(origin[2] + k * thickness * normal[2]) for k in range(n_slices)])
    x_pat = origin[0] + np.arange(size) * spacing * row_dir[0]  # columns run along +-x
    y_pat = origin[1] + np.arange(size) * spacing * col_dir[1]  # rows run along +-y

    # --- render (sorted-slice order, in chunks) ---
    xl, yl, zl = x_pat - body_center[0], y_pat - body_center[1], z_pat - body_center[2]
    code = _cross_section(an, xl, yl, supine=position.endswith("S"))
    labels = np.empty((n_slices, size, size), dtype=np.uint8)
    hu = np.empty((n_slices, size, size), dtype=np.float32)
    clean = np.empty_like(hu) if keep_clean else None
    intercept = -1024.0
    bits_stored = 12 if (not signed and slope == 1.0) else 16
    hi_stored = (1 << bits_stored) - 1 if not signed else 32767
    stored = np.empty((n_slices, size, size), dtype=np.int16 if signed else np.uint16)
    noise_rng = rng_for(seed, 3)
    # [1 2 1]/4 in-plane smoothing: makes the noise look like reconstructed CT noise and softens
    # edges a little (partial volume). It scales white noise std by 0.375 (sum of squared
    # weights = (6/16)^2 in 2-D), so draw it larger to end at noise_sigma.
    kernel = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    white = np.float32(noise * noise_sigma / 0.375)
    for k0 in range(0, n_slices, CHUNK):
        ks = slice(k0, min(k0 + CHUNK, n_slices))
        chunk, labels[ks] = _render_chunk(an, code, xl, yl, zl[ks], position.endswith("S"))
        # hu_offset goes in before the rescale so it drifts stored values, as a miscalibrated
        # scanner would; everything below is in place to keep a 100-slice 512 series ~1 s.
        chunk += np.float32(hu_offset - intercept)
        if clean is not None:
            clean[ks] = chunk + np.float32(intercept)
        # Noise: sum of two uniform int8 draws (triangular, std 104.5), made near-Gaussian by the
        # 9-tap smoothing below; 5x cheaper than standard_normal, which dominated the run time.
        # Always drawn (even for noise=0) so the stream never depends on the knob.
        raw = np.frombuffer(noise_rng.bytes(2 * chunk.size), dtype=np.int8).reshape(2, *chunk.shape)
        n = raw[0].astype(np.float32)
        n += raw[1]
        n *= white / np.float32(TRI_STD)
        chunk += n
        ndimage.correlate1d(chunk, kernel, axis=2, output=chunk, mode="nearest")
        ndimage.correlate1d(chunk, kernel, axis=1, output=chunk, mode="nearest")
        # Quantise: stored = (HU - intercept) / slope, within the pixel representation.
        if slope != 1.0:
            chunk *= np.float32(1.0 / slope)
        np.rint(chunk, out=chunk)
        np.clip(chunk, 0, hi_stored, out=chunk)
        stored[ks] = chunk
        # What a reader decodes: stored * slope + intercept (exact in float32 for these ranges).
        np.multiply(stored[ks], np.float32(slope), out=hu[ks], casting="unsafe")
        hu[ks] += np.float32(intercept)

    # --- DICOM ---
    knobs = _knob_key(
        size=size,
        slices=slices,
        hu_offset=float(hu_offset),
        noise=float(noise),
        slice_thickness=slice_thickness,
        manufacturer=manufacturer,
        patient_position=patient_position,
    )
    study_uid = make_uid("ct", seed, knobs, "study")
    series_uid = make_uid("ct", seed, knobs, "series")
    frame_uid = make_uid("ct", seed, knobs, "frame")
    order = list(range(n_slices)) if ascending_files else list(range(n_slices - 1, -1, -1))
    thk_txt = f"{thickness:g}"
    common = {
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_uid": frame_uid,
        "ident": ident,
        "position": position,
        "iop": [*row_dir.tolist(), *col_dir.tolist()],
        "spacing": spacing,
        "thickness": thickness,
        "scanner": scanner,
        "kvp": kvp,
        "ma": ma,
        "fov": fov,
        "table_height": table_height,
        "description": description.format(t=thk_txt),
        "series_number": series_number,
        "slope": slope,
        "signed": signed,
        "bits_stored": bits_stored,
    }
    datasets = []
    for file_idx, k in enumerate(order):
        instance_number = file_idx + 1 if instance_follows_files else n_slices - file_idx
        ipp = [origin[0], origin[1], z_pat[k]]
        sop_uid = make_uid("ct", seed, knobs, "instance", k)
        datasets.append(_ct_slice(common, sop_uid, instance_number, ipp, stored[k]))

    voxel_ml = thickness * spacing * spacing / 1000.0
    # Per slice: a whole-volume bincount would convert the labels to intp (8 bytes a voxel).
    counts = sum(np.bincount(lab.ravel(), minlength=len(CT_LABELS)) for lab in labels)
    truth: dict[str, Any] = {
        "modality": "CT",
        "study_uid": str(study_uid),
        "series_uid": str(series_uid),
        "n_instances": n_slices,
        "labels": {
            name: {"value": v, "volume_ml": round(float(counts[v]) * voxel_ml, 3), "voxels": int(counts[v])}
            for v, name in enumerate(CT_LABELS)
            if v > 0
        },
        "geometry": {
            "shape_zyx": [n_slices, size, size],
            "spacing_zyx_mm": [thickness, spacing, spacing],
            "origin_lps_mm": [float(v) for v in origin],
            "row_dir": [float(v) for v in row_dir],
            "col_dir": [float(v) for v in col_dir],
            "slice_normal": [float(v) for v in normal],
            "patient_position": position,
            "ascending_files": ascending_files,
            "instance_numbers_follow_files": instance_follows_files,
            "voxel_volume_ml": voxel_ml,
        },
        "acquisition": {
            "manufacturer": scanner[0],
            "model": scanner[1],
            "kvp": kvp,
            "slice_thickness_mm": thickness,
            "pixel_spacing_mm": spacing,
            "rescale_slope": slope,
            "rescale_intercept": intercept,
            "pixel_representation": int(signed),
            "bits_stored": bits_stored,
            "series_description": common["description"],
        },
        "params": {
            "seed": seed,
            "size": size,
            "slices": n_slices,
            "hu_offset": float(hu_offset),
            "noise": float(noise),
            "noise_sigma_hu": noise_sigma * noise,
            "slice_thickness": thickness,
            "manufacturer": scanner[0],
        },
    }
    return CTPhantom(datasets=datasets, labels=labels, truth=truth, hu=hu, hu_clean=clean)


def _ct_slice(
    common: dict[str, Any],
    sop_uid: pydicom.uid.UID,
    instance_number: int,
    ipp: list[float],
    stored: np.ndarray,
) -> pydicom.Dataset:
    """One CT Image Storage instance. Takes the series-wide values, the slice's SOP UID, number,
    IPP and stored frame; returns the dataset (file meta included)."""
    ident: Identity = common["ident"]
    ds = new_dataset(CT_IMAGE_STORAGE, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = ident.study_date
    ds.StudyDate = ident.study_date
    add_patient_study(ds, ident, common["study_uid"])
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
    ds.Modality = "CT"
    ds.Manufacturer, ds.ManufacturerModelName, kernel = common["scanner"]
    ds.SeriesInstanceUID = common["series_uid"]
    ds.SeriesNumber = common["series_number"]
    ds.SeriesDescription = common["description"]
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = common["position"]
    ds.FrameOfReferenceUID = common["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.ContrastBolusAgent = "IV CONTRAST"
    ds.SliceThickness = ds_str(common["thickness"])
    ds.KVP = ds_str(common["kvp"])
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = ds_str(round(common["fov"], 2))
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = ds_str(round(common["table_height"], 1))
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = common["ma"]
    ds.ConvolutionKernel = kernel
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = ds_multi(ipp)
    ds.ImageOrientationPatient = ds_multi(common["iop"])
    ds.SliceLocation = ds_str(ipp[2])
    ds.PixelSpacing = ds_multi([common["spacing"], common["spacing"]])
    add_pixels(ds, stored, bits_stored=common["bits_stored"], signed=common["signed"])
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = ds_str(common["slope"])
    ds.RescaleType = "HU"
    return ds


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
