"""Survival metrics as thin wrappers over scikit-survival, with the checks its functions leave to callers.

Risk scores follow scikit-survival's convention: higher = worse (earlier event). Times in days.

The IPCW metrics (Uno's C, time-dependent AUC, Brier score) weight test patients by the training fold's
censoring distribution G. scikit-survival raises when G is zero at a test event ("censoring survival
function is zero", e.g. when the training fold's longest follow-up is censored) or when a test time lies
past the training follow-up ("time must be smaller than largest observed time point"). So each fold has an
IPCW horizon tau: the first time G reaches zero, else the end of the training follow-up. The test fold is
administratively censored at tau (an event at or after tau becomes "followed up to tau, no event"), which
leaves every metric at times before tau unchanged, and every time point is chosen below tau. A metric
that still cannot be computed for a fold is None with its reason in `not_computed`, never an exception.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv

from slidecache.errors import EvaluationError

IBS_GRID_POINTS = 50
BOOTSTRAP_RESAMPLES = 200
AUC_QUANTILES = (0.25, 0.5, 0.75)

SurvivalAt = Callable[[np.ndarray], np.ndarray]  # times (k,) → P(T_i > t) for each test patient, (n_test, k)


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


class NotComputed(EvaluationError):
    """A metric that is undefined for this fold; the message is the reason recorded beside the null."""


T = TypeVar("T")
# What scikit-survival and scikit-learn raise on inputs they refuse, e.g. "Input estimate contains infinity"
# after a head's fit overflowed on a small fold: for one fold's metric, a reason, not a crash.
LIBRARY_REFUSALS = (ValueError, ArithmeticError, np.linalg.LinAlgError)


def computed(compute: Callable[[], T]) -> tuple[T, None] | tuple[None, str]:
    """(value, None), or (None, reason) when the metric is undefined on these data (NotComputed), the
    library refused them, or the value is a NaN or infinite float: a null with its reason, never a crash
    or a NaN in the output."""
    try:
        value = compute()
    except NotComputed as e:
        return None, str(e)
    except LIBRARY_REFUSALS as e:
        return None, f"{type(e).__name__}: {e}"
    if isinstance(value, float) and not np.isfinite(value):
        return None, f"undefined on these patients (the computation gave {value})"
    return value, None


def has_comparable_pair(times: np.ndarray, events: np.ndarray) -> bool:
    """Harrell's C needs an event strictly before some other patient's time."""
    events = np.asarray(events, bool)
    return bool(events.any() and (times[events].min() < times.max()))


def harrell_c(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    y = surv(times, events)
    if not y["event"].any():
        raise NotComputed("Harrell's C needs at least one event; this set is all censored")
    if not has_comparable_pair(y["time"], y["event"]):
        raise NotComputed("no comparable pair of patients (no event before another patient's last follow-up)")
    value = float(concordance_index_censored(y["event"], y["time"], np.asarray(risk, dtype=float))[0])
    if not np.isfinite(value):
        raise NotComputed("Harrell's C is undefined for this set")
    return value


def ipcw_horizon(train: np.ndarray) -> tuple[float, str]:
    """(tau, why): IPCW metrics are defined at times below tau for this training fold."""
    if not train["event"].any():
        raise NotComputed("the training fold has no event, so no censoring distribution to weight by")
    cens = CensoringDistributionEstimator().fit(train)
    times, prob = cens.unique_time_, cens.prob_
    zero = np.flatnonzero(prob <= 0)
    end = float(times[-1])
    if len(zero) and float(times[zero[0]]) < end:
        return float(times[zero[0]]), "the training fold's censoring distribution reaches zero there"
    if len(zero):
        return end, "the training fold's censoring distribution reaches zero at its last follow-up"
    return end, "the training fold's follow-up ends there"


def censor_at(test: np.ndarray, tau: float) -> np.ndarray:
    """The test set administratively censored at tau: what happens at or after tau is unseen."""
    times = np.minimum(test["time"], tau)
    events = test["event"] & (test["time"] < tau)
    return Surv.from_arrays(event=events, time=times)


def uno_c(train: np.ndarray, test: np.ndarray, risk: np.ndarray, tau: float) -> float:
    """Uno's IPCW C truncated at tau (test already censored at tau)."""
    if not has_comparable_pair(test["time"], test["event"]):
        raise NotComputed(f"no comparable pair of test patients before the IPCW horizon {tau:g}")
    try:
        value = float(concordance_index_ipcw(train, test, np.asarray(risk, dtype=float), tau=tau)[0])
    except NoComparablePairException as e:
        raise NotComputed(f"no comparable pair of test patients before the IPCW horizon {tau:g}") from e
    if not np.isfinite(value):  # every comparable pair had weight 0
        raise NotComputed(f"every comparable pair has zero IPCW weight before the horizon {tau:g}")
    return value


