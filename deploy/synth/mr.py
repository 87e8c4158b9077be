"""Synthetic 2-D brain MR slices (axial T1 post-contrast) for the mr-brain-cls classifier.

Each phantom is one single-instance MR Image Storage series: a head (scalp, skull with diploe,
CSF, folded cortex, white matter, ventricles or skull-base structures) drawn from implicit
shapes in head-frame millimetres, plus at most one lesion of the requested class:

* ``no_tumour`` - normal anatomy only (including the normal enhancing structures a model must
  not mistake for lesions: choroid plexus, dural sinuses, cavernous sinuses, pituitary gland);
* ``glioma`` - irregular intra-axial hemispheric mass: enhancing rim, necrotic core, oedema;
* ``meningioma`` - extra-axial, dural-based, well-circumscribed, homogeneously bright, dural tail;
* ``pituitary`` - bright lesion at the midline sella on a skull-base slice.

Difficulty: ``obvious`` (large, high contrast), ``subtle`` (small, low contrast), ``artefact``
(medium lesion plus motion ghosting along the phase-encode axis, stronger Rician noise and a bias
field). Intensities are arbitrary MR units (0-4000) with a random global scale per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage

from ._common import MR_CLASSES, MR_DIFFICULTIES, check_seed, rng_for
from .dicomio import (
    MR_IMAGE_STORAGE,
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

#: (Manufacturer, ManufacturerModelName, field strength T)
MR_SCANNERS: tuple[tuple[str, str, float], ...] = (
    ("SIEMENS", "MAGNETOM Skyra", 3.0),
    ("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5),
    ("Philips Medical Systems", "Ingenia", 3.0),
    ("Canon Medical Systems", "Vantage Orian", 1.5),
)
SERIES_DESCRIPTIONS: tuple[str, ...] = ("AX T1 POST", "AX T1 +C", "T1 AX POST GAD", "AX T1 SE POST")
MATRIX_SIZES: tuple[int, ...] = (256, 256, 256, 256, 256, 224, 240)
#: Stored values are 12-bit: the global scale keeps the brightest tissue well below this.
MAX_STORED = 4095

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
    image: np.ndarray
    cls: str
    class_index: int
    difficulty: str
    truth: dict[str, Any]
    lesion_mask: np.ndarray | None = field(default=None)


@dataclass(frozen=True)
class _Lesion:
    """Lesion description in head-frame mm (u: patient left, v: posterior)."""

    kind: str
    center: tuple[float, float]
    radius: float
    contrast: float  # relative enhancement over white matter
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of outline harmonics k = 2..
    extra: dict[str, float]


def _outline(phi: np.ndarray, harmonics: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Radius factor 1 + sum_k a_k cos(k phi + p_k) for k = 2, 3, ... (irregular outlines)."""
    out = np.ones_like(phi)
    for k, (a, p) in enumerate(harmonics, start=2):
        out += a * np.cos(k * phi + p)
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-std smooth random field (float32) of ``shape``: Gaussian-filtered white noise."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def _draw_lesion(
    rng: np.random.Generator,
    cls: str,
    difficulty: str,
    head: tuple[float, float],
    inner: float,
    sella_v: float,
) -> _Lesion | None:
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
        return _Lesion("glioma", center, radius, contrast, harmonics, extra)
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
        return _Lesion(
            "meningioma", center, radius, contrast, tuple((h[0] * 0.3, h[1]) for h in harmonics), extra
        )
    if cls == "pituitary":
        # Subtle still has to beat the normal gland (r <= 5 mm, 1.12 x WM): bigger and brighter.
        radius = (4.5 + 2 * frac[0]) + size * (4 + 3 * frac[1] - frac[0])  # 4.5-6.5 .. 8.5-12.5 mm
        contrast = (0.35 + 0.15 * frac[2]) + size * (0.3 + 0.1 * frac[2])
        center = (u(-1.5, 1.5), sella_v + u(-1.5, 1.5))
        return _Lesion(
            "pituitary", center, radius, contrast, tuple((h[0] * 0.4, h[1]) for h in harmonics), {}
        )
    return None


