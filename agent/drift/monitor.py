"""``DriftMonitor``: one per agent, every model's rolling window, verdict and state.

Takes a sqlite3 connection to the state database (its own: ``agent.core.db.connect``) and the
``[drift]`` configuration. ``set_reference(model, version, profile)`` installs a model's reference
``DriftProfile`` (from the manifest, or ``drift.json`` beside a registry-less ``model.onnx``) and
calibrates its thresholds for ``drift.window``; ``add(model, version, summary, agreement)`` adds one
inferred series and returns a ``DriftUpdate`` (the ``DriftReport`` now and a ``DriftTransition``
when the state changed); ``report(model)`` returns the current report.

The window is the model's last ``drift.window`` series *of the reference's version*. A window
belongs to one (version, reference): installing another version or a changed profile (other
edges, other reference series) empties it and puts the state back to ok (a ``reset`` transition
when it was not ok), since series binned on other edges, or judged against another reference, say
nothing about the new one. A series of another version than the reference's (a job that finished
after an update) is not added. Until ``min(drift.min_series, drift.window)`` series are in, the
phase is ``collecting`` and no signal is computed (nor published); then ``monitoring``. A model
without a usable reference (none, no per-series summaries, fewer than 10) is ``no_reference``.

Thresholds hold at the number of series actually in the window: ``set_reference`` calibrates for
``drift.window``; while a window fills, each size from ``min_series`` up is calibrated when first
reached (about 0.1-0.3 s, once per reference). Calibrations are seeded (identical after a restart)
and cached per (model, version, window size, reference digest).

Window, state and hysteresis count live in the state database (``agent.drift.store``), so a
restart resumes exactly. Calls are serialised by one lock.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.core.config import DriftConfig
from agent.core.drift import (
    DriftEdges,
    DriftPhase,
    DriftReport,
    DriftSignal,
    DriftTransition,
    DriftUpdate,
    SeriesSummary,
)
from agent.core.log import log_event
from agent.core.manifest import DriftProfile
from agent.drift.calibrate import MIN_REFERENCE_SERIES, Calibration, calibrate, seed_for
from agent.drift.evaluate import evaluate
from agent.drift.machine import step, verdict
from agent.drift.signals import SignalSpec, specs_for
from agent.drift.store import DriftStore, ModelState
from agent.drift.table import HISTOGRAMS, SeriesTable, build_table

log = logging.getLogger("agent.drift")


@dataclass(frozen=True)
class _Calibrated:
    specs: tuple[SignalSpec, ...]
    calibration: Calibration


@dataclass(frozen=True)
class _Reference:
    model: str
    version: str
    digest: str
    edges: DriftEdges
    bins: dict[str, int]
    series: tuple[SeriesSummary, ...]
    table: SeriesTable | None  # None: unusable (phase no_reference)
    profile: DriftProfile  # the object it was built from: the service hands the same one every job


class DriftMonitor:
    """Every model's drift (module docstring). Thread-safe. ``familywise``: Bonferroni thresholds
    so the *model* rather than each signal holds the 1 % / 0.1 % rates
    (``agent.drift.calibrate``; not the default)."""

    def __init__(self, conn: sqlite3.Connection, config: DriftConfig, *,
                 clock: Callable[[], float] = time.time, familywise: bool = False) -> None:
        self.config = config
        self.familywise = familywise
        self._store = DriftStore(conn)
        self._clock = clock
        self._lock = threading.Lock()
        self._refs: dict[str, _Reference] = {}
        self._calibrations: dict[tuple[str, str, int, str], _Calibrated] = {}
        self._windows: dict[str, deque[tuple[SeriesSummary, float | None]]] = {}
        self._reports: dict[str, DriftReport] = {}

    def retune(self, familywise: bool) -> None:
        """Switch ``familywise`` (a reload of ``drift.thresholds``): thresholds are calibrated again
        when next needed; windows and states are kept."""
        with self._lock:
            if familywise != self.familywise:
                self.familywise = familywise
                self._calibrations.clear()

    # --- references -----------------------------------------------------------------------------

    def set_reference(self, model: str, version: str, profile: DriftProfile) -> DriftTransition | None:
        """Install ``model``'s reference for ``version`` and calibrate it (under a second for
        2,000 windows). Same version and profile as stored: window and state are kept (a restart);
        otherwise they are reset, and the reset is returned as a transition if the state was not ok.
        Raises ValueError on a malformed ``series`` entry or histograms that disagree with the edges."""
        with self._lock:  # also serialises the calibration cache
            installed = self._refs.get(model)
            # the service calls this before every series: the installed reference, unchanged, is
            # kept without re-parsing its series (the same object, or one with the same digest)
            if installed is not None and installed.version == version and (
                    installed.profile is profile or installed.digest == _digest(profile)):
                return None
            ref = self._reference(model, version, profile)
            self._refs[model] = ref
            self._reports.pop(model, None)
            st = self._store.state(model)
            if st is not None and (st.version, st.reference) == (version, ref.digest):
                return None
            now = self._clock()
            self._store.reset(ModelState(model, version, ref.digest, "ok", now))
            self._windows[model] = deque(maxlen=self.config.window)
            log_event(log, "drift.reference", model=model, version=version, series=len(ref.series),
                      usable=ref.table is not None)
            if st is None or st.state == "ok":
                return None
            return DriftTransition(model, version, st.state, "ok", "reset", (), now)

    def edges(self, model: str) -> DriftEdges | None:
        """The histogram edges the worker must bin ``model``'s series on (None: no reference)."""
        ref = self._refs.get(model)
        return None if ref is None else ref.edges

    def _reference(self, model: str, version: str, profile: DriftProfile) -> _Reference:
        digest = _digest(profile)
        edges = DriftEdges(tuple(profile.intensity.edges), tuple(profile.model_input.edges))
        bins = {"input.intensity": len(edges.intensity) - 1, "input.model_input": len(edges.model_input) - 1}
        series = tuple(SeriesSummary.from_json(doc) for doc in profile.series)
        table = build_table(series, bins) if len(series) >= MIN_REFERENCE_SERIES else None
        ref = _Reference(model, version, digest, edges, bins, series, table, profile)
        if table is not None:
            self._calibrated(ref, self.config.window)
        return ref

    def _calibrated(self, ref: _Reference, size: int) -> _Calibrated:
        """Specs and thresholds for windows of exactly ``size`` series. While a window fills
        (``min_series`` <= size < ``window``) each size is calibrated when first needed (once per
        reference) and only the latest kept besides the full window's; another version's go."""
        assert ref.table is not None
        key = (ref.model, ref.version, size, ref.digest)
        if key not in self._calibrations:
            stale = [k for k in self._calibrations if k[0] == ref.model
                     and (k[2] != self.config.window or (k[1], k[3]) != (ref.version, ref.digest))]
            for old in stale:
                del self._calibrations[old]
            specs = specs_for(ref.table, size)
            self._calibrations[key] = _Calibrated(specs, calibrate(
                ref.table, specs, size, self.config.bootstrap_windows,
                seed_for(ref.model, ref.version, size, ref.digest), self.familywise))
        return self._calibrations[key]

    # --- series ---------------------------------------------------------------------------------

    def add(self, model: str, version: str, summary: SeriesSummary,
            agreement: float | None = None) -> DriftUpdate:
        """Add one inferred series of ``model`` ``version`` (``agreement``: the variant guard's
        shadow-FP32 agreement rate now, if it measures one). Raises ValueError when the summary's
        histograms were binned on other edges than the reference's."""
        with self._lock:
            ref = self._refs.get(model)
            st = self._store.state(model)
            if ref is None or ref.table is None or st is None or version != ref.version:
                return DriftUpdate(self._bare(model, version, st))
            for name, attr in HISTOGRAMS.items():
                got = len(getattr(summary, attr))
                if got not in (0, ref.bins[name]):
                    raise ValueError(f"{model}: {name} has {got} bins, the reference {ref.bins[name]}")
            window = self._window(model)
            window.append((summary, agreement))
            now = self._clock()
            st.next_seq += 1
            signals: tuple[DriftSignal, ...] = ()
            transition = None
            phase: DriftPhase = "collecting"
            if len(window) >= min(self.config.min_series, self.config.window):
                phase = "monitoring"
                signals = self._signals(ref, window)
                old = st.state
                st.state, st.lower_streak, reason = step(st.state, st.lower_streak, verdict(signals),
                                                         self.config.hysteresis_series)
                if reason is not None:
                    st.since = now
                    names = tuple(s.name for s in signals if s.state == st.state and st.state != "ok")
                    transition = DriftTransition(model, version, old, st.state, reason, names, now)
                    log_event(log, "drift.state_changed", model=model, version=version, old=old,
                              new=st.state, reason=reason, signals=",".join(names))
            try:
                self._store.append(st, summary, agreement, self.config.window, now)
            except Exception:
                self._windows.pop(model, None)  # reload what the database holds next time
                raise
            report = self._report(model, st, phase, len(window), signals)
            self._reports[model] = report
            return DriftUpdate(report, transition)

    def report(self, model: str) -> DriftReport | None:
        """``model``'s drift now (None: the monitor knows nothing of it)."""
        with self._lock:
            if model in self._reports:
                return self._reports[model]
            ref, st = self._refs.get(model), self._store.state(model)
            if st is None or ref is None or ref.table is None or st.version != ref.version:
                if st is None and ref is None:
                    return None
                return self._bare(model, ref.version if ref is not None else st.version if st else "", st)
            window = self._window(model)
            if len(window) < min(self.config.min_series, self.config.window):
                report = self._report(model, st, "collecting", len(window), ())
            else:
                report = self._report(model, st, "monitoring", len(window), self._signals(ref, window))
            self._reports[model] = report
            return report

    def models(self) -> tuple[str, ...]:
        """Models with a reference or a stored state (the ones ``report`` knows)."""
        with self._lock:
            return tuple(sorted(set(self._refs) | set(self._store.models())))

    def forget(self, model: str) -> None:
        """Drop a removed model's reference, window and state."""
        with self._lock:
            self._store.forget(model)
            for cache in (self._refs, self._windows, self._reports):
                cache.pop(model, None)

    # --- helpers --------------------------------------------------------------------------------

    def _window(self, model: str) -> deque[tuple[SeriesSummary, float | None]]:
        if model not in self._windows:
            self._windows[model] = deque(self._store.window(model, self.config.window), maxlen=self.config.window)
        return self._windows[model]

    def _signals(self, ref: _Reference, window: deque[tuple[SeriesSummary, float | None]]) -> tuple[DriftSignal, ...]:
        cal = self._calibrated(ref, len(window))
        agreement = next((a for _, a in reversed(window) if a is not None), None)
        return evaluate(ref.series, [s for s, _ in window], agreement, cal.specs, cal.calibration, ref.bins,
                        self.config.k_anonymity)

    def _report(self, model: str, st: ModelState, phase: DriftPhase, n: int,
                signals: tuple[DriftSignal, ...]) -> DriftReport:
        return DriftReport(model, st.version, st.state, phase, self.config.window, n,
                           min(self.config.min_series, self.config.window), signals, st.since)

    def _bare(self, model: str, version: str, st: ModelState | None) -> DriftReport:
        """A model's report without a usable reference for ``version``: no_reference, no signals."""
        return DriftReport(model, version, "ok", "no_reference", self.config.window, 0,
                           min(self.config.min_series, self.config.window), (),
                           st.since if st is not None else self._clock())


def _digest(profile: DriftProfile) -> str:
    """Identifies a reference: a new profile for the same version starts a fresh window."""
    return hashlib.sha256(profile.model_dump_json().encode()).hexdigest()