def auc_times(test: np.ndarray, quantiles: tuple[float, ...] = AUC_QUANTILES) -> np.ndarray:
    """Event-time quantiles strictly inside the (censored-at-tau) test follow-up, as scikit-survival requires."""
    lo, hi = test["time"].min(), test["time"].max()
    event_times = test["time"][test["event"] & (test["time"] >= lo) & (test["time"] < hi)]
    if len(event_times) == 0:
        raise NotComputed("no test event before the last test follow-up and the IPCW horizon: time-dependent AUC "
                          "is undefined for this fold")
    return np.unique(np.quantile(event_times, quantiles))


def time_dependent_auc(train: np.ndarray, test: np.ndarray, risk: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, float]:
    auc, mean_auc = cumulative_dynamic_auc(train, test, np.asarray(risk, dtype=float), times)
    auc = np.asarray(auc, dtype=float)
    if not np.isfinite(auc).all() or not np.isfinite(mean_auc):
        raise NotComputed("time-dependent AUC is undefined at these times (no case or no control)")
    return auc, float(mean_auc)


def ibs_grid(test: np.ndarray, points: int = IBS_GRID_POINTS) -> np.ndarray:
    """Evenly spaced times over the (censored-at-tau) test fold's follow-up: [first time, last time)."""
    if not test["event"].any():
        raise NotComputed("no test event before the IPCW horizon: the Brier score needs one")
    lo, hi = float(test["time"].min()), float(test["time"].max())
    if not hi > lo:
        raise NotComputed("the test fold's follow-up is a single time point: no interval to integrate over")
    return np.linspace(lo, hi, points, endpoint=False)


def brier_at(train: np.ndarray, test: np.ndarray, survival_prob: np.ndarray, time: float) -> float:
    """Brier score at one time; survival_prob[i] = predicted P(T_i > time)."""
    return float(brier_score(train, test, np.asarray(survival_prob, dtype=float), time)[1][0])


def integrated_brier(train: np.ndarray, test: np.ndarray, survival_probs: np.ndarray, times: np.ndarray) -> float:
    """IBS over `times`; survival_probs (n_test, n_times)."""
    survival_probs = np.asarray(survival_probs, dtype=float)
    if not np.isfinite(survival_probs).all():
        raise NotComputed("the head's predicted survival is not finite at these times (its fit overflowed on this "
                          "training fold, e.g. a nearly separable Cox model on few patients)")
    value = float(integrated_brier_score(train, test, survival_probs, times))
    if not np.isfinite(value):
        raise NotComputed("the integrated Brier score is undefined on this grid")
    return value


