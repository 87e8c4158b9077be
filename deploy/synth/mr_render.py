"""MR acquisition effects on a relative-intensity slice: blur, scaling, artefacts, noise, pixels.

Takes the relative T1 image from :mod:`deploy.synth.mr_anatomy`, the artefact random stream and
the acquisition settings (:func:`acquire`); returns an :class:`Acquired`: the 12-bit stored
values ready for the DICOM pixel data, the same values as float32 (what a reader decodes) and
what was applied (for ``truth.json``).

Every draw of the artefact stream happens whatever the difficulty and noise knob, in a fixed
order, so the same seed always gives byte-identical pixel data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

F32 = npt.NDArray[np.float32]

#: Stored values are 12-bit: the global scale keeps the brightest tissue well below this.
MAX_STORED = 4095


@dataclass(frozen=True, eq=False)
class Acquired:
    """One acquired slice: ``stored`` uint16 pixels, ``image`` the same as float32,
    ``artefacts`` what was applied and ``sigma`` the Rician noise sigma (stored units)."""

    stored: npt.NDArray[np.uint16]
    image: F32
    artefacts: dict[str, Any]
    sigma: float


def acquire(
    img: F32,
    art: np.random.Generator,
    *,
    scale: float,
    difficulty: str,
    noise: float,
    pe_axis: int,
) -> Acquired:
    """Image ``img`` (relative units, square) as the scanner would store it.

    ``scale`` is the stored value of white matter, ``difficulty`` ``"artefact"`` adds motion
    ghosts along ``pe_axis`` (0: image y, 1: image x), a bias field and stronger noise;
    ``noise`` scales the Rician noise (0 disables it).
    """
    size = img.shape[0]
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
    return Acquired(stored=stored, image=stored.astype(np.float32), artefacts=artefacts, sigma=sigma)
