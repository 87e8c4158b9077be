"""Random abdominal anatomy of one CT phantom, as implicit shapes in body-local millimetres.

Takes the phantom's anatomy random stream (:func:`draw_anatomy`); returns an :class:`Anatomy`:
body and wall sizes, spine and rib parameters, tissue HU, and the organs (liver, spleen, kidneys,
stomach, bowel gas) as :class:`Blob` level sets. Coordinates are body-local LPS mm (x: patient
left, y: posterior, z: superior; origin on the body axis, z = 0 near the renal hila). Nothing
here knows about image grids: :mod:`deploy.synth.ct_render` samples this anatomy.

The order of the random draws is part of the phantom format: every seed's anatomy (and so the
trained reference models and their tests) depends on it, so draws are never reordered or skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Cavity texture grid: TEX_N x TEX_N samples every TEX_MM mm, centred on the body axis.
TEX_N, TEX_MM = 201, 2.0

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
#: One cosine perturbation of a blob: (amplitude, kx, ky, kz, phase x, phase y, phase z).
Wave = tuple[float, float, float, float, float, float, float]


@dataclass(frozen=True)
class Blob:
    """Deformed ellipsoid: inside where ``d^T M d < 1 + sum(amp * cos(kx dx + px) cos(ky dy + py)
    cos(kz dz + pz))`` with ``d`` the offset (mm) from ``center`` in body-local coordinates.

    The quadratic form and the product-of-cosines perturbation are both separable, so a 3-D
    evaluation costs a handful of broadcast operations instead of a rotated-coordinate transform.
    """

    center: F64  # (3,) x, y, z mm, body-local
    matrix: F64  # (3, 3) R diag(1/s^2) R^T
    extent: F64  # (3,) half-size of an axis-aligned box that contains the deformed blob
    waves: tuple[Wave, ...] = ()

    def q(self, dx: F64, dy: F64, dz: F64) -> F32:
        """Signed level (``< 0`` inside) on the grid ``dz x dy x dx`` (1-D offsets, mm); float32."""
        m = self.matrix
        xy = m[0, 0] * dx[None, :] ** 2 + m[1, 1] * dy[:, None] ** 2 + 2 * m[0, 1] * dy[:, None] * dx[None, :]
        zx = m[2, 2] * dz[:, None] ** 2 + 2 * m[0, 2] * dz[:, None] * dx[None, :]
        zy = 2 * m[1, 2] * dz[:, None] * dy[None, :]
        level: F32 = (xy - 1.0).astype(np.float32)[None] + zx.astype(np.float32)[:, None, :]
        level += zy.astype(np.float32)[:, :, None]
        for amp, kx, ky, kz, px, py, pz in self.waves:
            plane = amp * np.cos(kx * dx[None, :] + px) * np.cos(ky * dy[:, None] + py)
            level -= plane.astype(np.float32)[None] * np.cos(kz * dz + pz).astype(np.float32)[:, None, None]
        return level


def rotation(rz: float, ry: float = 0.0, rx: float = 0.0) -> F64:
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
    r: F64 = r_z @ r_y @ r_x
    return r


def random_blob(
    rng: np.random.Generator,
    center: tuple[float, float, float],
    semi: tuple[float, float, float],
    rot: F64 | None = None,
    *,
    n_waves: int = 3,
    amp: tuple[float, float] = (0.08, 0.22),
    wavelength: tuple[float, float] = (70.0, 180.0),
) -> Blob:
    """Random smooth deformation of an ellipsoid with semi-axes ``semi`` (mm) rotated by ``rot``.

    Low-frequency cosine waves (wavelengths ``wavelength`` mm) perturb the level set so every
    seed gives a different, still organ-like, outline.
    """
    r = np.eye(3) if rot is None else rot
    s = np.asarray(semi, dtype=np.float64)
    matrix = r @ np.diag(1.0 / s**2) @ r.T
    waves: list[Wave] = []
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
    return Blob(np.asarray(center, dtype=np.float64), matrix, extent, tuple(waves))


#: One rib cross-section: (x, y, radius, z_start, phase), mm.
Rib = tuple[float, float, float, float, float]


@dataclass(frozen=True)
class Organs:
    """The organ blobs of one abdomen (body-local mm)."""

    liver: tuple[Blob, Blob]  # (right lobe, left lobe)
    spleen: Blob
    kidneys: tuple[Blob, Blob]  # (left, right)
    stomach: Blob
    gas: tuple[Blob, ...]


@dataclass(frozen=True)
class Anatomy:
    """All random anatomy of one phantom (body-local mm, HU values)."""

    body: tuple[float, float]  # semi-axes of the skin ellipse (x, y)
    fat: float  # subcutaneous fat thickness
    wall: float  # muscle wall thickness
    spine_y: float  # y of the vertebral body centre
    vb_radius: float
    vertebra_period: float
    vertebra_phase: float
    ribs: tuple[Rib, ...]
    hu: dict[str, float]
    organs: Organs
    kidney_medulla: float  # level below which the kidney is medulla (fraction of q range)
    texture_fields: F32  # (F, TEX_N, TEX_N) float32, unit std, on the TEX_MM grid
    texture: tuple[tuple[float, float], ...]  # (angular frequency in z, phase) per field
    table_gap: float

    @property
    def cavity(self) -> tuple[float, float]:
        a, b = self.body
        inset = self.fat + self.wall
        return a - inset, b - inset

    def z_extent(self) -> tuple[float, float]:
        """Lowest and highest z (mm, body-local) reached by any labelled organ."""
        o = self.organs
        blobs = [*o.liver, o.spleen, *o.kidneys]
        lo = min(float(b.center[2] - b.extent[2]) for b in blobs)
        hi = max(float(b.center[2] + b.extent[2]) for b in blobs)
        return lo, hi


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one random abdomen. Takes the anatomy stream; returns an :class:`Anatomy`.

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
    ribs = _draw_ribs(rng, ca, cb, wall)
    hu = _draw_hu(rng)
    organs = _draw_organs(rng, ca, cb, spine_y)
    fields, texture = _draw_texture(rng)
    # Keyword order below is draw order (vertebrae, medulla, table): keep it.
    return Anatomy(
        body=body,
        fat=fat,
        wall=wall,
        spine_y=spine_y,
        vb_radius=vb,
        vertebra_period=u(30, 36),
        vertebra_phase=u(0, 36),
        ribs=ribs,
        hu=hu,
        organs=organs,
        kidney_medulla=u(0.45, 0.55),
        texture_fields=fields,
        texture=texture,
        table_gap=u(0, 8),
    )


def _draw_ribs(rng: np.random.Generator, ca: float, cb: float, wall: float) -> tuple[Rib, ...]:
    """Rib cross-sections in the muscle wall: lateral and posterolateral arcs, lower laterally."""
    u = rng.uniform
    ribs: list[Rib] = []
    for side in (-1.0, 1.0):
        for theta_deg in np.linspace(-40, 55, 7) + u(-4, 4):
            theta = math.radians(theta_deg)
            x = side * (ca + wall * 0.5) * math.cos(theta)
            y = (cb + wall * 0.5) * math.sin(theta)
            z_start = -45 + 70 * abs(math.sin(theta)) + u(-8, 8)
            ribs.append((x, y, u(5.0, 7.0), z_start, u(0, 30)))
    return tuple(ribs)


def _draw_hu(rng: np.random.Generator) -> dict[str, float]:
    """Mean HU of every tissue (portal venous phase)."""
    u = rng.uniform
    return {
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


def _draw_organs(rng: np.random.Generator, ca: float, cb: float, spine_y: float) -> Organs:
    """Liver, spleen, kidneys, stomach and bowel gas inside the cavity of semi-axes (ca, cb)."""
    u = rng.uniform
    # Liver: big right lobe against the right wall plus a thinner left lobe crossing the midline
    # anteriorly; the cavity clips it so it conforms to the abdominal wall.
    z_liver = u(35, 55)
    right = random_blob(
        rng,
        (-(ca - u(62, 72)), -cb * u(0.02, 0.12), z_liver),
        (u(79.5, 86), u(72, 79), u(67, 73)),
        rotation(u(-0.2, 0.2)),
    )
    left = random_blob(
        rng,
        (u(5, 20), -cb * u(0.45, 0.55), z_liver + u(15, 30)),
        (u(55, 68), u(26, 34), u(38, 48)),
        rotation(u(-0.25, 0.1)),
        n_waves=2,
    )
    # Spleen: posterolateral left, elongated along the ribs, thin axis pointing at the wall.
    spleen = random_blob(
        rng,
        (ca - u(48, 56), cb * u(0.28, 0.38), z_liver + u(0, 15)),
        (u(40, 45), u(23, 26.5), u(60, 68)),
        rotation(math.radians(u(-60, -40)), math.radians(u(-15, 15)), math.radians(u(10, 25))),
        wavelength=(60.0, 140.0),
    )
    # Kidneys: beside the spine, lateral to psoas, hila anteromedial, upper poles medial; the
    # right one a little lower (pushed down by the liver).
    kidneys = []
    for side, dz in ((1.0, u(-12, 0)), (-1.0, u(-28, -14))):
        kidneys.append(
            random_blob(
                rng,
                (side * u(64, 72), spine_y + u(0, 12), dz),
                (u(29.5, 32), u(23.5, 25.5), u(55, 60)),
                rotation(side * math.radians(u(20, 35)), side * math.radians(u(-14, -6))),
                n_waves=2,
                amp=(0.04, 0.1),
            )
        )
    stomach = random_blob(
        rng,
        (u(20, 45), -cb * u(0.25, 0.4), z_liver + u(0, 20)),
        (u(30, 42), u(25, 32), u(38, 50)),
        rotation(u(-0.5, 0.0)),
        n_waves=2,
    )
    gas = tuple(
        random_blob(
            rng,
            (u(-0.6, 0.6) * ca, -cb * u(0.1, 0.7), u(-90, -20)),
            (u(7, 18), u(6, 14), u(8, 20)),
            n_waves=1,
            amp=(0.05, 0.15),
            wavelength=(30.0, 60.0),
        )
        for _ in range(int(rng.integers(2, 7)))
    )
    return Organs(
        liver=(right, left), spleen=spleen, kidneys=(kidneys[0], kidneys[1]), stomach=stomach, gas=gas
    )


def _draw_texture(rng: np.random.Generator) -> tuple[F32, tuple[tuple[float, float], ...]]:
    """Bowel / mesentery texture: unit-std smooth 2-D fields and their (z frequency, phase).

    The fields live on a fixed patient-space grid (TEX_MM mm, +-200 mm) and are blended along z
    by slow cosines: sampling them in patient space keeps the texture identical whatever the
    image grid, and costs a few 2-D operations per series.
    """
    u = rng.uniform
    fields: F32 = ndimage.gaussian_filter(
        rng.standard_normal((4, TEX_N, TEX_N)).astype(np.float32), sigma=(0, 4.5, 4.5), mode="wrap"
    )
    fields /= fields.std(axis=(1, 2), keepdims=True)
    texture = tuple((2 * math.pi / u(50, 120), u(0, 2 * math.pi)) for _ in range(fields.shape[0]))
    return fields, texture
