"""The drift statistics, vectorised over many windows at once.

Every function takes a pool of ``n`` series (one array over the pool) and two membership matrices
of shape (B, n): ``wc[b, i]`` how many times series ``i`` is in window ``b`` and ``rc[b, i]`` how many
times it is in the reference that window is compared with (0/1 for a live verdict or a hold-out
draw, counts for a draw with replacement). Each returns one value per row, shape (B,). The same code
computes the live statistic (B = 1: the window against the whole reference) and its null
distribution (B = 2000 bootstrap windows against held-out reference series), so the thresholds are
calibrated on exactly the statistic they are applied to.

``psi``           population stability index of two histograms (proportions), :data:`EPSILON` smoothed
``pooled``        the equal-weight mean of the members' per-series histograms
``ks``            two-sample Kolmogorov-Smirnov statistic D (ties handled exactly)
``chi2_unseen``   chi-square of window category counts against the reference proportions, and the
                  count of window series whose category the reference never had
``out_of_range``  window series outside the reference's [min, max] widened by :data:`RANGE_MARGIN`
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]

#: added to every bin's proportion (then renormalised) before PSI's logarithm: an empty bin would
#: otherwise make PSI infinite. 1e-4 is far below any bin the statistic should react to (a bin
#: holding 0.01 % of the voxels), so it only decides how much a bin empty on one side counts.
EPSILON = 1e-4
#: a real-valued field's reference range [min, max] is widened by this share of its width on each
#: side before a value counts as out of range (values between reference series are expected; a
#: slice thickness of 8 mm against a 1-5 mm reference is not: [0.6, 5.4]). Integer-valued fields
#: (rows, columns, n_slices, kVp as usually recorded) are checked against the exact range.
RANGE_MARGIN = 0.10
#: float tolerance on the range, relative to the values' magnitude (1.25 read back as 1.2500000001)
_RANGE_TOLERANCE = 1e-9


def psi(p: Floats, q: Floats) -> Floats:
    """PSI = sum (p - q) ln(p / q) over bins, rows of (B, K) proportions; each side smoothed as
    (x + EPSILON) / (1 + K * EPSILON). NaN where a row is NaN (no histogram on that side)."""
    k = p.shape[1]
    ps = (p + EPSILON) / (1.0 + k * EPSILON)
    qs = (q + EPSILON) / (1.0 + k * EPSILON)
    out: Floats = ((ps - qs) * np.log(ps / qs)).sum(axis=1)
    return out


def pooled(props: Floats, present: NDArray[np.bool_], members: Floats) -> Floats:
    """(B, K) mean of the members' per-series proportions, each series weighted equally (a 600-slice
    series does not outweigh a 40-slice one); NaN rows where no member has a histogram."""
    weights = members * present[None, :]
    total = weights.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: Floats = (weights @ props) / total
    return out


def _sorted_present(values: Floats) -> NDArray[np.intp]:
    """Indices of the present (non-NaN) values, in ascending order of value."""
    idx = np.flatnonzero(~np.isnan(values))
    return idx[np.argsort(values[idx], kind="stable")]


def ks(values: Floats, wc: Floats, rc: Floats) -> Floats:
    """Two-sample KS statistic D = max |F_window - F_reference| over the pooled values; ``values``
    (n,) with NaN where absent. Tied values are one step of both ECDFs (exact for discrete fields).
    NaN where either side has no values."""
    order = _sorted_present(values)
    if order.size == 0:
        return np.full(wc.shape[0], np.nan)
    v = values[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])  # first index of each run of equal values
    # (values x windows) layout: the sums run down columns of contiguous rows, ~10x faster than
    # cumulating along each window's row
    cw = np.cumsum(np.add.reduceat(wc.T[order], starts, axis=0), axis=0)
    cr = np.cumsum(np.add.reduceat(rc.T[order], starts, axis=0), axis=0)
    tw, tr = cw[-1], cr[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        d: Floats = np.abs(cw / tw - cr / tr).max(axis=0)
    d[(tw == 0) | (tr == 0)] = np.nan
    return d


def category_counts(codes: NDArray[np.int64], k: int, members: Floats) -> Floats:
    """(B, k) how many member series fell in each of ``k`` categories (code -1: absent)."""
    onehot = np.zeros((codes.size, k))
    have = codes >= 0
    onehot[np.flatnonzero(have), codes[have]] = 1.0
    out: Floats = members @ onehot
    return out


def chi2_unseen(codes: NDArray[np.int64], k: int, wc: Floats, rc: Floats) -> tuple[Floats, Floats]:
    """Chi-square sum (O - E)^2 / E over the categories the reference has (E = window series in
    those categories x reference proportion), and the number of window series in a category the
    reference lacks. Chi-square is NaN where the window has no series in a known category."""
    o = category_counts(codes, k, wc)
    r = category_counts(codes, k, rc)
    seen = r > 0
    q = r / np.maximum(r.sum(axis=1, keepdims=True), 1.0)
    n_seen = np.where(seen, o, 0.0).sum(axis=1, keepdims=True)
    e = n_seen * q
    terms = np.where(seen, (o - e) ** 2 / np.where(seen & (e > 0), e, 1.0), 0.0)
    chi2: Floats = terms.sum(axis=1)
    chi2[n_seen[:, 0] == 0] = np.nan
    unseen: Floats = np.where(seen, 0.0, o).sum(axis=1)
    return chi2, unseen


def reference_range(values: Floats, rc: Floats, integer: bool) -> tuple[Floats, Floats]:
    """(B,) lower and upper bounds: each row's reference [min, max], widened by RANGE_MARGIN of
    its width (0 for integer-valued fields) and a float tolerance; NaN for a row without values."""
    order = _sorted_present(values)
    if order.size == 0:
        nan = np.full(rc.shape[0], np.nan)
        return nan, nan
    v = values[order]
    member = rc.T[order] > 0  # (values x windows), ascending values
    lo = v[member.argmax(axis=0)]
    hi = v[order.size - 1 - member[::-1].argmax(axis=0)]
    none = ~member.any(axis=0)
    lo, hi = np.where(none, np.nan, lo), np.where(none, np.nan, hi)
    margin = np.zeros_like(lo) if integer else RANGE_MARGIN * (hi - lo)
    tol = _RANGE_TOLERANCE * np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
    return lo - margin - tol, hi + margin + tol


def out_of_range(values: Floats, wc: Floats, rc: Floats, integer: bool) -> Floats:
    """(B,) window series whose value lies outside the row's :func:`reference_range`."""
    lo, hi = reference_range(values, rc, integer)
    with np.errstate(invalid="ignore"):
        outside = (values[None, :] < lo[:, None]) | (values[None, :] > hi[:, None])
    out: Floats = np.where(outside, wc, 0.0).sum(axis=1)
    return out


def is_integer_valued(values: Floats) -> bool:
    """Every present value is a whole number (then the range check is exact)."""
    v = values[~np.isnan(values)]
    return bool(v.size) and bool(np.all(v == np.round(v)))