def _harrell_pairs(times: np.ndarray, events: np.ndarray, risk: np.ndarray,
                   tied_tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Harrell's pairs as scikit-survival's concordance_index_censored defines them: (comparable, score),
    each (n, n) over (i, j). i and j are comparable when i has an event and j is followed longer, or as
    long without an event; the score is 1 when i's risk is higher, 0.5 when tied within tied_tol."""
    comparable = events[:, None] & ((times[None, :] > times[:, None])
                                    | ((times[None, :] == times[:, None]) & ~events[None, :]))
    difference = risk[:, None] - risk[None, :]
    score = np.where(np.abs(difference) <= tied_tol, 0.5, (difference > 0).astype(float))
    return comparable.astype(float), comparable * score


def resample_counts(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """(n, size): how often each patient is drawn in each of n resamples of `size` patients with replacement."""
    draws = rng.integers(0, size, (n, size))  # the same stream as n draws of `size` one after another
    counts = np.zeros((n, size))
    np.add.at(counts, (np.arange(n)[:, None], draws), 1.0)
    return counts


def _resampled_c(counts: np.ndarray, times: np.ndarray, events: np.ndarray,
                 *risks: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Harrell's C of each resample for each risk vector (NaN where not kept), and which resamples were kept.

    A resample drawing patient i c_i times has Harrell's C = Σ c_i c_j score_ij / Σ c_i c_j comparable_ij
    (copies of one patient share a time, so they are never a comparable pair): every resample from one
    matrix product instead of one scikit-survival call each (200 calls per fold were half of a head's
    cross-validation time). tests/evaluate/test_bootstrap_ci.py checks it against concordance_index_censored
    on the resampled patients. Kept: the resample has a comparable pair (has_comparable_pair)."""
    values, denominator = [], None
    for risk in risks:
        comparable, score = _harrell_pairs(times, events, risk)
        numerator = np.einsum("bi,ij,bj->b", counts, score, counts)
        if denominator is None:  # comparability depends on times and events only: the same for every risk
            denominator = np.einsum("bi,ij,bj->b", counts, comparable, counts)
        values.append(numerator)
    drawn = counts > 0
    first_event = np.where(drawn & events, times, np.inf).min(axis=1)
    kept = (first_event < np.where(drawn, times, -np.inf).max(axis=1)) & (denominator > 0)
    safe = np.where(kept, denominator, 1.0)
    return [np.where(kept, v / safe, np.nan) for v in values], kept


def percentile_interval(values: np.ndarray, level: float) -> list[float]:
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def bootstrap_ci(times: np.ndarray, events: np.ndarray, risk: np.ndarray, n: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, int]:
    """Percentile bootstrap CI of Harrell's C over patients, and how many resamples were skipped because
    they held no comparable pair."""
    times, events, risk = np.asarray(times, float), np.asarray(events, bool), np.asarray(risk, float)
    counts = resample_counts(np.random.default_rng(seed), len(times), n)
    (c,), kept = _resampled_c(counts, times, events, risk)
    values = c[kept]
    if not len(values):
        raise NotComputed(f"none of the {n} bootstrap resamples held a comparable pair of patients")
    low, high = percentile_interval(values, level)
    return low, high, n - len(values)


def fold_bootstrap(times: np.ndarray, events: np.ndarray, folds: np.ndarray, risks: Sequence[np.ndarray],
                   n: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Harrell's C as the mean over the held-out folds, for several risk vectors of the same patients: the
    point estimates (k,), the same mean on each of n bootstrap resamples (k, n), and the folds scored.

    Each fold's patients are resampled once for all risk vectors (jointly: one draw, every risk), folds in
    sorted order from one generator seeded `seed`. A fold without a comparable pair is left out (as in the
    C-index table); a resample is NaN when a scored fold's draw held no comparable pair."""
    times, events, folds = np.asarray(times, float), np.asarray(events, bool), np.asarray(folds)
    risks = [np.asarray(r, float) for r in risks]
    rng = np.random.default_rng(seed)
    points, resampled, scored = [], [], []
    for fold in sorted(set(folds.tolist())):
        test = folds == fold
        if not has_comparable_pair(times[test], events[test]):
            continue
        scored.append(fold)
        points.append([harrell_c(times[test], events[test], r[test]) for r in risks])
        counts = resample_counts(rng, int(test.sum()), n)
        values, _ = _resampled_c(counts, times[test], events[test], *(r[test] for r in risks))
        resampled.append(values)
    if not scored:
        raise NotComputed("no held-out fold has a comparable pair of patients")
    return np.mean(points, axis=0), np.mean(resampled, axis=0), scored


def c_index_ci(times: np.ndarray, events: np.ndarray, folds: np.ndarray, risk: np.ndarray,
               n: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """The mean-over-folds Harrell's C of held-out predictions with its percentile bootstrap interval."""
    point, resampled, scored = fold_bootstrap(times, events, folds, [risk], n, seed)
    values = resampled[0][np.isfinite(resampled[0])]
    if not len(values):
        raise NotComputed(f"none of the {n} bootstrap resamples held a comparable pair in every fold")
    return {"harrell_c": float(point[0]), "ci95": percentile_interval(values, level), "folds": scored, "resamples": n,
            "skipped": int(n - len(values)), "seed": seed}


def paired_c_difference(times: np.ndarray, events: np.ndarray, folds: np.ndarray, risk_a: np.ndarray,
                        risk_b: np.ndarray, n: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                        level: float = 0.95) -> dict[str, Any]:
    """C_b − C_a on the same held-out patients (mean over folds), its interval from resampling patients
    jointly for both: the same store given twice gives exactly 0 and [0, 0]."""
    point, resampled, scored = fold_bootstrap(times, events, folds, [risk_a, risk_b], n, seed)
    delta = resampled[1] - resampled[0]
    values = delta[np.isfinite(delta)]
    if not len(values):
        raise NotComputed(f"none of the {n} joint bootstrap resamples held a comparable pair in every fold")
    return {"difference": float(point[1] - point[0]), "ci95": percentile_interval(values, level), "folds": scored,
            "resamples": n, "skipped": int(n - len(values)), "seed": seed}


def fold_metrics(train: np.ndarray, test: np.ndarray, risk: np.ndarray, survival_at: SurvivalAt | None,
                 seed: int = 0, n_bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Every metric of one fold; an undefined one is None with its reason in `not_computed`.

    `survival_at(times)` gives the held-out patients' predicted survival at those times (None: the head
    has no survival curves, so no Brier score)."""
    risk = np.asarray(risk, dtype=float)
    out: dict[str, Any] = {"n_test": int(len(test)), "events_test": int(test["event"].sum())}
    reasons: dict[str, str] = {}

    def attempt(keys: tuple[str, ...], compute: Callable[[], Any], reason_key: str | None = None) -> None:
        values, why = computed(compute)
        if why is not None:
            out.update({k: None for k in keys})
            reasons[reason_key or keys[0]] = why
            return
        out.update(zip(keys, values if len(keys) > 1 else (values,)))

    attempt(("harrell_c",), lambda: harrell_c(test["time"], test["event"], risk))
    if out["harrell_c"] is not None:
        def ci() -> tuple[list[float], int]:
            lo, hi, skipped = bootstrap_ci(test["time"], test["event"], risk, n_bootstrap, seed)
            return [lo, hi], skipped
        attempt(("harrell_c_ci95", "bootstrap_skipped"), ci)
    try:
        tau, why = ipcw_horizon(train)
    except NotComputed as e:
        out["ipcw_horizon"] = None
        for key in ("uno_c", "auc_times", "auc", "mean_auc", "ibs"):
            out[key] = None
        reasons.update({"uno_c": str(e), "mean_auc": str(e), "ibs": str(e)})
        out["not_computed"] = reasons
        return out
    truncated = censor_at(test, tau)
    out["ipcw_horizon"] = {"tau": tau, "why": why, "test_events_at_or_after": int((test["event"] & (test["time"] >= tau)).sum())}
    attempt(("uno_c",), lambda: uno_c(train, truncated, risk, tau))

    def auc() -> tuple[list[float], list[float], float]:
        times = auc_times(truncated)
        values, mean = time_dependent_auc(train, truncated, risk, times)
        return times.tolist(), values.tolist(), mean
    attempt(("auc_times", "auc", "mean_auc"), auc, "mean_auc")
    if survival_at is None:
        out["ibs"] = None
        reasons["ibs"] = "this head gives no survival curves"
    else:
        def ibs() -> tuple[float, dict[str, Any]]:
            grid = ibs_grid(truncated)
            value = integrated_brier(train, truncated, survival_at(grid), grid)
            return value, {"points": len(grid), "from": float(grid[0]), "to": float(grid[-1]),
                           "spacing": "even, over the test fold's follow-up below the IPCW horizon"}
        attempt(("ibs", "ibs_grid"), ibs)
    out["not_computed"] = reasons
    return out


def summarise(folds: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Mean ± std over the folds where each metric was computed; a metric computed in no fold is None with
    the folds' reasons (never a NaN mean)."""
    summary: dict[str, Any] = {}
    for key in keys:
        values = [m[key] for m in folds if m.get(key) is not None]
        missing = {str(m.get("fold", i)): m.get("not_computed", {}).get(key, "not computed")
                   for i, m in enumerate(folds) if m.get(key) is None}
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "folds": len(values)}
            if missing:
                summary[key]["not_computed_in_folds"] = missing
        else:
            summary[key] = {"mean": None, "std": None, "folds": 0, "not_computed_in_folds": missing}
    return summary


# Every survival metric on bootstrap resamples of one held-out fold (the sweep's intervals): a resample is a row of
# `counts` (how often each test patient is drawn), and each metric is a weighted sum over patients or pairs, so all
# resamples come from a few matrix products. The training fold is not resampled: its censoring distribution G, the
# IPCW horizon, the AUC time points and the IBS grid stay those of the fold's own point estimate.
# tests/evaluate/test_sweep_intervals.py checks each against scikit-survival on the resampled patients.


def ipcw_weights(train: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    """1/G(T_i) at each (censored-at-tau) test event, 0 for the censored: Uno's C weighs pairs by its square,
    the time-dependent AUC its cases by it (as scikit-survival's predict_ipcw)."""
    return CensoringDistributionEstimator().fit(train).predict_ipcw(truncated)


def brier_losses(train: np.ndarray, truncated: np.ndarray, survival_probs: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(n_test, n_times): each test patient's IPCW-weighted squared error at each grid time, as scikit-survival's
    brier_score adds them up: the fold's Brier score at a time is their mean over patients."""
    cens = CensoringDistributionEstimator().fit(train)
    at_t = cens.predict_proba(grid)
    at_y = cens.predict_proba(truncated["time"])
    at_t[at_t == 0], at_y[at_y == 0] = np.inf, np.inf
    time, event = truncated["time"][:, None], truncated["event"][:, None]
    probs = np.asarray(survival_probs, dtype=float)
    return probs ** 2 * ((time <= grid) & event) / at_y[:, None] + (1 - probs) ** 2 * (time > grid) / at_t


def _pair_sums(counts: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Σ_ij c_i c_j pairs_ij for each resample (row of counts): one matrix product."""
    return ((counts @ pairs) * counts).sum(axis=1)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def resampled_harrell_c(counts: np.ndarray, times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """Harrell's C of each resample (NaN without a comparable pair): _resampled_c for one risk vector."""
    (c,), _ = _resampled_c(counts, np.asarray(times, float), np.asarray(events, bool), np.asarray(risk, float))
    return c


def resampled_uno_c(counts: np.ndarray, truncated: np.ndarray, weights: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """Uno's C of each resample: Harrell's pairs, each weighted by its earlier patient's squared IPCW weight
    (NaN where no comparable pair has weight)."""
    comparable, score = _harrell_pairs(truncated["time"], truncated["event"], np.asarray(risk, float))
    w = np.square(weights)[:, None]
    return _ratio(_pair_sums(counts, w * score), _pair_sums(counts, w * comparable))


def _resampled_km(counts: np.ndarray, times: np.ndarray, events: np.ndarray, at: np.ndarray) -> np.ndarray:
    """(n, len(at)): the Kaplan-Meier survival of each resample at `at`."""
    unique = np.unique(times)
    at_risk = counts @ (times[:, None] >= unique).astype(float)
    died = counts @ ((times[:, None] == unique) & events[:, None]).astype(float)
    factor = np.where(at_risk > 0, 1 - died / np.where(at_risk > 0, at_risk, 1.0), 1.0)
    survival = np.cumprod(factor, axis=1)
    index = np.searchsorted(unique, at, side="right") - 1
    return np.where(index >= 0, survival[:, np.maximum(index, 0)], 1.0)


def resampled_mean_auc(counts: np.ndarray, truncated: np.ndarray, weights: np.ndarray, times: np.ndarray,
                       risk: np.ndarray) -> np.ndarray:
    """scikit-survival's mean cumulative/dynamic AUC of each resample at the fold's fixed `times`: each time's
    AUC is the IPCW-weighted share of (case, control) pairs the risk orders right (ties count half), the mean
    weighs them by the resample's Kaplan-Meier drop; NaN where a time has no case or no control."""
    t, e = truncated["time"], truncated["event"]
    _, score = _harrell_pairs(t, e, np.asarray(risk, float))  # score[i, j]: risk_i above risk_j (ties 0.5)
    aucs = []
    for time in times:
        case, control = weights * ((t <= time) & e), (t > time).astype(float)
        numerator = (((counts * case) @ score) * (counts * control)).sum(axis=1)
        aucs.append(_ratio(numerator, (counts @ case) * (counts @ control)))
    auc = np.stack(aucs, axis=1)
    if len(times) == 1:
        return auc[:, 0]
    survival = _resampled_km(counts, t, e, np.asarray(times, float))
    drop = -np.diff(np.concatenate([np.ones((len(counts), 1)), survival], axis=1), axis=1)
    span = 1.0 - survival[:, -1]
    return np.where(span > 0, (auc * drop).sum(axis=1) / np.where(span > 0, span, 1.0), np.nan)


def resampled_ibs(counts: np.ndarray, losses: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The integrated Brier score of each resample over the fold's fixed grid (trapezoids, as scikit-survival)."""
    brier = (counts @ losses) / counts.sum(axis=1, keepdims=True)
    area = ((brier[:, 1:] + brier[:, :-1]) / 2 * np.diff(grid)).sum(axis=1)
    return area / (grid[-1] - grid[0])
