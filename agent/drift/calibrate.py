"""Thresholds that hold at the window size in use, calibrated from the reference itself.

Takes the reference's :class:`~agent.drift.table.SeriesTable`, its signal specs, the window size and
the number of bootstrap windows; returns a :class:`Calibration`: per (signal, statistic) the warn
and alert thresholds (99th and 99.9th percentiles of the statistic over windows of exactly
``window`` reference series), plus how they were drawn.

Why not fixed thresholds: with 50 series a PSI of 0.1 or a KS p < 0.05 fires on unchanged data far
more often than the nominal rate, and how often depends on the field. Why hold out: a window drawn
from the reference and compared with the *whole* reference is compared with itself in part, so its
statistics are too small and the thresholds too low (an optimistic null). So each bootstrap window
is compared only with reference series it does not contain:

``hold_out``    (reference of n >= window + max(10, window / 2) series) the window is ``window``
                series drawn without replacement; the reference it is compared with is the other
                ``n - window``. Exact iid structure; the only difference from live use is that the
                live reference has n series, not n - window (corrected below).
``split_half``  (smaller references) the reference is split in random halves A and B per draw; the
                window is ``window`` series drawn with replacement from A and compared with B.

Correction: under the null, the difference between a window and a reference statistic has a
variance proportional to 1/window + 1/reference. Live that is 1/w + 1/n; in a draw it is
1/w + 1/(n - w) (hold-out) or about 1/w + 1/|A| + 1/|B| (split), i.e. larger. Quadratic statistics
(PSI, chi-square) are multiplied by f = (1/w + 1/n) / (that variance) and KS by sqrt(f), so the null
matches the live comparison instead of being conservative by a factor that depends on n. Counts
(out-of-range, unseen) are left as drawn: conservative, as a smaller reference has a narrower
range and fewer categories. Seeded per (model, version, window, reference digest): deterministic.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.drift.signals import LINEAR, QUADRATIC, SignalSpec, statistics
from agent.drift.table import Floats, SeriesTable

WARN_QUANTILE = 0.99
ALERT_QUANTILE = 0.999
#: the exponential tail of the family-wise option is fitted above this upper-tail share
TAIL_FROM = 0.05
#: fewer reference series than this and no threshold can be calibrated (phase no_reference)
MIN_REFERENCE_SERIES = 10

Scheme = Literal["hold_out", "split_half"]


@dataclass(frozen=True)
class Calibration:
    """Thresholds for one (reference, window size); ``thresholds[(signal, statistic)] = (warn, alert)``."""

    window: int
    n_reference: int
    draws: int
    scheme: Scheme
    correction: float
    thresholds: Mapping[tuple[str, str], tuple[float, float]]
    familywise: bool = False


def seed_for(model: str, version: str, window: int, digest: str) -> int:
    """The bootstrap seed: the same reference and window always give the same thresholds."""
    return zlib.crc32(f"{model}\0{version}\0{window}\0{digest}".encode())


def hold_out_possible(n: int, window: int) -> bool:
    return n - window >= max(10, window // 2)


def draw_members(n: int, window: int, draws: int,
                 rng: np.random.Generator) -> tuple[Floats, Floats, Scheme, float]:
    """Membership matrices (draws, n) of the bootstrap windows and the reference series each is
    compared with, the scheme used and its variance factor (see the module docstring)."""
    rows = np.arange(draws)[:, None]
    perm = rng.random((draws, n)).argsort(axis=1)
    wc = np.zeros((draws, n))
    if hold_out_possible(n, window):
        wc[rows, perm[:, :window]] = 1.0
        return wc, 1.0 - wc, "hold_out", 1.0 / window + 1.0 / (n - window)
    n_a = (n + 1) // 2
    picks = perm[rows, rng.integers(0, n_a, size=(draws, window))]  # with replacement from A
    np.add.at(wc, (np.broadcast_to(rows, picks.shape), picks), 1.0)
    rc = np.zeros((draws, n))
    rc[rows, perm[:, n_a:]] = 1.0
    return wc, rc, "split_half", 1.0 / window + 1.0 / n_a + 1.0 / (n - n_a)


def _threshold(values: Floats, count: bool) -> tuple[float, float] | None:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return None
    # a count's thresholds are counts that occurred (value > threshold: "more than seen in 99 %")
    method: Literal["higher", "linear"] = "higher" if count else "linear"
    return (float(np.quantile(v, WARN_QUANTILE, method=method)),
            float(np.quantile(v, ALERT_QUANTILE, method=method)))


def _tail_quantile(values: Floats, p: float) -> float:
    """The value exceeded with probability ``p`` (< 5 %): an exponential tail fitted above the
    95th percentile (mean excess), since 2,000 draws cannot resolve a 0.01 % quantile. Light
    tails (KS) make it conservative."""
    v = values[~np.isnan(values)]
    u = float(np.quantile(v, 1.0 - TAIL_FROM))
    excess = v[v > u] - u
    scale = float(excess.mean()) if excess.size else 0.0
    return u + scale * float(np.log(TAIL_FROM / p))


def _familywise(thresholds: dict[tuple[str, str], tuple[float, float]],
                nulls: dict[tuple[str, str], Floats]) -> None:
    """Replace the continuous tests' thresholds by Bonferroni ones: each test at level
    (1 - WARN_QUANTILE) / m and (1 - ALERT_QUANTILE) / m, m the number of continuous tests with
    a non-constant null, so that the *model* (any signal) is at warn / alert in at most 1 % /
    0.1 % of in-distribution windows. Counts (out-of-range, unseen) keep theirs: their null is
    almost always 0, and firing at once is their purpose."""
    keys = [k for k in thresholds if k[1] in QUADRATIC | LINEAR and thresholds[k][1] > 0]
    for key in keys:
        thresholds[key] = (_tail_quantile(nulls[key], (1.0 - WARN_QUANTILE) / len(keys)),
                           _tail_quantile(nulls[key], (1.0 - ALERT_QUANTILE) / len(keys)))


def calibrate(reference: SeriesTable, specs: tuple[SignalSpec, ...], window: int, draws: int,
              seed: int, familywise: bool = False) -> Calibration:
    """Warn / alert thresholds for windows of ``window`` series (module docstring). A statistic
    that no draw could compute (the field too rare) gets no threshold and is not judged.
    ``familywise``: see :func:`_familywise` (not the default: the brief's per-signal rates)."""
    n = reference.n
    if n < MIN_REFERENCE_SERIES:
        raise ValueError(f"a reference of {n} series is too small to calibrate (need {MIN_REFERENCE_SERIES})")
    rng = np.random.default_rng(seed)
    wc, rc, scheme, v_sim = draw_members(n, window, draws, rng)
    f = (1.0 / window + 1.0 / n) / v_sim
    thresholds: dict[tuple[str, str], tuple[float, float]] = {}
    nulls: dict[tuple[str, str], Floats] = {}
    for key, values in statistics(reference, specs, wc, rc).items():
        if key[1] in QUADRATIC:
            values = values * f
        elif key[1] in LINEAR:
            values = values * np.sqrt(f)
        found = _threshold(values, count=key[1] not in QUADRATIC | LINEAR)
        if found is not None:
            thresholds[key], nulls[key] = found, values
    if familywise:
        _familywise(thresholds, nulls)
    return Calibration(window, n, draws, scheme, float(f), thresholds, familywise)
