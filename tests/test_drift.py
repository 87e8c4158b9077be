"""Drift engine (agent.drift): statistics, calibration, detection, state machine, persistence, privacy.

Synthetic series come from ``agent.drift.synthetic.SyntheticSite`` (known distributions, seeded),
so every test is deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from agent.core import db
from agent.core.config import DriftConfig
from agent.core.drift import DriftReport, DriftSignal, SeriesSummary
from agent.core.manifest import DriftProfile
from agent.drift import DriftMonitor
from agent.drift import stats as ds
from agent.drift.calibrate import calibrate, draw_members, seed_for
from agent.drift.evaluate import anonymous_quantiles, fold_categories
from agent.drift.machine import step, verdict
from agent.drift.signals import specs_for, statistics
from agent.drift.synthetic import SyntheticSite, profile_from_series
from agent.drift.table import build_table

SITE = SyntheticSite()
BINS = {"input.intensity": 64, "input.model_input": 64}
UID_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+")


def _one(values: list[float] | np.ndarray, n_ref: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool ``values`` with the first ``n_ref`` as the reference, the rest as one window."""
    v = np.asarray(values, dtype=float)
    rc = np.zeros((1, v.size))
    rc[0, :n_ref] = 1.0
    return v, 1.0 - rc, rc


# --- statistics -----------------------------------------------------------------------------------


def test_psi_known_case_and_epsilon() -> None:
    p, q = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    ps = (p + ds.EPSILON) / (1 + 2 * ds.EPSILON)
    qs = (q + ds.EPSILON) / (1 + 2 * ds.EPSILON)
    assert ds.psi(p, q)[0] == pytest.approx(float(((ps - qs) * np.log(ps / qs)).sum()))
    assert ds.psi(p, q)[0] == pytest.approx(0.2 * np.log(0.5 / 0.9) * -2 + 0.4 * np.log(5), rel=1e-3)
    assert ds.psi(p, p)[0] == 0.0
    empty = ds.psi(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]))[0]  # an empty bin: finite
    assert np.isfinite(empty) and empty > 1.0


def test_pooled_histogram_weights_each_series_equally() -> None:
    props = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    present = np.array([True, True, False])
    out = ds.pooled(props, present, np.array([[1.0, 1.0, 1.0]]))
    assert out.tolist() == [[0.5, 0.5]]  # the series without a histogram does not count


@pytest.mark.parametrize("discrete", [False, True])
def test_ks_matches_scipy(discrete: bool) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.normal(0, 1, 80)
        b = rng.normal(0.3, 1.2, 35)
        if discrete:
            a, b = np.round(a), np.round(b)
        v, wc, rc = _one(np.concatenate([a, b]), a.size)
        assert ds.ks(v, wc, rc)[0] == pytest.approx(sps.ks_2samp(b, a).statistic, abs=1e-12)


def test_ks_ignores_absent_values_and_is_nan_without_any() -> None:
    v, wc, rc = _one([1.0, 2.0, np.nan, 1.0, np.nan], 3)
    assert ds.ks(v, wc, rc)[0] == pytest.approx(0.5)
    v, wc, rc = _one([1.0, 2.0, np.nan, np.nan], 2)
    assert np.isnan(ds.ks(v, wc, rc)[0])


def test_chi2_matches_scipy_and_counts_unseen() -> None:
    ref = [0] * 50 + [1] * 30 + [2] * 20
    win = [0] * 10 + [1] * 12 + [2] * 3 + [3] * 2  # category 3: never in the reference
    codes = np.array(ref + win)
    _, wc, rc = _one(codes, len(ref))
    chi2, unseen = ds.chi2_unseen(codes, 4, wc, rc)
    expected = sps.chisquare([10, 12, 3], f_exp=np.array([0.5, 0.3, 0.2]) * 25).statistic
    assert chi2[0] == pytest.approx(expected)
    assert unseen[0] == 2


def test_out_of_range_margin_and_integer_fields() -> None:
    ref = [1.0, 1.25, 2.5, 5.0]
    v, wc, rc = _one(ref + [5.3, 5.5, 8.0, 0.5, 3.0], len(ref))
    assert ds.out_of_range(v, wc, rc, integer=False)[0] == 3  # [0.6, 5.4]: 5.5, 8 and 0.5
    v, wc, rc = _one([512.0, 512.0, 511.0, 1024.0, 512.0], 2)
    assert ds.out_of_range(v, wc, rc, integer=True)[0] == 2  # exact: 511 and 1024
    assert ds.is_integer_valued(np.array([512.0, np.nan, 256.0]))
    assert not ds.is_integer_valued(np.array([1.0, 1.25]))


# --- calibration ----------------------------------------------------------------------------------