def _render_head(
    rng: np.random.Generator,
    uu: np.ndarray,
    vv: np.ndarray,
    head: tuple[float, float],
    layers: dict[str, float],
    sellar: bool,
    sella_v: float,
    spacing: float,
) -> np.ndarray:
    """Relative T1 intensity (WM = 1) of normal anatomy at head-frame coords ``uu``, ``vv`` (mm)."""
    u = rng.uniform
    a, b = head
    phi = np.arctan2(vv, uu)
    # Head outline: ellipse with a slightly narrower frontal end and low-order bumps.
    shape = 1.0 + 0.04 * np.sin(phi) + u(0.0, 0.03) * np.cos(3 * phi + u(0, 6.3))
    rho = np.sqrt((uu / a) ** 2 + (vv / b) ** 2) / shape
    depth = (1.0 - rho) * 0.5 * (a + b)  # ~ mm below the skin
    img = np.zeros(uu.shape, dtype=np.float32)
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

    if not sellar:
        # Lateral ventricles (frontal horns diverging forwards, atria behind), caudate heads,
        # thalami and enhancing choroid plexus in the atria.
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
    else:
        # Skull base: sphenoid sinus (air) in front of the sella, suprasellar cistern, cavernous
        # sinuses either side of the normal gland, brainstem and cerebellum behind, temporal horns.
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
            cereb |= ((uu - side * u(20, 26)) / u(22, 28)) ** 2 + (
                (vv - stem_v - u(30, 36)) / u(18, 24)
            ) ** 2 < 1
        cereb &= brain & (vv > stem_v + 8)
        folia = 0.88 + 0.12 * np.sin(np.hypot(uu, vv - stem_v) * 2 * math.pi / 4.0)
        img[cereb] = (T1["cerebellum"] * folia[cereb]).astype(np.float32)
        img[(uu / 5) ** 2 + ((vv - stem_v - 14) / 3) ** 2 < 1] = T1["csf"]  # fourth ventricle

    # Parenchymal texture: a few percent of smooth variation, in brain only.
    tex = _smooth_field(rng, uu.shape, sigma=2.5 / spacing)
    img[brain] *= 1.0 + 0.03 * tex[brain]
    return img


