"""Survival metrics as thin wrappers over scikit-survival, with the checks its functions leave to callers.

Risk scores follow scikit-survival's convention: higher = worse (earlier event). Times in days.
"""

from __future__ import annotations

import numpy as np
from sksurv.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from store.errors import EvaluationError


def surv(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    """The structured (event, time) array scikit-survival expects, after checking the inputs."""
    times = np.asarray(times, dtype=float)
    events = np.asarray(events)
    if times.shape != events.shape or times.ndim != 1:
        raise EvaluationError(f"times {times.shape} and events {events.shape} must be 1-d and of equal length")
    if not np.isfinite(times).all():
        raise EvaluationError("survival times hold NaN or Inf: drop or fix those patients in the clinical table")
    if (times < 0).any():
        raise EvaluationError("survival times must be >= 0")
    return Surv.from_arrays(event=events.astype(bool), time=times)


def harrell_c(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    y = surv(times, events)
    if not y["event"].any():
        raise EvaluationError("Harrell's C needs at least one event; this set is all censored")
    return float(concordance_index_censored(y["event"], y["time"], np.asarray(risk, dtype=float))[0])


def uno_c(train: np.ndarray, test: np.ndarray, risk: np.ndarray, tau: float | None = None) -> float:
    """Uno's IPCW C, truncated at tau (default: the last test time inside the training follow-up)."""
    if tau is None:
        tau = follow_up_limit(train, test)
    return float(concordance_index_ipcw(train, test, np.asarray(risk, dtype=float), tau=tau)[0])


def follow_up_limit(train: np.ndarray, test: np.ndarray) -> float:
    """The largest time the censoring distribution of `train` can weight: below its last follow-up."""
    limit = min(train["time"].max(), test["time"].max())
    below = test["time"][test["time"] < limit]
    return float(below.max()) if len(below) else float(limit) * 0.999


def evaluation_times(train: np.ndarray, test: np.ndarray, quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)) -> np.ndarray:
    """Time points for AUC/Brier inside the test follow-up (scikit-survival requires that): event-time quantiles."""
    lo = test["time"].min()
    hi = follow_up_limit(train, test)
    event_times = test["time"][test["event"] & (test["time"] > lo) & (test["time"] < hi)]
    if len(event_times) == 0:
        raise EvaluationError("no event inside the test follow-up: time-dependent metrics are undefined for this fold")
    return np.unique(np.quantile(event_times, quantiles))


def time_dependent_auc(train: np.ndarray, test: np.ndarray, risk: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, float]:
    auc, mean_auc = cumulative_dynamic_auc(train, test, np.asarray(risk, dtype=float), times)
    return np.asarray(auc, dtype=float), float(mean_auc)


def brier_at(train: np.ndarray, test: np.ndarray, survival_prob: np.ndarray, time: float) -> float:
    """Brier score at one time; survival_prob[i] = predicted P(T_i > time)."""
    return float(brier_score(train, test, np.asarray(survival_prob, dtype=float), time)[1][0])


def integrated_brier(train: np.ndarray, test: np.ndarray, survival_probs: np.ndarray, times: np.ndarray) -> float:
    """IBS over `times`; survival_probs (n_test, n_times)."""
    return float(integrated_brier_score(train, test, np.asarray(survival_probs, dtype=float), times))


def bootstrap_ci(times: np.ndarray, events: np.ndarray, risk: np.ndarray, n: int = 200, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of Harrell's C over patients (resamples without an event are skipped)."""
    rng = np.random.default_rng(seed)
    times, events, risk = np.asarray(times), np.asarray(events, bool), np.asarray(risk, float)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(times), len(times))
        if events[idx].any():
            values.append(concordance_index_censored(events[idx], times[idx], risk[idx])[0])
    if not values:
        raise EvaluationError("no bootstrap resample held an event")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