def test_draws_hold_the_window_out_of_its_reference() -> None:
    rng = np.random.default_rng(0)
    wc, rc, scheme, _ = draw_members(200, 50, 100, rng)
    assert scheme == "hold_out" and (wc.sum(axis=1) == 50).all() and ((wc > 0) & (rc > 0)).sum() == 0
    assert (wc + rc == 1).all()
    wc, rc, scheme, _ = draw_members(60, 50, 100, rng)  # too few to hold 50 out: split in halves
    assert scheme == "split_half" and (wc.sum(axis=1) == 50).all() and ((wc > 0) & (rc > 0)).sum() == 0


def _false_alarm_rates(window: int, n_refs: int = 6, n_ref: int = 200, n_windows: int = 1000,
                       familywise: bool = False) -> tuple[float, float, float, float]:
    """Mean warn / alert rate of the calibrated statistics (PSI, KS, chi-square with a non-zero
    null) on fresh in-distribution windows over ``n_refs`` independent references, and the rate
    at which any of them is at warn / alert (the model's verdict)."""
    warn, alert, model_warn, model_alert = [], [], [], []
    for r in range(n_refs):
        rng = np.random.default_rng(100 + r)
        ref = SITE.draw(n_ref, rng)
        table = build_table(ref, BINS)
        specs = specs_for(table, window)
        cal = calibrate(table, specs, window, 2000, seed=r, familywise=familywise)
        fresh = SITE.draw(8 * window, rng)
        pool = build_table(ref + fresh, BINS)
        wc = np.zeros((n_windows, pool.n))
        pick = rng.random((n_windows, len(fresh))).argsort(axis=1)[:, :window] + n_ref
        wc[np.arange(n_windows)[:, None], pick] = 1.0
        rc = np.zeros_like(wc)
        rc[:, :n_ref] = 1.0
        any_warn = any_alert = np.zeros(n_windows, dtype=bool)
        for key, values in statistics(pool, specs, wc, rc).items():
            limits = cal.thresholds.get(key)
            if key[1] in ("psi", "ks", "chi2") and limits is not None and limits[1] > 0:
                warn.append(float((values > limits[0]).mean()))
                alert.append(float((values > limits[1]).mean()))
                any_warn, any_alert = any_warn | (values > limits[0]), any_alert | (values > limits[1])
        model_warn.append(float(any_warn.mean()))
        model_alert.append(float(any_alert.mean()))
    return float(np.mean(warn)), float(np.mean(alert)), float(np.mean(model_warn)), float(np.mean(model_alert))


@pytest.mark.parametrize("window", [20, 50])
def test_calibrated_thresholds_give_the_stated_false_alarm_rate(window: int) -> None:
    warn, alert, model_warn, _ = _false_alarm_rates(window)
    assert 0.005 <= warn <= 0.02, warn  # stated: 1 % per signal
    assert alert <= 0.003, alert  # stated: 0.1 % per signal
    assert model_warn > 0.05  # ~14 signals at 1 % each: the model is at warn far more often


def test_familywise_thresholds_hold_the_rate_for_the_model() -> None:
    _, _, model_warn, model_alert = _false_alarm_rates(50, n_refs=3, familywise=True)
    assert model_warn <= 0.02 and model_alert <= 0.003, (model_warn, model_alert)


def test_calibration_is_deterministic_and_fast() -> None:
    table = build_table(SITE.draw(200, np.random.default_rng(1)), BINS)
    specs = specs_for(table, 50)
    t0 = time.perf_counter()
    a = calibrate(table, specs, 50, 2000, seed_for("m", "1", 50, "d"))
    elapsed = time.perf_counter() - t0
    b = calibrate(table, specs, 50, 2000, seed_for("m", "1", 50, "d"))
    assert a == b and len(specs) >= 15 and len(a.thresholds) >= 25
    assert elapsed < 2.0, f"2000 windows x {len(specs)} signals took {elapsed:.2f} s"


# --- the monitor ----------------------------------------------------------------------------------


def _monitor(tmp_path: Path, **cfg: int) -> DriftMonitor:
    return DriftMonitor(db.connect(tmp_path / "state.db"), DriftConfig(**cfg))  # type: ignore[arg-type]


def _fill(m: DriftMonitor, n: int, rng: np.random.Generator, site: SyntheticSite = SITE) -> DriftReport:
    report = None
    for _ in range(n):
        report = m.add("ct", "1.0", site.series(rng)).report
    assert report is not None
    return report


@pytest.fixture(scope="module")
def profile() -> DriftProfile:
    return SITE.profile(200, seed=7)


