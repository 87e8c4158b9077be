"""Which signals a reference supports, and their statistics over many windows at once.

:func:`specs_for` takes the reference's :class:`~agent.drift.table.SeriesTable` and returns one
:class:`SignalSpec` per signal it can judge; :func:`statistics` takes a table (reference, or
reference + window), the specs and two membership matrices (see ``agent.drift.stats``) and returns
``{(signal, statistic): values (B,)}``:

=====================================  ==========================================================
``input.intensity``, ``input.model_input``   ``psi``
``image.noise``                         ``ks``
``metadata.<numeric field>``           ``ks`` and ``out_of_range``
``output.confidence`` / ``entropy``,   ``ks``
``output.label_fraction.<label>``
``metadata.<categorical field>``,      ``chi2`` and ``unseen``
``output.class``
=====================================  ==========================================================

``quantization.agreement`` is not a window statistic (the variant guard measures it) and lives in
``agent.drift.evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.drift import stats
from agent.drift.table import HISTOGRAMS, Floats, SeriesTable

#: a field becomes a signal only when at least this many reference series have it: fewer values
#: make neither an ECDF nor category proportions worth testing against
MIN_REFERENCE_VALUES = 10
#: chi-square cells expected to hold fewer window series than this are merged into one (Cochran's
#: rule): a category the reference happened to under-count would otherwise give live windows a far
#: heavier tail than the bootstrap sees (measured: 0.8 % alerts instead of 0.1 % at window 20)
MIN_EXPECTED = 5.0

SignalKind = Literal["histogram", "numeric", "categorical"]
#: statistics whose null spread shrinks like the variance of a mean (1/window + 1/reference) and
#: those that shrink like its square root; counts are neither (see agent.drift.calibrate)
QUADRATIC = frozenset({"psi", "chi2"})
LINEAR = frozenset({"ks"})


@dataclass(frozen=True)
class SignalSpec:
    """One signal: ``range_check`` for metadata numeric fields (out-of-range count), ``integer``
    when every reference value is a whole number (exact range); ``rare``: the reference categories
    pooled into one chi-square cell at this window size (:data:`MIN_EXPECTED`)."""

    name: str
    kind: SignalKind
    range_check: bool = False
    integer: bool = False
    rare: tuple[str, ...] = ()

    @property
    def statistics(self) -> tuple[str, ...]:
        if self.kind == "histogram":
            return ("psi",)
        if self.kind == "numeric":
            return ("ks", "out_of_range") if self.range_check else ("ks",)
        return ("chi2", "unseen")


def specs_for(reference: SeriesTable, window: int) -> tuple[SignalSpec, ...]:
    """The signals the reference supports for windows of ``window`` series, in a stable order
    (histograms, metadata, outputs)."""
    specs: list[SignalSpec] = [SignalSpec(name, "histogram") for name in HISTOGRAMS
                               if int(reference.hist_present[name].sum()) >= MIN_REFERENCE_VALUES]
    for name in sorted(reference.numeric):
        values = reference.numeric[name]
        if int((~np.isnan(values)).sum()) >= MIN_REFERENCE_VALUES:
            metadata = name.startswith("metadata.")
            specs.append(SignalSpec(name, "numeric", range_check=metadata,
                                    integer=metadata and stats.is_integer_valued(values)))
    for name in sorted(reference.categorical):
        codes = reference.categorical[name]
        present = codes[codes >= 0]
        if present.size >= MIN_REFERENCE_VALUES:
            expected = window * np.bincount(present) / present.size
            rare = tuple(c for c, e in zip(reference.vocabulary[name], expected, strict=True) if e < MIN_EXPECTED)
            specs.append(SignalSpec(name, "categorical", rare=rare))
    return tuple(sorted(specs, key=lambda s: (not s.name.startswith("input."),
                                              not s.name.startswith("metadata."), s.name)))


def statistics(table: SeriesTable, specs: tuple[SignalSpec, ...], wc: Floats,
               rc: Floats) -> dict[tuple[str, str], Floats]:
    """Each spec's statistics, one value per row of ``wc`` / ``rc`` (NaN: not computable, e.g. no
    window series has the field). A field the table lacks altogether gives NaN rows."""
    b = wc.shape[0]
    out: dict[tuple[str, str], Floats] = {}
    for spec in specs:
        if spec.kind == "histogram":
            props, present = table.hist[spec.name], table.hist_present[spec.name]
            out[(spec.name, "psi")] = stats.psi(stats.pooled(props, present, wc),
                                                stats.pooled(props, present, rc))
        elif spec.kind == "numeric":
            values = table.numeric.get(spec.name)
            if values is None:
                values = np.full(table.n, np.nan)
            out[(spec.name, "ks")] = stats.ks(values, wc, rc)
            if spec.range_check:
                oor = stats.out_of_range(values, wc, rc, spec.integer)
                oor[np.isnan(out[(spec.name, "ks")])] = np.nan
                out[(spec.name, "out_of_range")] = oor
        else:
            codes = table.categorical.get(spec.name)
            if codes is None:
                out[(spec.name, "chi2")] = out[(spec.name, "unseen")] = np.full(b, np.nan)
                continue
            vocabulary = table.vocabulary[spec.name]
            cell = np.arange(len(vocabulary))
            pooled = [i for i, c in enumerate(vocabulary) if c in spec.rare]
            cell[pooled] = pooled[0] if pooled else 0
            codes = np.where(codes >= 0, cell[np.maximum(codes, 0)], -1)
            chi2, unseen = stats.chi2_unseen(codes, len(vocabulary), wc, rc)
            out[(spec.name, "chi2")], out[(spec.name, "unseen")] = chi2, unseen
    return out
