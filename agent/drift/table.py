"""Series summaries as arrays: the pool every drift statistic is computed over.

Takes a sequence of ``agent.core.drift.SeriesSummary`` (the reference series first and, for a live
verdict, the window after them) and the number of bins of the reference's two histograms; returns a
:class:`SeriesTable` keyed by signal name:

``hist``         ``input.intensity`` / ``input.model_input``: per-series proportions (n, bins) and the
                 raw counts (for the published pooled histogram); a series without counts has a
                 zero row and ``False`` in ``hist_present``
``numeric``      ``metadata.<field>``, ``output.confidence``, ``output.entropy``,
                 ``output.label_fraction.<label>``: (n,) floats, NaN where the series lacks the value
``categorical``  ``metadata.<field>``, ``output.class``: (n,) codes into a vocabulary ordered by
                 first appearance (so the reference's categories come first), -1 where absent

Which of these become signals is the reference's business (``agent.drift.signals.specs_for``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from agent.core.drift import SeriesSummary

#: the two histogram signals and the SeriesSummary attribute each reads
HISTOGRAMS: Mapping[str, str] = {"input.intensity": "intensity_counts", "input.model_input": "input_counts"}

Floats = NDArray[np.float64]
Ints = NDArray[np.int64]


@dataclass(frozen=True)
class SeriesTable:
    """Arrays over ``n`` series (see the module docstring)."""

    n: int
    hist: Mapping[str, Floats]
    hist_counts: Mapping[str, Ints]
    hist_present: Mapping[str, NDArray[np.bool_]]
    numeric: Mapping[str, Floats]
    categorical: Mapping[str, Ints]
    vocabulary: Mapping[str, tuple[str, ...]]


def numeric_values(summary: SeriesSummary) -> dict[str, float]:
    """One series' numeric values by signal name (non-finite values left out)."""
    values = {f"metadata.{k}": float(v) for k, v in summary.numeric.items()}
    if summary.confidence is not None:
        values["output.confidence"] = float(summary.confidence)
    if summary.entropy is not None:
        values["output.entropy"] = float(summary.entropy)
    values.update({f"output.label_fraction.{k}": float(v) for k, v in summary.label_fractions.items()})
    values.update({f"image.{k}": float(v) for k, v in summary.image.items()})
    return {k: v for k, v in values.items() if math.isfinite(v)}


def categorical_values(summary: SeriesSummary) -> dict[str, str]:
    """One series' categories by signal name (empty strings left out: "not recorded")."""
    values = {f"metadata.{k}": str(v) for k, v in summary.categorical.items() if str(v) != ""}
    if summary.predicted_class is not None:
        values["output.class"] = str(summary.predicted_class)
    return values


def build_table(series: Sequence[SeriesSummary], bins: Mapping[str, int]) -> SeriesTable:
    """Arrays over ``series``; ``bins``: histogram signal name -> number of bins of the reference.

    Raises ValueError when a series' counts have another length than the reference's bins (binned
    on other edges: comparing them would be meaningless) other than 0 (not computed)."""
    n = len(series)
    hist: dict[str, Floats] = {}
    hist_counts: dict[str, Ints] = {}
    hist_present: dict[str, NDArray[np.bool_]] = {}
    for name, attr in HISTOGRAMS.items():
        counts = np.zeros((n, bins[name]), dtype=np.int64)
        for i, s in enumerate(series):
            row: tuple[int, ...] = getattr(s, attr)
            if len(row) not in (0, bins[name]):
                raise ValueError(f"{name}: a series has {len(row)} bins, the reference {bins[name]}")
            if row:
                counts[i] = row
        totals = counts.sum(axis=1)
        present = totals > 0
        hist_counts[name], hist_present[name] = counts, present
        hist[name] = counts / np.where(present, totals, 1)[:, None]

    numeric: dict[str, Floats] = {}
    categorical: dict[str, Ints] = {}
    vocabulary: dict[str, dict[str, int]] = {}
    for i, s in enumerate(series):
        for name, value in numeric_values(s).items():
            numeric.setdefault(name, np.full(n, np.nan))[i] = value
        for name, cat in categorical_values(s).items():
            codes = vocabulary.setdefault(name, {})
            categorical.setdefault(name, np.full(n, -1, dtype=np.int64))[i] = codes.setdefault(cat, len(codes))
    return SeriesTable(n, hist, hist_counts, hist_present, numeric, categorical,
                       {name: tuple(codes) for name, codes in vocabulary.items()})
