"""False alarms of the drift engine on data that has not drifted (docs/drift.md, "Measured").

For each window size (default 20 and 50) and each of ``--references`` independent references of
``--reference-series`` series drawn from ``agent.drift.synthetic.SyntheticSite`` (no DICOM needed):

1. calibrate the thresholds exactly as the agent does (``agent.drift.calibrate``, 2,000 bootstrap
   windows with hold-out) and time it;
2. draw ``--windows`` in-distribution windows (random subsets of a fresh pool of
   ``--pool`` series from the same generator) and count how often each statistic, each signal
   (its tests together) and the model (any signal) is at warn or worse / at alert;
3. measure how many drifted series after an onset (a window of clean series before it) each of
   a few drifts needs until its signal warns / alerts (the price of the thresholds);
4. stream ``--stream`` fresh in-distribution series through a ``DriftMonitor`` (sliding window,
   hysteresis, the default configuration otherwise) and count the share of series the model's
   *state* is warn / alert, and the escalations per 1,000 series.

Rates are means over the references; ``refs p90`` is the 90th percentile across references (a
single device has one reference: its own rate can sit far from the mean). Prints markdown tables
and the machine line; takes a few minutes on 2 cores::

    .venv/bin/python bench/drift_false_alarms.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line  # noqa: E402

sys.path.insert(0, str(REPO))
from agent.core import db  # noqa: E402
from agent.core.config import DriftConfig  # noqa: E402
from agent.drift import DriftMonitor  # noqa: E402
from agent.drift.calibrate import calibrate  # noqa: E402
from agent.drift.signals import specs_for, statistics  # noqa: E402
from agent.drift.synthetic import SyntheticSite, profile_from_series  # noqa: E402
from agent.drift.table import build_table  # noqa: E402

BINS = {"input.intensity": 64, "input.model_input": 64}


def windows_rates(site, window, ref_series, args, rng):
    """Per (signal, statistic), per signal and per model: (warn rate, alert rate) on fresh windows;
    and the calibration time."""
    table = build_table(ref_series, BINS)
    specs = specs_for(table, window)
    t0 = time.perf_counter()
    cal = calibrate(table, specs, window, args.bootstrap, seed=int(rng.integers(1 << 31)),
                    familywise=args.familywise)
    seconds = time.perf_counter() - t0
    pool = site.draw(args.pool, rng)
    both = build_table(ref_series + pool, BINS)
    n = len(ref_series)
    wc = np.zeros((args.windows, both.n))
    pick = rng.random((args.windows, args.pool)).argsort(axis=1)[:, :window] + n
    wc[np.arange(args.windows)[:, None], pick] = 1.0
    rc = np.zeros_like(wc)
    rc[:, :n] = 1.0
    values = statistics(both, specs, wc, rc)
    level = {}
    for key, v in values.items():
        if key in cal.thresholds:
            warn, alert = cal.thresholds[key]
            level[key] = np.where(v > alert, 2, np.where(v > warn, 1, 0))
    out = {}
    for key, lv in level.items():
        out[key] = ((lv >= 1).mean(), (lv >= 2).mean())
    model = np.zeros(args.windows, dtype=int)
    for spec in specs:
        lv = np.max([level[(spec.name, s)] for s in spec.statistics if (spec.name, s) in level] or [model], axis=0)
        out[(spec.name, "signal")] = ((lv >= 1).mean(), (lv >= 2).mean())
        model = np.maximum(model, lv)
    out[("model", "any signal")] = ((model >= 1).mean(), (model >= 2).mean())
    return out, seconds, cal.scheme


#: drifts whose detection delay is printed beside the false alarms (the price of fewer false alarms)
SCENARIOS = {
    "intensity +20 HU": ("input.intensity", {"hu_shift": 20.0}),
    "intensity +60 HU": ("input.intensity", {"hu_shift": 60.0}),
    "kVp all 140": ("metadata.kvp", {"kvp": ((140.0, 1.0),)}),
    "manufacturer all SIEMENS": ("metadata.manufacturer", {"manufacturers": (("SIEMENS", 1.0),)}),
    "confidence Beta(3, 2)": ("output.confidence", {"confidence": (3.0, 2.0)}),
    "unseen manufacturer": ("metadata.manufacturer", {"manufacturers": (("ACME", 1.0),)}),
    "slice thickness 8 mm": ("metadata.slice_thickness", {"slice_thickness": ((8.0, 1.0),)}),
}


def detection(site, window, ref_series, args, rng):
    """Per scenario: drifted series needed (window full of clean series before the onset) until
    the scenario's signal reaches warn and alert (window + 1: not within one window)."""
    table = build_table(ref_series, BINS)
    specs = specs_for(table, window)
    cal = calibrate(table, specs, window, args.bootstrap, seed=int(rng.integers(1 << 31)),
                    familywise=args.familywise)
    clean = site.draw(window, rng)
    out = {}
    for label, (signal, change) in SCENARIOS.items():
        drifted = dataclasses.replace(site, **change).draw(window, rng)
        both = build_table(ref_series + clean + drifted, BINS)
        n = len(ref_series)
        wc = np.zeros((window, both.n))
        for k in range(1, window + 1):  # row k - 1: the last `window` series after k drifted ones
            wc[k - 1, n + k: n + window + k] = 1.0
        rc = np.zeros_like(wc)
        rc[:, :n] = 1.0
        values = statistics(both, specs, wc, rc)
        levels = np.zeros(window, dtype=int)
        for (name, stat), v in values.items():
            if name == signal and (name, stat) in cal.thresholds:
                warn, alert = cal.thresholds[(name, stat)]
                levels = np.maximum(levels, np.where(v > alert, 2, np.where(v > warn, 1, 0)))
        first = [int(np.argmax(levels >= lv)) + 1 if (levels >= lv).any() else window + 1 for lv in (1, 2)]
        out[label] = first
    return out


