"""Random head anatomy and lesions of one MR phantom, as relative T1 intensities (WM = 1).

Takes the anatomy and lesion random streams and head-frame coordinates (mm; u: patient left,
v: posterior) of every pixel; returns float32 images of relative T1 post-contrast intensity
before any acquisition effect:

* :func:`draw_head` draws the head outline and layer thicknesses (:class:`Head`);
* :func:`draw_lesion` draws the lesion of a class and difficulty (:class:`Lesion`, or None);
* :func:`render_anatomy` draws the normal anatomy at the pixels (scalp, skull with diploe, CSF,
  folded cortex, white matter, ventricles or skull-base structures), displaced by the lesion's
  mass effect, paints the lesion and returns the image with the lesion mask.

The order of the random draws is part of the phantom format (the trained reference models and
their tests depend on it): draws are never reordered or skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]
#: Head-frame coordinate planes (float32 from the pixel grid, float64 where derived from them).
Coords = npt.NDArray[np.floating]

# Relative T1 post-contrast intensities (white matter = 1).
T1 = {
    "air": 0.0,
    "skin": 0.75,
    "scalp": 1.25,
    "bone": 0.07,
    "diploe": 0.55,
    "csf": 0.2,
    "gm": 0.72,
    "wm": 1.0,
    "deep_gm": 0.8,
    "choroid": 1.35,
    "sinus": 1.45,
    "cavernous": 1.35,
    "gland": 1.12,
    "sphenoid": 0.03,
    "brainstem": 0.93,
    "cerebellum": 0.76,
}


@dataclass(frozen=True)
class Head:
    """Head outline and layers (mm): ``semi`` the (u, v) semi-axes, ``layers`` the skin, scalp,
    skull and CSF thicknesses, ``sella_v`` the v of the sella."""

    semi: tuple[float, float]
    layers: dict[str, float]
    sella_v: float

    @property
    def inner(self) -> float:
        """Depth (mm) of the inner skull table below the skin."""
        return self.layers["skin"] + self.layers["scalp"] + self.layers["skull"]


def draw_head(rng: np.random.Generator) -> Head:
    """Draw the head outline and layers from the anatomy stream (first draws of that stream)."""
    semi = (float(rng.uniform(68, 78)), float(rng.uniform(86, 96)))
    layers = {
        "skin": float(rng.uniform(1.5, 2.5)),
        "scalp": float(rng.uniform(3.5, 6.0)),
        "skull": float(rng.uniform(5.0, 8.0)),
        "csf": float(rng.uniform(1.5, 3.0)),
    }
    return Head(semi=semi, layers=layers, sella_v=float(rng.uniform(-8, 6)))


@dataclass(frozen=True)
class Lesion:
    """Lesion description in head-frame mm (u: patient left, v: posterior)."""

    kind: str
    center: tuple[float, float]
    radius: float
    contrast: float  # relative enhancement over white matter
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of outline harmonics k = 2..
    extra: dict[str, float]


def _outline(phi: Coords, harmonics: tuple[tuple[float, float], ...]) -> Coords:
    """Radius factor 1 + sum_k a_k cos(k phi + p_k) for k = 2, 3, ... (irregular outlines)."""
    out = np.ones_like(phi)
    for k, (a, p) in enumerate(harmonics, start=2):
        out += a * np.cos(k * phi + p)
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> F32:
    """Unit-std smooth random field (float32) of ``shape``: Gaussian-filtered white noise."""
    f: F32 = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def draw_lesion(
    rng: np.random.Generator,
    cls: str,
    difficulty: str,
    head: tuple[float, float],
    inner: float,
    sella_v: float,
) -> Lesion | None:
    """Random lesion of class ``cls`` at ``difficulty``; None for no_tumour.

    ``head`` are the head semi-axes (mm), ``inner`` the depth (mm) of the inner skull table and
    ``sella_v`` the v of the sella. Every draw is made whatever the class so the stream layout
    is fixed.
    """
    u = rng.uniform
    size = {"obvious": 1.0, "subtle": 0.0, "artefact": 0.5}[difficulty]
    harmonics = tuple((u(0.03, 0.16), u(0, 2 * math.pi)) for _ in range(4))
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    angle = u(0, 2 * math.pi)
    frac = (u(), u(), u())
    a, b = head
    if cls == "glioma":
        radius = (6 + 4 * frac[0]) + size * (10 + 6 * frac[1] - 4 * frac[0])  # 6-10 .. 16-26 mm
        contrast = (0.18 + 0.12 * frac[2]) + size * (0.45 + 0.15 * frac[2])  # 0.18-0.3 .. 0.63-0.9
        # Intra-axial: inside one hemisphere, far enough from the cortex surface and midline.
        reach_u = max(a - inner - radius - 14, 8.0)
        reach_v = max(b - inner - radius - 16, 8.0)
        center = (
            side * (12 + radius * 0.6 + u(0, max(reach_u - 12 - radius * 0.6, 1.0))),
            u(-1, 1) * reach_v * 0.8,
        )
        extra = {
            "oedema": u(1.4, 2.1) if difficulty != "subtle" else u(1.15, 1.4),
            "rim": u(0.25, 0.4),
            "necrosis": 0.45 if difficulty != "subtle" else 0.85,
            "mass_effect": 0.25 * size,
        }
        return Lesion("glioma", center, radius, contrast, harmonics, extra)
    if cls == "meningioma":
        radius = (6 + 4 * frac[0]) + size * (8 + 6 * frac[1] - 2 * frac[0])  # 6-10 .. 14-22 mm
        contrast = (0.22 + 0.13 * frac[2]) + size * (0.4 + 0.1 * frac[2])
        # Dural-based: centre just inside the inner table at a random convexity angle (not the
        # skull base: keep it to the anterior, lateral and posterior convexities).
        ca, sa = math.cos(angle), math.sin(angle)
        rho = 1.0 / math.sqrt((ca / a) ** 2 + (sa / b) ** 2)  # head radius along that angle
        depth = inner + radius * u(0.4, 0.7)
        center = ((rho - depth) * ca, (rho - depth) * sa)
        extra = {"tail": 1.0 if difficulty != "subtle" else 0.0, "mass_effect": 0.2 * size, "angle": angle}
        return Lesion(
            "meningioma", center, radius, contrast, tuple((h[0] * 0.3, h[1]) for h in harmonics), extra
        )
    if cls == "pituitary":
        # Subtle still has to beat the normal gland (r <= 5 mm, 1.12 x WM): bigger and brighter.
        radius = (4.5 + 2 * frac[0]) + size * (4 + 3 * frac[1] - frac[0])  # 4.5-6.5 .. 8.5-12.5 mm
        contrast = (0.35 + 0.15 * frac[2]) + size * (0.3 + 0.1 * frac[2])
        center = (u(-1.5, 1.5), sella_v + u(-1.5, 1.5))
        return Lesion("pituitary", center, radius, contrast, tuple((h[0] * 0.4, h[1]) for h in harmonics), {})
    return None


def render_anatomy(
    anat: np.random.Generator,
    les_rng: np.random.Generator,
    head: Head,
    lesion: Lesion | None,
    uu: Coords,
    vv: Coords,
    *,
    sellar: bool,
    spacing: float,
) -> tuple[F32, Mask | None]:
    """Relative T1 image of the head at head-frame pixel coords ``uu``, ``vv`` (mm), lesion painted.

    Takes the anatomy stream (after :func:`draw_head`), the lesion stream (after
    :func:`draw_lesion`), the slice level (``sellar``) and the pixel spacing (mm, scales the
    texture). Returns (image, lesion mask or None).
    """
    uu_a: Coords
    vv_a: Coords
    if lesion is not None and lesion.extra.get("mass_effect", 0.0) > 0:
        # Mass effect: anatomy around the lesion is pushed outwards, i.e. what lies at p was at
        # c + (p - c)(1 - m g(|p - c|)) before the mass grew.
        cu, cv = lesion.center
        d2 = (uu - cu) ** 2 + (vv - cv) ** 2
        g = lesion.extra["mass_effect"] * np.exp(-d2 / (2 * (1.8 * lesion.radius) ** 2))
        uu_a, vv_a = cu + (uu - cu) * (1 - g), cv + (vv - cv) * (1 - g)
    else:
        uu_a, vv_a = uu, vv
    img = _render_head(anat, uu_a, vv_a, head, sellar, spacing)
    if lesion is None:
        return img, None
    # Brain and "inside the inner table" masks for the lesion (on the undeformed frame: the
    # lesion sits where it is drawn).
    a, b = head.semi
    rho = np.sqrt((uu / a) ** 2 + (vv / b) ** 2) / (1.0 + 0.04 * np.sin(np.arctan2(vv, uu)))
    depth = (1.0 - rho) * 0.5 * (a + b)
    brain = depth >= head.inner + head.layers["csf"]
    inner_surface = depth >= head.inner
    return img, _paint_lesion(img, lesion, uu, vv, brain, inner_surface, les_rng, spacing)


def _render_head(
    rng: np.random.Generator, uu: Coords, vv: Coords, head: Head, sellar: bool, spacing: float
) -> F32:
    """Relative T1 intensity (WM = 1) of normal anatomy at head-frame coords ``uu``, ``vv`` (mm)."""
    u = rng.uniform
    a, b = head.semi
    phi = np.arctan2(vv, uu)
    # Head outline: ellipse with a slightly narrower frontal end and low-order bumps.
    shape = 1.0 + 0.04 * np.sin(phi) + u(0.0, 0.03) * np.cos(3 * phi + u(0, 6.3))
    rho = np.sqrt((uu / a) ** 2 + (vv / b) ** 2) / shape
    depth = (1.0 - rho) * 0.5 * (a + b)  # ~ mm below the skin
    img = np.zeros(uu.shape, dtype=np.float32)
    layers = head.layers
    skin, scalp, skull, csf = layers["skin"], layers["scalp"], layers["skull"], layers["csf"]
    t_brain = skin + scalp + skull + csf
    img[depth >= 0] = T1["skin"]
    img[depth >= skin] = T1["scalp"]
    img[depth >= skin + scalp] = T1["bone"]
    diploe = (depth >= skin + scalp + skull * 0.33) & (depth < skin + scalp + skull * 0.67)
    img[diploe] = T1["diploe"]
    img[depth >= skin + scalp + skull] = T1["csf"]
    brain = depth >= t_brain
    img[brain] = T1["wm"]

    # Cortex: folded grey-matter ribbon; sulci are CSF clefts reaching into it.
    db = depth - t_brain
    k1, k2 = int(rng.integers(18, 27)), int(rng.integers(8, 14))
    fold = np.cos(k1 * phi + u(0, 6.3)) + 0.6 * np.cos(k2 * phi + u(0, 6.3))
    gm_thick = u(2.5, 3.5) + 3.0 * (0.5 + 0.5 * np.tanh(fold))
    img[brain & (db < gm_thick)] = T1["gm"]
    # Sulci: CSF clefts where the fold pattern peaks, deepest at the peak, lined by grey matter.
    sulcal_depth = u(10, 16) * np.clip((fold - 0.6) / 1.0, 0, 1)
    img[brain & (db < sulcal_depth + gm_thick) & (fold > 0.6) & (db >= gm_thick)] = T1["gm"]
    img[brain & (db < sulcal_depth) & (fold > 0.75)] = T1["csf"]
    # Interhemispheric fissure and falx front and back.
    fissure = brain & (np.abs(uu) < 1.2) & ((vv < -b * 0.35) | (vv > b * 0.45))
    img[fissure] = T1["csf"]
    # Superior sagittal sinus: enhancing triangle at the midline inner table, front and back.
    for sign in (-1.0, 1.0):
        sss = (np.abs(uu) < 3.0) & (depth >= skin + scalp + skull - 0.5) & (depth < t_brain + 3.0)
        sss &= np.sign(vv) == sign
        img[sss] = T1["sinus"]

    if sellar:
        _paint_skull_base(img, rng, uu, vv, brain, head.sella_v)
    else:
        _paint_ventricles(img, rng, uu, vv)

    # Parenchymal texture: a few percent of smooth variation, in brain only.
    tex = _smooth_field(rng, uu.shape, sigma=2.5 / spacing)
    img[brain] *= 1.0 + 0.03 * tex[brain]
    return img


def _paint_ventricles(img: F32, rng: np.random.Generator, uu: Coords, vv: Coords) -> None:
    """Ventricular level: lateral ventricles (frontal horns diverging forwards, atria behind),
    caudate heads, thalami and enhancing choroid plexus in the atria."""
    u = rng.uniform
    vscale = u(0.75, 1.45)
    for side in (-1.0, 1.0):
        ang = side * math.radians(u(6, 12))
        cu, cv = side * u(6, 8) * vscale**0.5, u(-8, -2)
        ru = (uu - cu) * math.cos(ang) + (vv - cv) * math.sin(ang)
        rv = -(uu - cu) * math.sin(ang) + (vv - cv) * math.cos(ang)
        img[((uu - side * 13) / 7) ** 2 + ((vv + 14) / 9) ** 2 < 1] = T1["deep_gm"]  # caudate
        img[((uu - side * 11) / 8) ** 2 + ((vv - 10) / 12) ** 2 < 1] = T1["deep_gm"]  # thalamus
        img[(ru / (4.5 * vscale)) ** 2 + (rv / (22 * vscale**0.3)) ** 2 < 1] = T1["csf"]
        atrium = ((uu - side * 15 * vscale**0.3) / (5 * vscale)) ** 2 + ((vv - 22) / 8) ** 2 < 1
        img[atrium] = T1["csf"]
        img[((uu - side * 15 * vscale**0.3) / 2.5) ** 2 + ((vv - 23) / 3.5) ** 2 < 1] = T1["choroid"]


def _paint_skull_base(
    img: F32, rng: np.random.Generator, uu: Coords, vv: Coords, brain: Mask, sella_v: float
) -> None:
    """Skull base: sphenoid sinus (air) in front of the sella, suprasellar cistern, cavernous
    sinuses either side of the normal gland, brainstem and cerebellum behind, temporal horns."""
    u = rng.uniform
    img[(uu / u(12, 17)) ** 2 + ((vv - sella_v + 24) / u(8, 11)) ** 2 < 1] = T1["bone"]
    img[(uu / u(9, 13)) ** 2 + ((vv - sella_v + 24) / u(5, 8)) ** 2 < 1] = T1["sphenoid"]
    r_c = np.hypot(uu, vv - sella_v - 9)
    star = 9.0 * (1 + 0.35 * np.cos(5 * np.arctan2(vv - sella_v - 9, uu) + u(0, 6.3)))
    img[brain & (r_c < star)] = T1["csf"]
    for side in (-1.0, 1.0):
        img[((uu - side * 10.5) / 4.5) ** 2 + ((vv - sella_v) / 7) ** 2 < 1] = T1["cavernous"]
        img[((uu - side * u(28, 34)) / 2) ** 2 + ((vv - sella_v - 6) / 6) ** 2 < 1] = T1["csf"]
    img[(uu / u(3.5, 5)) ** 2 + ((vv - sella_v) / u(3, 4)) ** 2 < 1] = T1["gland"]
    stem_v = sella_v + u(26, 32)
    img[(uu / u(13, 16)) ** 2 + ((vv - stem_v) / u(11, 14)) ** 2 < 1] = T1["brainstem"]
    img[(uu / 2.5) ** 2 + ((vv - stem_v - 9) / 2) ** 2 < 1] = T1["csf"]
    # Cerebellar hemispheres behind the fourth ventricle, with concentric folia.
    cereb = np.zeros(uu.shape, dtype=bool)
    for side in (-1.0, 1.0):
        cereb |= ((uu - side * u(20, 26)) / u(22, 28)) ** 2 + ((vv - stem_v - u(30, 36)) / u(18, 24)) ** 2 < 1
    cereb &= brain & (vv > stem_v + 8)
    folia = 0.88 + 0.12 * np.sin(np.hypot(uu, vv - stem_v) * 2 * math.pi / 4.0)
    img[cereb] = (T1["cerebellum"] * folia[cereb]).astype(np.float32)
    img[(uu / 5) ** 2 + ((vv - stem_v - 14) / 3) ** 2 < 1] = T1["csf"]  # fourth ventricle


def _paint_lesion(
    img: F32,
    lesion: Lesion,
    uu: Coords,
    vv: Coords,
    brain: Mask,
    inner_surface: Mask,
    rng: np.random.Generator,
    spacing: float,
) -> Mask:
    """Paint ``lesion`` into ``img`` (relative units, in place); return its bool mask."""
    cu, cv = lesion.center
    du, dv = uu - cu, vv - cv
    r = np.hypot(du, dv)
    phi = np.arctan2(dv, du)
    outline = lesion.radius * _outline(phi, lesion.harmonics)
    het = _smooth_field(rng, uu.shape, sigma=1.5 / spacing)
    c = lesion.contrast
    if lesion.kind == "glioma":
        oedema = brain & (r < outline * lesion.extra["oedema"] * _outline(phi + 1.0, lesion.harmonics))
        img[oedema] = np.minimum(img[oedema], 0.78 + 0.04 * het[oedema])
        mass: Mask = brain & (r < outline)
        rim = mass & (r >= outline * (1 - lesion.extra["rim"]))
        core = mass & ~rim
        img[rim] = (1.0 + c) * (1.0 + 0.08 * het[rim])
        img[core] = lesion.extra["necrosis"] * (1.0 + 0.1 * het[core])
        return mass
    if lesion.kind == "meningioma":
        # Extra-axial: fills up to the inner table (never into bone), homogeneous.
        mass = inner_surface & (r < outline)
        if lesion.extra.get("tail", 0.0) > 0:
            # Dural tail: thin enhancing dura tapering away along the inner table.
            ang = lesion.extra["angle"]
            dphi = np.abs(np.angle(np.exp(1j * (np.arctan2(vv, uu) - ang))))
            span = lesion.radius * 1.6 / (0.5 * float(np.hypot(*lesion.center)) + 1e-6)
            tail = inner_surface & (dphi < span) & ~brain
            img[tail] = 1.0 + c * 0.8
        cleft = inner_surface & (r < outline + 1.2) & ~mass & brain
        img[cleft] = T1["csf"]
        img[mass] = (1.0 + c) * (1.0 + 0.025 * het[mass])
        return mass
    # pituitary
    mass = r < outline
    img[mass] = (1.0 + c) * (1.0 + 0.05 * het[mass])
    return mass
