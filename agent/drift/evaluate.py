"""The live verdict: a model's window against its reference, as published ``DriftSignal``s.

:func:`evaluate` takes the reference series, the window's series, the latest shadow-FP32 agreement
rate (or None), the reference's signal specs and :class:`~agent.drift.calibrate.Calibration`, and
the k-anonymity threshold; it returns one ``DriftSignal`` per signal that could be computed.

A signal with two tests (numeric metadata: KS and out-of-range count; categorical: chi-square and
unseen categories) takes the worse state of the two; ``statistic``/``value``/``warn``/``alert``
are those of the deciding test (the count when it fires, else KS / chi-square), and
``detail["tests"]`` holds both. State: ``value > alert`` -> alert, ``value > warn`` -> warn
(``quantization.agreement``: below, since lower is worse).

``detail`` is aggregate-only: the window's pooled histogram counts (over at least
``k_anonymity`` series); category counts with any
category seen fewer than ``k_anonymity`` times folded into ``"other"`` (and DICOM UIDs, e.g.
transfer syntaxes, published by name or folded too); the count of series out of range; window
quantiles whose ranks are clamped so at least ``k_anonymity`` series lie at or beyond them on each
side (never the window's minimum or maximum, i.e. one series' value).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.core.drift import DriftSignal, DriftState, SeriesSummary
from agent.drift.calibrate import Calibration
from agent.drift.signals import SignalSpec, statistics
from agent.drift.table import Floats, SeriesTable, build_table

#: ``quantization.agreement``: share of shadow-run series whose quantized output agrees with FP32
#: (the variant guard's rate). Not calibrated: the guard measures a rate, not a window statistic,
#: and these bounds are the ones the accuracy gate's "agreement" is held to. Lower is worse.
AGREEMENT_WARN = 0.95
AGREEMENT_ALERT = 0.90
#: window quantiles published for numeric signals
QUANTILES = (("p05", 0.05), ("p50", 0.50), ("p95", 0.95))
#: a categorical value that is a DICOM UID (dotted digits) is published by name, or folded
_UID = re.compile(r"^[0-9]+(\.[0-9]+){2,}$")
TRANSFER_SYNTAX_NAMES: Mapping[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
_LEVEL: Mapping[DriftState, int] = {"ok": 0, "warn": 1, "alert": 2}


@dataclass(frozen=True)
class _Test:
    statistic: str
    value: float
    warn: float
    alert: float
    state: DriftState


def judge(value: float, warn: float, alert: float, lower_is_worse: bool = False) -> DriftState:
    if lower_is_worse:
        return "alert" if value < alert else "warn" if value < warn else "ok"
    return "alert" if value > alert else "warn" if value > warn else "ok"


def evaluate(reference: Sequence[SeriesSummary], window: Sequence[SeriesSummary], agreement: float | None,
             specs: tuple[SignalSpec, ...], calibration: Calibration, bins: Mapping[str, int],
             k_anonymity: int) -> tuple[DriftSignal, ...]:
    """The window's signals (see the module docstring)."""
    table = build_table([*reference, *window], bins)
    n = len(reference)
    wc = np.zeros((1, table.n))
    wc[0, n:] = 1.0
    rc = 1.0 - wc
    values = statistics(table, specs, wc, rc)
    in_window = wc[0] > 0
    signals: list[DriftSignal] = []
    for spec in specs:
        tests: list[_Test] = []
        for stat in spec.statistics:
            value, limits = float(values[(spec.name, stat)][0]), calibration.thresholds.get((spec.name, stat))
            if limits is not None and np.isfinite(value):
                tests.append(_Test(stat, value, limits[0], limits[1], judge(value, *limits)))
        if not tests:
            continue
        # the deciding test: the worse state; on a tie above ok the later one (the count: it
        # explains itself better than a KS or chi-square value)
        t = max(reversed(tests), key=lambda x: _LEVEL[x.state])
        if t.state == "ok":
            t = tests[0]
        detail = _detail(spec, table, in_window, k_anonymity)
        if len(tests) > 1:
            detail["tests"] = {x.statistic: {"value": x.value, "warn": x.warn, "alert": x.alert, "state": x.state}
                               for x in tests}
        signals.append(DriftSignal(spec.name, t.state, t.statistic, t.value, t.warn, t.alert, detail))
    if agreement is not None:
        signals.append(DriftSignal("quantization.agreement",
                                   judge(agreement, AGREEMENT_WARN, AGREEMENT_ALERT, lower_is_worse=True),
                                   "agreement", float(agreement), AGREEMENT_WARN, AGREEMENT_ALERT))
    return tuple(signals)


def _detail(spec: SignalSpec, table: SeriesTable, in_window: np.ndarray, k: int) -> dict[str, object]:
    if spec.kind == "histogram":
        present = table.hist_present[spec.name] & in_window
        if int(present.sum()) < k:  # the pooled histogram of fewer than k series is not published
            return {"series": int(present.sum())}
        return {"series": int(present.sum()),
                "counts": [int(c) for c in table.hist_counts[spec.name][present].sum(axis=0)]}
    if spec.kind == "numeric":
        values = table.numeric.get(spec.name, np.full(table.n, np.nan))[in_window]
        values = values[~np.isnan(values)]
        return {"series": int(values.size), **anonymous_quantiles(values, k)}
    codes = table.categorical.get(spec.name, np.full(table.n, -1, dtype=np.int64))[in_window]
    vocabulary = table.vocabulary.get(spec.name, ())
    counts = {vocabulary[c]: int(n) for c, n in enumerate(np.bincount(codes[codes >= 0],
                                                                      minlength=len(vocabulary))) if n}
    return {"series": int((codes >= 0).sum()), "counts": fold_categories(counts, k)}


def anonymous_quantiles(values: Floats, k: int) -> dict[str, float]:
    """Window quantiles with ranks clamped to [k - 1, n - k] (0-based): at least ``k`` series at or
    below and at or above each; nothing when fewer than ``2 k`` values."""
    if values.size < 2 * k:
        return {}
    v = np.sort(values)
    out = {}
    for label, q in QUANTILES:
        pos = min(max(q * (v.size - 1), k - 1.0), v.size - float(k))
        lo = int(np.floor(pos))
        hi = min(lo + 1, v.size - 1)
        out[label] = float(v[lo] + (pos - lo) * (v[hi] - v[lo]))
    return out


def fold_categories(counts: Mapping[str, int], k: int) -> dict[str, int]:
    """Counts with categories seen fewer than ``k`` times, and UIDs without a known name, in ``other``."""
    out: dict[str, int] = {}
    for category, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        name = TRANSFER_SYNTAX_NAMES.get(category, category)
        if n < k or _UID.match(name):
            name = "other"
        out[name] = out.get(name, 0) + n
    return out
