"""Our metric wrappers against scikit-survival's documented values and an independent pair count."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.datasets import load_gbsg2, load_veterans_lung_cancer, load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.preprocessing import OneHotEncoder

from evaluate import survival_metrics as sm
from slidecache.errors import EvaluationError


def brute_force_harrell(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C by counting every comparable pair, written from the definition: i and j are comparable
    when i had the event first, or at the same time as j's censoring (the censored one outlived i);
    tied risks count one half."""
    ti, tj = times[:, None], times[None, :]
    comparable = events[:, None] & ((ti < tj) | ((ti == tj) & ~events[None, :]))
    np.fill_diagonal(comparable, False)
    ri, rj = risk[:, None], risk[None, :]
    concordant = (comparable & (ri > rj)).sum()
    tied = (comparable & (ri == rj)).sum()
    return float((concordant + 0.5 * tied) / comparable.sum())


def _encoded(loader):
    x, y = loader()
    for column in x.columns:
        if str(x[column].dtype) == "category":
            x[column] = x[column].astype(str)
    return OneHotEncoder().fit_transform(x.astype({c: "category" for c in x.columns if x[c].dtype == object})), y


def test_documented_gbsg2_brier_and_ibs():
    x, y = load_gbsg2()
    x["tgrade"] = x["tgrade"].astype(str).map(len).astype(int)
    xt = OneHotEncoder().fit_transform(x)
    est = CoxPHSurvivalAnalysis(ties="efron").fit(xt, y)
    survs = est.predict_survival_function(xt)
    train = sm.surv(y["time"], y["cens"])
    assert sm.brier_at(train, train, [fn(1825) for fn in survs], 1825) == pytest.approx(0.2088, abs=1e-4)
    times = np.arange(365, 1826)
    probs = np.asarray([fn(times) for fn in survs])  # a StepFunction takes an array
    assert sm.integrated_brier(train, train, probs, times) == pytest.approx(0.1816, abs=1e-4)


@pytest.mark.parametrize("loader, event, time", [
    (load_whas500, "fstat", "lenfol"), (load_gbsg2, "cens", "time"), (load_veterans_lung_cancer, "Status", "Survival_in_days"),
])
def test_harrell_matches_a_pair_count(loader, event, time):
    x, y = _encoded(loader)
    risk = CoxPHSurvivalAnalysis(alpha=0.1).fit(x, y).predict(x)
    risk = np.round(risk, 1)  # force tied risks too
    times, events = np.asarray(y[time], float), np.asarray(y[event], bool)
    assert len(np.unique(times)) < len(times)  # the data really has tied times
    ours = sm.harrell_c(times, events, risk)
    assert ours == pytest.approx(brute_force_harrell(times, events, risk), abs=1e-9)


def test_bad_inputs():
    with pytest.raises(EvaluationError, match="NaN"):
        sm.surv(np.array([1.0, np.nan]), np.array([True, False]))
    with pytest.raises(EvaluationError, match="all censored"):
        sm.harrell_c(np.array([1.0, 2.0]), np.array([False, False]), np.array([0.1, 0.2]))
    with pytest.raises(EvaluationError, match=">= 0"):
        sm.surv(np.array([-1.0]), np.array([True]))