def stream_rates(site, window, ref_series, args, rng):
    """Share of streamed series in warn / alert state and escalations, for one reference."""
    profile = profile_from_series(ref_series, site.edges(), "bench")
    with tempfile.TemporaryDirectory() as tmp:
        m = DriftMonitor(db.connect(Path(tmp) / "state.db"), DriftConfig(window=window),
                         familywise=args.familywise)
        m.set_reference("bench", "1", profile)
        for s in site.draw(window, rng):  # fill the window first (and its calibrations)
            m.add("bench", "1", s)
        states, escalations = [], 0
        t0 = time.perf_counter()
        for s in site.draw(args.stream, rng):
            u = m.add("bench", "1", s)
            states.append(u.report.state)
            escalations += u.transition is not None and u.transition.reason == "escalated"
        per_add = (time.perf_counter() - t0) / args.stream
    st = np.array(states)
    return (st != "ok").mean(), (st == "alert").mean(), 1000.0 * escalations / args.stream, per_add


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window-sizes", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--references", type=int, default=20)
    ap.add_argument("--reference-series", type=int, default=200)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--stream", type=int, default=600, help="series streamed per reference (0: skip)")
    ap.add_argument("--stream-references", type=int, default=4)
    ap.add_argument("--detection-references", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--familywise", action="store_true",
                    help="Bonferroni thresholds for the model instead of each signal (agent.drift.calibrate)")
    args = ap.parse_args()
    site = SyntheticSite()
    print(machine_line())
    print(f"references: {args.references} x {args.reference_series} series; {args.windows} windows per "
          f"reference from a pool of {args.pool}; {args.bootstrap} bootstrap windows; thresholds "
          f"{'family-wise (model)' if args.familywise else 'per signal'}\n")
    for window in args.window_sizes:
        rng = np.random.default_rng(args.seed + window)
        per = defaultdict(list)
        times, schemes = [], set()
        for _ in range(args.references):
            ref = site.draw(args.reference_series, rng)
            rates, seconds, scheme = windows_rates(site, window, ref, args, rng)
            times.append(seconds)
            schemes.add(scheme)
            for key, r in rates.items():
                per[key].append(r)
        print(f"### window {window} (calibration {np.mean(times) * 1000:.0f} ms mean, "
              f"{max(times) * 1000:.0f} ms max; {', '.join(sorted(schemes))})\n")
        print("| signal | test | warn % | alert % | warn % refs p90 | alert % refs p90 |")
        print("|---|---|---:|---:|---:|---:|")
        for key in sorted(per, key=lambda k: (k[0] == "model", k[0], k[1] != "signal", k[1])):
            a = np.array(per[key]) * 100.0
            if key[1] != "signal" and key[0] != "model" and a.max() == 0.0:
                continue  # a test that never fired (constant fields, unseen / out-of-range counts)
            print(f"| {key[0]} | {key[1]} | {a[:, 0].mean():.2f} | {a[:, 1].mean():.3f} | "
                  f"{np.percentile(a[:, 0], 90):.2f} | {np.percentile(a[:, 1], 90):.3f} |")
        delays = defaultdict(list)
        for _ in range(args.detection_references):
            for label, d in detection(site, window, site.draw(args.reference_series, rng), args, rng).items():
                delays[label].append(d)
        if delays:
            print(f"\ndetection ({args.detection_references} references; drifted series after the onset "
                  f"until the signal warns / alerts, median and max; {window + 1}: not within the window)\n")
            print("| drift | signal | warn after | alert after |")
            print("|---|---|---:|---:|")
            for label, d in delays.items():
                a = np.array(d)
                print(f"| {label} | {SCENARIOS[label][0]} | {np.median(a[:, 0]):.0f} (max {a[:, 0].max()}) | "
                      f"{np.median(a[:, 1]):.0f} (max {a[:, 1].max()}) |")
        if args.stream:
            res = [stream_rates(site, window, site.draw(args.reference_series, rng), args, rng)
                   for _ in range(args.stream_references)]
            r = np.array(res)
            print(f"\nstream ({args.stream_references} references x {args.stream} series, hysteresis 5): "
                  f"state warn-or-worse {100 * r[:, 0].mean():.1f} % of series, alert {100 * r[:, 1].mean():.1f} %, "
                  f"{r[:, 2].mean():.1f} escalations per 1000 series; add() {1000 * r[:, 3].mean():.1f} ms\n")


if __name__ == "__main__":
    main()
