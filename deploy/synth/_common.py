"""Constants and seed helpers shared by the CT and MR phantom generators.

Kept free of imports from the rest of :mod:`deploy.synth` so ``ct``/``mr`` and the package
``__init__`` can all import it without cycles.
"""

from __future__ import annotations

import numpy as np

#: ct-abdomen-seg mask values (index = value), see docs/CONTRACTS.md "Label values".
CT_LABELS: tuple[str, ...] = ("background", "liver", "spleen", "kidney_left", "kidney_right")
#: mr-brain-cls classes (index = class_index), see docs/CONTRACTS.md "Label values".
MR_CLASSES: tuple[str, ...] = ("no_tumour", "glioma", "meningioma", "pituitary")
#: MR difficulty levels; ``"mixed"`` (CLI / generate_mr only) round-robins over these.
MR_DIFFICULTIES: tuple[str, ...] = ("obvious", "subtle", "artefact")

#: Namespace mixed into every UID's entropy so our UIDs never collide with another tool's 2.25 UIDs.
UID_NAMESPACE = "edge-agent/deploy.synth/v1"


def check_seed(seed: int) -> int:
    """Return ``seed`` as a plain int; raise ValueError for negative or non-integer seeds.

    numpy's SeedSequence only takes non-negative integers, and a silent ``abs()`` would make two
    seeds collide.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def derive_seed(seed: int, index: int) -> int:
    """Seed of series ``index`` of a set generated with ``seed``.

    Takes the set seed and the 0-based series index, returns a non-negative 63-bit int. Hashing
    (seed, index) through SeedSequence makes every series reproducible on its own and keeps sets
    generated with different seeds disjoint (no overlap of per-series seeds in practice).
    """
    state = np.random.SeedSequence([check_seed(seed), check_seed(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """Independent random stream ``stream`` of a phantom seed.

    Anatomy, acquisition parameters and noise use separate streams so that a knob (``noise``,
    ``size``, ...) never changes what the other streams draw.
    """
    return np.random.default_rng([check_seed(seed), stream])