def test_collecting_until_min_series_then_monitoring(tmp_path: Path, profile: DriftProfile) -> None:
    m = _monitor(tmp_path)
    assert m.report("ct") is None
    assert m.add("ct", "1.0", SITE.series(np.random.default_rng(0))).report.phase == "no_reference"
    m.set_reference("ct", "1.0", profile)
    rng = np.random.default_rng(11)
    report = _fill(m, 19, rng)
    assert (report.phase, report.series_in_window, report.signals) == ("collecting", 19, ())
    report = _fill(m, 1, rng)
    assert report.phase == "monitoring" and report.state == "ok" and len(report.signals) >= 15
    assert m.add("ct", "0.9", SITE.series(rng)).report.phase == "no_reference"  # another version
    assert m.report("ct") == report


@pytest.mark.parametrize("name, drifted, statistic", [
    ("input.intensity", dataclasses.replace(SITE, hu_shift=60.0), "psi"),
    ("metadata.manufacturer", dataclasses.replace(SITE, manufacturers=(("ACME", 1.0),)), "unseen"),
    ("metadata.slice_thickness", dataclasses.replace(SITE, slice_thickness=((8.0, 1.0),)), "out_of_range"),
])
def test_drift_reaches_alert_within_one_window(tmp_path: Path, profile: DriftProfile, name: str,
                                                drifted: SyntheticSite, statistic: str) -> None:
    m = _monitor(tmp_path)
    m.set_reference("ct", "1.0", profile)
    rng = np.random.default_rng(21)
    assert _fill(m, 50, rng).state == "ok"
    added = 0
    while added < 50:
        update = m.add("ct", "1.0", drifted.series(rng))
        added += 1
        if update.report.state == "alert":
            break
    assert update.report.state == "alert", f"no alert after {added} drifted series"
    assert name in update.report.responsible()
    signal = next(s for s in update.report.signals if s.name == name)
    assert signal.statistic == statistic and signal.value > signal.alert
    assert update.transition is not None and update.transition.new == "alert" and name in update.transition.signals
    if statistic != "psi":
        assert added == 1  # an unseen category or an impossible value alerts at once


def test_state_machine_escalates_at_once_and_steps_down_one_level_after_hysteresis() -> None:
    state, streak = "ok", 0
    state, streak, why = step(state, streak, "alert", 3)
    assert (state, why) == ("alert", "escalated")
    seen = []
    for v in ["ok", "ok", "alert", "ok", "ok", "ok", "ok", "ok", "ok"]:
        state, streak, why = step(state, streak, v, 3)  # type: ignore[arg-type]
        seen.append((state, why))
    assert seen == [("alert", None), ("alert", None), ("alert", None),  # the alert restarts the count
                    ("alert", None), ("alert", None), ("warn", "stepped_down"),
                    ("warn", None), ("warn", None), ("ok", "stepped_down")]
    sig = DriftSignal("x", "warn", "ks", 0.5, 0.4, 0.6)
    assert verdict([sig, dataclasses.replace(sig, state="ok")]) == "warn" and verdict([]) == "ok"


def test_hysteresis_in_the_monitor(tmp_path: Path, profile: DriftProfile) -> None:
    m = _monitor(tmp_path, window=20, min_series=20, hysteresis_series=4)
    m.set_reference("ct", "1.0", profile)
    rng = np.random.default_rng(0)  # a seed whose clean series raise no false alarm
    _fill(m, 20, rng)
    acme = dataclasses.replace(SITE, manufacturers=(("ACME", 1.0),))
    assert m.add("ct", "1.0", acme.series(rng)).report.state == "alert"
    states = [m.add("ct", "1.0", SITE.series(rng)) for _ in range(30)]
    # the ACME series is in the window for 19 more series, then the verdict is clean
    assert all(u.report.state == "alert" for u in states[:19])
    assert all(not any(s.state != "ok" for s in u.report.signals) for u in states[19:])
    assert [u.report.state for u in states[19:28]] == ["alert"] * 3 + ["warn"] * 4 + ["ok"] * 2
    assert states[22].transition is not None and states[22].transition.reason == "stepped_down"
    assert states[26].transition is not None and (states[26].transition.old, states[26].transition.new) == ("warn", "ok")


def test_window_and_state_survive_a_restart(tmp_path: Path, profile: DriftProfile) -> None:
    m = _monitor(tmp_path)
    m.set_reference("ct", "1.0", profile)
    rng = np.random.default_rng(9)
    _fill(m, 55, rng)
    m.add("ct", "1.0", dataclasses.replace(SITE, manufacturers=(("ACME", 1.0),)).series(rng))
    before = m.report("ct")
    assert before is not None and before.state == "alert"
    m._store.conn.close()

    again = _monitor(tmp_path)
    assert again.set_reference("ct", "1.0", profile) is None  # same version and profile: kept
    after = again.report("ct")
    assert after == before
    assert again.add("ct", "1.0", SITE.series(rng)).report.series_in_window == 50

    reset = again.set_reference("ct", "2.0", SITE.profile(150, seed=8))  # a new version: fresh window
    assert reset is not None and (reset.old, reset.new, reset.reason) == ("alert", "ok", "reset")
    report = again.report("ct")
    assert report is not None and (report.state, report.series_in_window, report.version) == ("ok", 0, "2.0")