def _paint_lesion(
    img: np.ndarray,
    lesion: _Lesion,
    uu: np.ndarray,
    vv: np.ndarray,
    brain: np.ndarray,
    inner_surface: np.ndarray,
    rng: np.random.Generator,
    spacing: float,
) -> np.ndarray:
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
        mass = brain & (r < outline)
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

    acq, anat, les_rng, art = rng_for(seed, 11), rng_for(seed, 12), rng_for(seed, 13), rng_for(seed, 14)
    ident = make_identity(rng_for(seed, 4), f"MR{(seed if index is None else index) % 10000:04d}")

    # --- acquisition (all drawn, then overridden) ---
    drawn_cls = MR_CLASSES[int(acq.integers(0, len(MR_CLASSES)))]
    drawn_diff = MR_DIFFICULTIES[int(acq.integers(0, len(MR_DIFFICULTIES)))]
    size = int(acq.choice(MATRIX_SIZES))
    spacing_frac = acq.uniform()
    scanner = MR_SCANNERS[int(acq.integers(0, len(MR_SCANNERS)))]
    description = SERIES_DESCRIPTIONS[int(acq.integers(0, len(SERIES_DESCRIPTIONS)))]
    body_part = "BRAIN" if acq.uniform() < 0.6 else "HEAD"
    scale = float(acq.uniform(350, 1450))  # white-matter value: random global scaling
    sellar_draw = acq.uniform()
    rotation = math.radians(acq.uniform(-15, 15))
    shift = acq.uniform(-10, 10, size=2)
    slice_z = float(acq.uniform(-40, 60))
    series_number = int(acq.integers(3, 12))
    pe_axis = int(acq.integers(0, 2))  # 0: phase encode along image y (COL), 1: along x (ROW)
    cls = drawn_cls if cls is None else cls
    difficulty = drawn_diff if difficulty is None else difficulty
    if manufacturer is not None:
        known = {s[0].lower(): s for s in MR_SCANNERS}
        scanner = known.get(manufacturer.lower(), (manufacturer, "SYNTHETIC", 1.5))

    # --- anatomy parameters ---
    head = (float(anat.uniform(68, 78)), float(anat.uniform(86, 96)))
    layers = {
        "skin": float(anat.uniform(1.5, 2.5)),
        "scalp": float(anat.uniform(3.5, 6.0)),
        "skull": float(anat.uniform(5.0, 8.0)),
        "csf": float(anat.uniform(1.5, 3.0)),
    }
    inner = layers["skin"] + layers["scalp"] + layers["skull"]
    sella_v = float(anat.uniform(-8, 6))
    # Skull-base level: always for pituitary; often for no_tumour so that the level alone does
    # not give the class away; sometimes for the hemispheric tumours.
    sellar = cls == "pituitary" or sellar_draw < {"no_tumour": 0.35}.get(cls, 0.2)
    fov_min = 2 * head[1] + 16
    spacing = snap(max(0.8, fov_min / size) + spacing_frac * (1.1 - max(0.8, fov_min / size)), 6)
    lesion = _draw_lesion(les_rng, cls, difficulty, head, inner, sella_v)

    # Pixel grid -> head frame (mm): centre, shift, rotate.
    half = (size - 1) / 2.0
    xs = (np.arange(size) - half) * spacing - shift[0]
    ys = (np.arange(size) - half) * spacing - shift[1]
    xx, yy = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    cr, sr = math.cos(rotation), math.sin(rotation)
    uu = cr * xx + sr * yy
    vv = -sr * xx + cr * yy
    if lesion is not None and lesion.extra.get("mass_effect", 0.0) > 0:
        # Mass effect: anatomy around the lesion is pushed outwards, i.e. what lies at p was at
        # c + (p - c)(1 - m g(|p - c|)) before the mass grew.
        cu, cv = lesion.center
        d2 = (uu - cu) ** 2 + (vv - cv) ** 2
        g = lesion.extra["mass_effect"] * np.exp(-d2 / (2 * (1.8 * lesion.radius) ** 2))
        uu_a, vv_a = cu + (uu - cu) * (1 - g), cv + (vv - cv) * (1 - g)
    else:
        uu_a, vv_a = uu, vv
    img = _render_head(anat, uu_a, vv_a, head, layers, sellar, sella_v, spacing)
    # Brain and "inside the inner table" masks for the lesion (on the undeformed frame: the
    # lesion sits where it is drawn).
    rho = np.sqrt((uu / head[0]) ** 2 + (vv / head[1]) ** 2) / (1.0 + 0.04 * np.sin(np.arctan2(vv, uu)))
    depth = (1.0 - rho) * 0.5 * (head[0] + head[1])
    brain = depth >= inner + layers["csf"]
    inner_surface = depth >= inner
    mask = None
    if lesion is not None:
        mask = _paint_lesion(img, lesion, uu, vv, brain, inner_surface, les_rng, spacing)

    # --- acquisition effects ---
    img = ndimage.gaussian_filter(img, 0.6, mode="nearest")  # point-spread function
    img *= np.float32(scale)
    artefacts: dict[str, Any] = {"motion_ghosts": False, "bias_field": False}
    ghost_amp = float(art.uniform(0.08, 0.18))
    ghost_shift = float(art.uniform(0.12, 0.3))
    bias = art.uniform(-1, 1, size=5)
    sigma_rel = (
        float(art.uniform(0.04, 0.07)) if difficulty == "artefact" else float(art.uniform(0.012, 0.025))
    )
    if difficulty == "artefact":
        # Periodic motion: attenuated copies displaced along the phase-encode axis, plus a bias
        # field (smooth multiplicative, ~0.7-1.3) from coil sensitivity.
        step = max(int(ghost_shift * size), 4)
        ghosts = np.zeros_like(img)
        for j, amp in ((1, ghost_amp), (2, ghost_amp * 0.45)):
            ghosts += (
                amp * (np.roll(img, j * step, axis=pe_axis) + np.roll(img, -j * step, axis=pe_axis)) * 0.5
            )
        img += ghosts
        gx, gy = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size))
        field_ = bias[0] * gx + bias[1] * gy + 0.5 * bias[2] * gx * gy + 0.4 * bias[3] * (gx**2 - gy**2)
        img *= np.exp(0.22 * field_ / max(float(np.abs(field_).max()), 1e-6)).astype(np.float32)
        artefacts.update(
            motion_ghosts=True,
            ghost_amplitude=round(ghost_amp, 4),
            ghost_shift_px=step,
            bias_field=True,
        )
    sigma = noise * sigma_rel * scale
    # Rician noise: magnitude of the complex signal with Gaussian noise on both channels.
    n_re = art.standard_normal(img.shape).astype(np.float32)
    n_im = art.standard_normal(img.shape).astype(np.float32)
    img = np.hypot(img + np.float32(sigma) * n_re, np.float32(sigma) * n_im)
    stored = np.clip(np.rint(img), 0, MAX_STORED).astype(np.uint16)
    image = stored.astype(np.float32)

    # --- DICOM ---
    knobs = f"cls={cls!r};difficulty={difficulty!r};noise={float(noise)!r};manufacturer={manufacturer!r}"
    study_uid = make_uid("mr", seed, knobs, "study")
    series_uid = make_uid("mr", seed, knobs, "series")
    sop_uid = make_uid("mr", seed, knobs, "instance", 0)
    frame_uid = make_uid("mr", seed, knobs, "frame")
    origin = [snap(-half * spacing), snap(-half * spacing + 20.0), snap(slice_z)]

    ds = new_dataset(MR_IMAGE_STORAGE, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.InstanceCreationDate = ident.study_date
    add_patient_study(ds, ident, study_uid)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
    ds.Modality = "MR"
    ds.Manufacturer, ds.ManufacturerModelName = scanner[0], scanner[1]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.BodyPartExamined = body_part
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
    ds.RepetitionTime = ds_str(round(float(acq.uniform(450, 650)), 1))
    ds.EchoTime = ds_str(round(float(acq.uniform(8, 15)), 2))
    ds.EchoTrainLength = 1
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = ds_str(scanner[2])
    ds.ImagingFrequency = ds_str(round(42.577478 * scanner[2], 6))
    ds.FlipAngle = "90"
    ds.InPlanePhaseEncodingDirection = "ROW" if pe_axis == 1 else "COL"
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ds_multi(origin)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = ds_str(origin[2])
    ds.PixelSpacing = ds_multi([spacing, spacing])
    add_pixels(ds, stored, bits_stored=12, signed=False)
    ds.WindowCenter = ds_str(round(scale * 0.9))
    ds.WindowWidth = ds_str(round(scale * 1.8))

    class_index = MR_CLASSES.index(cls)
    lesion_truth: dict[str, Any] | None = None
    if lesion is not None and mask is not None:
        rows, cols = np.nonzero(mask)
        area = float(rows.size) * spacing * spacing
        cu, cv = lesion.center
        cx, cy = cr * cu - sr * cv, sr * cu + cr * cv  # head frame -> image-plane mm
        lesion_truth = {
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
            "centroid_rc_px": [round(float(rows.mean()), 2), round(float(cols.mean()), 2)]
            if rows.size
            else None,
            "bbox_rc_px": [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]
            if rows.size
            else None,
        }
    truth: dict[str, Any] = {
        "modality": "MR",
        "study_uid": str(study_uid),
        "series_uid": str(series_uid),
        "n_instances": 1,
        "class": cls,
        "class_index": class_index,
        "difficulty": difficulty,
        "level": "sellar" if sellar else "ventricular",
        "lesion": lesion_truth,
        "head": {
            "semi_axes_mm": [round(head[0], 2), round(head[1], 2)],
            "inner_table_depth_mm": round(inner, 2),
            "sella_v_mm": round(sella_v, 2),
        },
        "artefacts": {
            **artefacts,
            "noise_sigma": round(sigma, 3),
            "phase_encode": ds.InPlanePhaseEncodingDirection,
        },
        "geometry": {
            "shape_yx": [size, size],
            "spacing_yx_mm": [spacing, spacing],
            "origin_lps_mm": origin,
            "row_dir": [1.0, 0.0, 0.0],
            "col_dir": [0.0, 1.0, 0.0],
            "rotation_deg": round(math.degrees(rotation), 3),
        },
        "acquisition": {
            "manufacturer": scanner[0],
            "model": scanner[1],
            "field_strength_t": scanner[2],
            "series_description": description,
            "wm_intensity": round(scale, 2),
        },
        "params": {"seed": seed, "noise": float(noise), "manufacturer": scanner[0], "size": size},
    }
    return MRPhantom(
        dataset=ds,
        image=image,
        cls=cls,
        class_index=class_index,
        difficulty=difficulty,
        truth=truth,
        lesion_mask=mask,
    )


def write_mr_series(phantom: MRPhantom, folder: str | Path) -> Path:
    """Write a phantom to ``folder`` (created): ``IM0001.dcm`` and ``truth.json``. Returns it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_dataset(phantom.dataset, out / "IM0001.dcm")
    write_json(out / "truth.json", phantom.truth)
    return out
