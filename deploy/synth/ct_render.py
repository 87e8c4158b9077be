"""Sampling a CT :class:`~deploy.synth.ct_anatomy.Anatomy` onto a slice grid: HU, labels, pixels.

Takes the anatomy, the body-local coordinates of the grid's columns (x), rows (y) and sorted
slices (z), and the acquisition's noise and pixel-representation settings
(:func:`render_series`); returns a :class:`RenderedSeries`: label mask, the HU a reader decodes,
optionally the noise-free HU, and the stored values ready for the DICOM pixel data. All arrays
are (z, y, x) in volume-builder layout.

Rendering goes slice chunk by slice chunk to bound memory; the chunk size and the order of the
noise draws are part of the phantom format (same seed -> byte-identical pixel data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from .ct_anatomy import TEX_MM, TEX_N, Anatomy, Blob

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]

#: Slices rendered at once: bounds temporary memory (a few float32 slabs) whatever the series
#: size; fixed so the noise stream is consumed identically for every series (determinism).
CHUNK = 24
#: Rescale Intercept of every series; the slope varies (1 or 0.5).
INTERCEPT = -1024.0

# 2-D tissue codes of the z-invariant cross-section (looked up per slice in a HU table).
AIR, TABLE, FAT, MUSCLE, CAVITY, VB_CORTEX, VB_CORE, CANAL, POST_EL, PARASPINAL, PSOAS, AORTA, IVC = range(13)
RIB0 = 13
#: Standard deviation of the sum of two independent uniform int8 values.
TRI_STD = math.sqrt(2 * (256**2 - 1) / 12)


@dataclass(frozen=True, eq=False)
class RenderedSeries:
    """Rendered arrays of one series, (z, y, x) in sorted-slice order."""

    labels: U8
    hu: F32  # what decoding the stored values gives (noise and quantisation included)
    clean: F32 | None  # noise-free HU, only when asked for
    stored: npt.NDArray[np.integer[Any]]  # int16 or uint16, as the pixel representation says


def render_series(
    an: Anatomy,
    xl: F64,
    yl: F64,
    zl: F64,
    *,
    supine: bool,
    noise_rng: np.random.Generator,
    noise_std: float,
    hu_offset: float,
    slope: float,
    signed: bool,
    bits_stored: int,
    keep_clean: bool,
) -> RenderedSeries:
    """Render the whole series in chunks of :data:`CHUNK` slices.

    Takes the anatomy, body-local column x (W,), row y (H,) and slice z (K,) coordinates (mm),
    the patient orientation, the noise stream, the target noise std (HU, after smoothing), the HU
    offset (drift knob) and the pixel representation. Returns a :class:`RenderedSeries`.
    """
    n_slices, size = zl.size, xl.size
    code = cross_section(an, xl, yl, supine=supine)
    labels = np.empty((n_slices, size, size), dtype=np.uint8)
    hu = np.empty((n_slices, size, size), dtype=np.float32)
    clean = np.empty_like(hu) if keep_clean else None
    hi_stored = (1 << bits_stored) - 1 if not signed else 32767
    stored = np.empty((n_slices, size, size), dtype=np.int16 if signed else np.uint16)
    # [1 2 1]/4 in-plane smoothing: makes the noise look like reconstructed CT noise and softens
    # edges a little (partial volume). It scales white noise std by 0.375 (sum of squared
    # weights = (6/16)^2 in 2-D), so draw it larger to end at the target std.
    kernel = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    white = np.float32(noise_std / 0.375)
    for k0 in range(0, n_slices, CHUNK):
        ks = slice(k0, min(k0 + CHUNK, n_slices))
        chunk, labels[ks] = render_chunk(an, code, xl, yl, zl[ks], supine)
        # hu_offset goes in before the rescale so it drifts stored values, as a miscalibrated
        # scanner would; everything below is in place to keep a 100-slice 512 series ~1 s.
        chunk += np.float32(hu_offset - INTERCEPT)
        if clean is not None:
            clean[ks] = chunk + np.float32(INTERCEPT)
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
        hu[ks] += np.float32(INTERCEPT)
    return RenderedSeries(labels=labels, hu=hu, clean=clean, stored=stored)


def cross_section(an: Anatomy, x: F64, y: F64, supine: bool) -> U8:
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


def _hu_table(an: Anatomy, z: F64) -> F32:
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


def _span(coord: F64, lo: float, hi: float) -> slice:
    """Index slice of the (monotonic, either direction) 1-D ``coord`` falling inside [lo, hi]."""
    idx = np.nonzero((coord >= lo) & (coord <= hi))[0]
    if idx.size == 0:
        return slice(0, 0)
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _cavity_texture(an: Anatomy, xc: F64, yc: F64, z: F64) -> F32:
    """Mesentery / bowel HU (K, h, w): fat and soft-tissue loops from the patient-space texture."""
    gy, gx = np.meshgrid(yc / TEX_MM + TEX_N // 2, xc / TEX_MM + TEX_N // 2, indexing="ij")
    tex = np.zeros((z.size, yc.size, xc.size), dtype=np.float32)
    for f, (kz, pz) in zip(an.texture_fields, an.texture, strict=True):
        plane = ndimage.map_coordinates(f, [gy, gx], order=1, mode="nearest")
        tex += plane[None] * np.cos(kz * z + pz).astype(np.float32)[:, None, None]
    np.clip(tex * 1.2 + 0.3, -1.0, 1.0, out=tex)
    fat, soft = an.hu["fat"], 38.0
    cav: F32 = (0.5 * (fat + soft)) + (0.5 * (soft - fat)) * tex
    return cav


def render_chunk(an: Anatomy, code: U8, x: F64, y: F64, z: F64, supine: bool) -> tuple[F32, U8]:
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
    sub_hu = hu[:, rs, cs]
    sub_lab = labels[:, rs, cs]
    np.copyto(sub_hu, _cavity_texture(an, xc, yc, z), where=inside)

    def paint(blob: Blob, value: float | None, label: int) -> tuple[tuple[slice, ...], F32] | None:
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
    o = an.organs
    for g in o.gas:
        paint(g, -950.0, 0)
    paint(o.stomach, an.hu["stomach"], 0)
    _paint_stomach_gas(an, sub_hu, inside, xc, yc, z, supine)
    for label, blob in ((3, o.kidneys[0]), (4, o.kidneys[1])):
        painted = paint(blob, an.hu["cortex"], label)
        if painted is not None:
            box, level = painted
            # level runs from about -1 at the centre to 0 at the surface: the inner part is
            # medulla, a rim of cortex stays (both labelled kidney).
            sub_hu[box][level < -an.kidney_medulla] = an.hu["medulla"]
    paint(o.spleen, an.hu["spleen"], 2)
    for lobe in o.liver:
        paint(lobe, an.hu["liver"], 1)
    return hu, labels


def _paint_stomach_gas(
    an: Anatomy, sub_hu: F32, inside: Mask, xc: F64, yc: F64, z: F64, supine: bool
) -> None:
    """Gas cap in the non-dependent part of the stomach: anterior (small y) when supine,
    posterior when prone - gas rises whatever the patient-based coordinates say."""
    s = an.organs.stomach
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
