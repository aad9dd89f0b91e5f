"""Property test: the fold metrics give a number or null with a reason on awkward cohorts, never an
exception from scikit-survival (which raises "censoring survival function is zero", "time must be smaller
than largest observed time point", NoComparablePairException, or returns NaN on such data)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluate import survival_metrics as sm

METRICS = ("harrell_c", "uno_c", "mean_auc", "ibs")


@st.composite
def cohorts(draw):
    """(train, test, risk, survival_at, description) with the awkward cases the field's data has."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(20, 500))
    n_test = max(2, int(n * draw(st.floats(0.15, 0.5))))
    censoring = draw(st.sampled_from([0.0, 0.3, 0.6, 0.9, 0.95]))
    unit = draw(st.sampled_from([1.0, 1 / 30.4375]))  # days, or months as SurvPath gives them
    ties = draw(st.booleans())
    last = draw(st.sampled_from(["any", "censored", "event"]))  # the longest follow-up of the training fold
    events_wanted = draw(st.sampled_from(["many", "one", "none_in_test"]))
    past_follow_up = draw(st.booleans())  # test times beyond the training follow-up
    signal = rng.normal(size=n)
    times = rng.exponential(1000 * np.exp(-signal)) * unit
    if ties:
        times = np.round(times / (100 * unit)) * 100 * unit  # many equal times
    times = np.maximum(times, unit)
    events = rng.random(n) >= censoring
    if events_wanted == "one":
        events[:] = False
        events[rng.integers(n)] = True
    train_t, test_t = times[n_test:], times[:n_test].copy()
    train_e, test_e = events[n_test:].copy(), events[:n_test].copy()
    if events_wanted == "none_in_test":
        test_e[:] = False
    if last != "any":
        train_e[np.argmax(train_t)] = last == "event"
    if past_follow_up:
        test_t[: max(1, n_test // 3)] = train_t.max() * rng.uniform(1.0, 2.0, max(1, n_test // 3))
    risk = signal[:n_test] + rng.normal(0, 0.5, n_test)
    scale = 1000 * unit

    def survival_at(grid: np.ndarray) -> np.ndarray:
        return np.exp(-np.outer(np.exp(risk), grid) / scale)

    return (sm.surv(train_t, train_e), sm.surv(test_t, test_e), risk, survival_at,
            dict(n=n, censoring=censoring, ties=ties, last=last, events=events_wanted, past=past_follow_up))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cohorts())
def test_every_metric_is_a_number_or_null_with_a_reason(case):
    train, test, risk, survival_at, _ = case
    out = sm.fold_metrics(train, test, risk, survival_at, seed=0, n_bootstrap=30)
    for key in METRICS:
        value = out[key]
        if value is None:
            assert out["not_computed"].get(key), (key, out["not_computed"])
            continue
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        assert (0.0 <= value <= 1.0) if key != "ibs" else value >= 0.0, (key, value)
    if out["harrell_c"] is not None and out["harrell_c_ci95"] is not None:
        lo, hi = out["harrell_c_ci95"]
        assert 0 <= lo <= hi <= 1 and 0 <= out["bootstrap_skipped"] <= 30
    if out["ipcw_horizon"] is None:
        assert out["uno_c"] is None and out["mean_auc"] is None and out["ibs"] is None
        return
    tau = out["ipcw_horizon"]["tau"]
    if out["auc_times"] is not None:
        assert max(out["auc_times"]) < tau
    if out["ibs"] is not None:
        assert out["ibs_grid"]["to"] < tau and out["ibs_grid"]["points"] == sm.IBS_GRID_POINTS


def test_truncating_the_test_set_at_the_horizon_changes_no_metric_before_it():
    rng = np.random.default_rng(3)
    t = rng.exponential(500, 300)
    e = rng.random(300) < 0.6
    train, test = sm.surv(t[100:], e[100:]), sm.surv(t[:100], e[:100])
    tau, _ = sm.ipcw_horizon(train)
    risk = -t[:100] + rng.normal(0, 100, 100)
    times = np.quantile(test["time"][test["event"] & (test["time"] < tau)], [0.25, 0.5])
    inside = test["time"] < tau
    if not (test["time"][inside].max() > times.max()):
        times = times[:1]
    from sksurv.metrics import cumulative_dynamic_auc

    full, _ = cumulative_dynamic_auc(train, test[test["time"] < train["time"].max()], risk[test["time"] < train["time"].max()], times)
    cut = sm.censor_at(test, tau)
    cut_auc, _ = cumulative_dynamic_auc(train, cut[test["time"] < train["time"].max()], risk[test["time"] < train["time"].max()], times)
    np.testing.assert_allclose(cut_auc, full, rtol=1e-12)


def test_longest_follow_up_an_event_and_censored_both_give_numbers():
    rng = np.random.default_rng(0)
    for last_is_event in (True, False):
        t = rng.exponential(800, 150)
        e = rng.random(150) < 0.5
        e[np.argmax(t)] = last_is_event
        train, test = sm.surv(t[30:], e[30:]), sm.surv(t[:30], e[:30])
        risk = -t[:30]
        curves = lambda g, r=risk: np.exp(-np.outer(np.exp(r / 800), g) / 800)  # noqa: E731
        out = sm.fold_metrics(train, test, risk, curves, n_bootstrap=20)
        assert out["uno_c"] is not None and out["mean_auc"] is not None and out["ibs"] is not None, out["not_computed"]
        assert out["harrell_c"] > 0.9  # risk is the negated time: nearly perfect ordering