def test_quantization_agreement(tmp_path: Path, profile: DriftProfile) -> None:
    m = _monitor(tmp_path)
    m.set_reference("ct", "1.0", profile)
    rng = np.random.default_rng(4)
    _fill(m, 20, rng)
    for rate, state in ((0.97, "ok"), (0.93, "warn"), (0.85, "alert")):
        signals = m.add("ct", "1.0", SITE.series(rng), agreement=rate).report.signals
        sig = next(s for s in signals if s.name == "quantization.agreement")
        assert (sig.state, sig.value, sig.statistic) == (state, rate, "agreement")
    signals = m.add("ct", "1.0", SITE.series(rng)).report.signals  # None: the last rate still holds
    assert next(s for s in signals if s.name == "quantization.agreement").value == 0.85


# --- what is published ----------------------------------------------------------------------------


def test_k_anonymity_folds_rare_categories_and_uids() -> None:
    folded = fold_categories({"GE": 30, "SIEMENS": 12, "ACME": 3, "Tiny": 1,
                              "1.2.840.10008.1.2.1": 40, "1.2.3.4.5.6": 9}, k=5)
    assert folded == {"Explicit VR Little Endian": 40, "GE": 30, "SIEMENS": 12, "other": 13}
    v = np.arange(20.0)
    q = anonymous_quantiles(v, 5)
    assert q["p05"] == 4.0 and q["p95"] == 15.0 and q["p50"] == 9.5  # never the window's extremes
    assert anonymous_quantiles(v[:9], 5) == {}


def test_report_payload_is_aggregate_only(tmp_path: Path, profile: DriftProfile) -> None:
    m = _monitor(tmp_path)
    m.set_reference("ct", "1.0", profile)
    rng = np.random.default_rng(2)
    _fill(m, 47, rng)
    rare = dataclasses.replace(SITE, manufacturers=(("ACME", 1.0),),
                               transfer_syntaxes=(("1.2.826.0.1.3680043.2.1143.99", 1.0),))
    for _ in range(3):
        m.add("ct", "1.0", rare.series(rng))
    report = m.report("ct")
    assert report is not None
    doc = json.dumps(report.to_json())
    assert not UID_LIKE.search(doc), UID_LIKE.search(doc)
    assert "ACME" not in doc  # seen 3 times < k = 5
    signals = {s.name: s for s in report.signals}
    manufacturer = signals["metadata.manufacturer"].detail["counts"]
    assert isinstance(manufacturer, dict) and manufacturer["other"] >= 3 and sum(manufacturer.values()) == 50
    syntaxes = signals["metadata.transfer_syntax"].detail["counts"]
    assert isinstance(syntaxes, dict) and "Explicit VR Little Endian" in syntaxes
    hist = signals["input.intensity"].detail
    assert hist["series"] == 50 and isinstance(hist["counts"], list) and len(hist["counts"]) == 64
    for s in report.signals:  # detail keys are aggregates
        assert set(s.detail) <= {"series", "counts", "tests", "p05", "p50", "p95"}, s.detail.keys()


def test_profile_from_a_drift_json_file(tmp_path: Path) -> None:
    """A registry-less model's drift.json (DriftProfile JSON) is a reference like the manifest's."""
    path = tmp_path / "drift.json"
    series = SyntheticSite(task="segmentation").draw(60, np.random.default_rng(3))
    path.write_text(profile_from_series(series, SITE.edges(), "test").model_dump_json())
    m = _monitor(tmp_path)
    m.set_reference("seg", "1", DriftProfile.model_validate_json(path.read_text()))
    report = None
    for s in SyntheticSite(task="segmentation").draw(20, np.random.default_rng(4)):
        report = m.add("seg", "1", s).report
    assert report is not None and report.phase == "monitoring"
    assert {"output.label_fraction.liver", "output.label_fraction.spleen"} <= {s.name for s in report.signals}


def test_summaries_binned_on_other_edges_are_refused(tmp_path: Path, profile: DriftProfile) -> None:
    m = _monitor(tmp_path)
    m.set_reference("ct", "1.0", profile)
    bad = SeriesSummary(intensity_counts=(1, 2, 3), input_counts=())
    with pytest.raises(ValueError, match="bins"):
        m.add("ct", "1.0", bad)
