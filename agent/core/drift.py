"""Drift records passed between stages and published: what one series looked like, what a window
of series says against the reference, and the per-model state.

``SeriesSummary``  one series in aggregate (histogram counts on the reference's fixed edges,
                   non-PHI metadata values, the model's output in short). Computed in the inference
                   worker (``agent.imaging.summary``) and by ``edge-deploy`` for the reference; it
                   never leaves the device as such: only window aggregates are published.
``DriftEdges``     the reference's histogram edges, sent with each job so the worker bins live data
                   exactly as the reference was binned.
``DriftSignal``    one signal's verdict over the window (``input.intensity``, ``metadata.kvp``, ...)
``DriftReport``    one model's drift message (``{prefix}/{device_id}/drift``)
``DriftTransition`` a model's state changed (``drift.state_changed``): old and new state, the signals
                   behind it, why (escalated, stepped down after hysteresis, reset by a new reference)
``DriftUpdate``    what ``agent.drift.DriftMonitor.add`` returns: the new report and the transition, if any

Nothing here holds a UID, a patient attribute or a single study's value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

DriftState = Literal["ok", "warn", "alert"]
#: a model's state before ``drift.min_series`` series are in its window
DriftPhase = Literal["collecting", "monitoring", "no_reference"]

DRIFT_STATES: tuple[DriftState, ...] = ("ok", "warn", "alert")
#: why a model's state changed: a worse verdict (at once), ``hysteresis_series`` better verdicts in a
#: row (one level down), or a new reference / model version (back to ok with a fresh window)
TransitionReason = Literal["escalated", "stepped_down", "reset"]


@dataclass(frozen=True)
class DriftEdges:
    """Fixed histogram edges of a model's reference profile (raw modality values, model input)."""

    intensity: tuple[float, ...]
    model_input: tuple[float, ...]


@dataclass(frozen=True)
class SeriesSummary:
    """One series in aggregate (see the module docstring).

    ``intensity_counts`` / ``input_counts``: histogram counts on ``DriftEdges`` (values outside
    fall into the end bins); ``numeric`` / ``categorical``: non-PHI acquisition metadata
    (``agent.imaging.summary.NUMERIC_FIELDS`` / ``CATEGORICAL_FIELDS``), absent fields left out;
    ``predicted_class``, ``confidence``, ``entropy``: a classifier's output; ``label_fractions``: a
    segmentation model's share of voxels per foreground label.
    """

    intensity_counts: tuple[int, ...]
    input_counts: tuple[int, ...]
    numeric: Mapping[str, float] = field(default_factory=dict)
    categorical: Mapping[str, str] = field(default_factory=dict)
    predicted_class: str | None = None
    confidence: float | None = None
    entropy: float | None = None
    label_fractions: Mapping[str, float] = field(default_factory=dict)
    #: image statistics from the pixels (``noise``: see ``agent.imaging.summary.image_statistics``)
    image: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """The form kept in a reference profile's ``series`` list and in the state database."""
        doc: dict[str, object] = {"intensity_counts": list(self.intensity_counts),
                                  "input_counts": list(self.input_counts),
                                  "numeric": dict(self.numeric), "categorical": dict(self.categorical)}
        for key in ("predicted_class", "confidence", "entropy"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.label_fractions:
            doc["label_fractions"] = dict(self.label_fractions)
        if self.image:
            doc["image"] = dict(self.image)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> SeriesSummary:
        """Inverse of ``to_json`` (ValueError on a malformed record)."""
        try:
            def floats(key: str) -> dict[str, float]:
                raw = doc.get(key, {})
                assert isinstance(raw, Mapping)
                return {str(k): float(v) for k, v in raw.items()}

            def ints(key: str) -> tuple[int, ...]:
                raw = doc[key]
                assert isinstance(raw, (list, tuple))
                return tuple(int(v) for v in raw)

            cats = doc.get("categorical", {})
            assert isinstance(cats, Mapping)
            conf, ent, pred = doc.get("confidence"), doc.get("entropy"), doc.get("predicted_class")
            return cls(ints("intensity_counts"), ints("input_counts"), floats("numeric"),
                       {str(k): str(v) for k, v in cats.items()},
                       None if pred is None else str(pred),
                       None if conf is None else float(str(conf)),
                       None if ent is None else float(str(ent)),
                       floats("label_fractions"), floats("image"))
        except (KeyError, AssertionError, TypeError, ValueError) as exc:
            raise ValueError(f"not a series summary: {exc!r}") from exc


@dataclass(frozen=True)
class DriftSignal:
    """One signal over the window: ``statistic`` names the test (``psi``, ``ks``, ``chi2``,
    ``out_of_range``, ``unseen``, ``agreement``), ``value`` its value now, ``warn`` / ``alert`` the
    thresholds in force (calibrated for this window size; for ``agreement`` lower is worse).
    ``detail``: aggregates that explain it (window histogram, category counts folded below k into
    ``other``, out-of-range count), never a single series' value."""

    name: str
    state: DriftState
    statistic: str
    value: float
    warn: float
    alert: float
    detail: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"name": self.name, "state": self.state, "statistic": self.statistic,
                                  "value": self.value, "warn": self.warn, "alert": self.alert}
        if self.detail:
            doc["detail"] = dict(self.detail)
        return doc


@dataclass(frozen=True)
class DriftReport:
    """One model's drift over its window: the message on ``{prefix}/{device_id}/drift``."""

    model: str
    version: str
    state: DriftState
    phase: DriftPhase
    window_size: int  # drift.window
    series_in_window: int
    min_series: int
    signals: tuple[DriftSignal, ...]
    since: float  # epoch seconds when ``state`` was entered

    def responsible(self) -> tuple[str, ...]:
        """Names of the signals at the model's state (the ones behind a warn or alert)."""
        return tuple(s.name for s in self.signals if s.state == self.state and self.state != "ok")

    def to_json(self) -> dict[str, object]:
        """The drift message's body (aggregates only; see the module docstring)."""
        return {"model": self.model, "version": self.version, "state": self.state, "phase": self.phase,
                "window_size": self.window_size, "series_in_window": self.series_in_window,
                "min_series": self.min_series, "since": self.since,
                "responsible": list(self.responsible()), "signals": [s.to_json() for s in self.signals]}


@dataclass(frozen=True)
class DriftTransition:
    """A model's drift state changed from ``old`` to ``new`` at ``at`` (epoch seconds).

    ``signals``: the signals at the new state (the ones behind it; none when the new state is ok,
    and none on a reset)."""

    model: str
    version: str
    old: DriftState
    new: DriftState
    reason: TransitionReason
    signals: tuple[str, ...]
    at: float

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "version": self.version, "old": self.old, "new": self.new,
                "reason": self.reason, "signals": list(self.signals), "at": self.at}


@dataclass(frozen=True)
class DriftUpdate:
    """One series added to a model's window: the report now and, if the state changed, how."""

    report: DriftReport
    transition: DriftTransition | None = None
