"""Survival heads on cached slide vectors, cross-validated over patient folds.

Heads (scikit-survival): `coxnet` (elastic net, alpha chosen by inner cross-validation on the training
fold and passed explicitly at prediction), `coxph` and `rsf` (on PCA components fitted inside the
training fold: 2560 raw dimensions would make CoxPH singular); and attention-MIL heads on the tiles, NETWORK-cox
and NETWORK-nll for each network of slidecache/heads/networks.py (`abmil-cox`, `transmil-nll`, `clam-sb-cox`,
`dsmil-nll`, ...; see evaluate/abmil.py), whose input is one bag of tiles per patient. Per fold
(evaluate/survival_metrics.py): Harrell's C with a bootstrap 95% CI over the held-out patients, Uno's C,
time-dependent AUC at event-time quartiles and the integrated Brier score over an even grid of the test
follow-up, the IPCW ones below the training fold's censoring horizon; and low/high-risk groups split at
the *training* fold's median risk. A metric a fold cannot define is null with its reason, and so is every
metric of a fold whose head cannot be fitted (or overflows) there: the other folds still count. Across folds:
mean ± std, and a Kaplan-Meier plot of the pooled held-out risk groups with the log-rank p.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from joblib import Parallel, delayed
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.compare import compare_survival
from sksurv.ensemble import RandomSurvivalForest
from sksurv.exceptions import NoComparablePairException
from sksurv.linear_model import CoxnetSurvivalAnalysis, CoxPHSurvivalAnalysis
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import concordance_index_censored
from sksurv.nonparametric import kaplan_meier_estimator

from evaluate import survival_metrics as sm
from evaluate.abmil_settings import TrainSettings
from evaluate.features import PatientData
from slidecache.errors import EvaluationError, SlidecacheError
from slidecache.heads.networks import ARCHITECTURES

if TYPE_CHECKING:  # torch is imported only by the MIL heads, when they run
    from slidecache.heads.mil import MILModel

PCA_COMPONENTS = 16
SUMMARY_METRICS = ("harrell_c", "uno_c", "mean_auc", "ibs")
COXNET_L1_RATIO = 0.5


@dataclass
class FittedHead:
    """A fitted model with the two things we ask of it: risk (higher = worse) and survival curves."""

    model: Any
    predict_kwargs: dict[str, Any] = field(default_factory=dict)
    describe: dict[str, Any] = field(default_factory=dict)

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(x, **self.predict_kwargs), dtype=float)

    def survival(self, x: np.ndarray, times: np.ndarray) -> np.ndarray:
        return _evaluate_curves(self.model.predict_survival_function(x, **self.predict_kwargs), times)


def _evaluate_curves(functions: Any, times: np.ndarray) -> np.ndarray:
    """(n, k) survival of scikit-survival step functions at `times`, held constant outside each function's
    domain (before the first and after the last training time), where scikit-survival would raise."""
    return np.asarray([fn(np.clip(times, *fn.domain)) for fn in functions], dtype=float).reshape(len(functions), -1)


MIN_TRAIN_PATIENTS, MIN_TRAIN_EVENTS = 10, 3  # below this a 3-fold inner CV leaves folds without a comparable pair


def fit_coxnet(x: np.ndarray, y: np.ndarray, seed: int, settings: TrainSettings | None = None) -> FittedHead:
    """Elastic-net Cox; alpha chosen by 3-fold inner CV over the regularisation path (one path fit per
    inner fold, every alpha scored on its held-out part: 20x fewer fits than a grid search)."""
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    # The path on the whole training fold gives both the alphas to search and the final model.
    final = CoxnetSurvivalAnalysis(l1_ratio=COXNET_L1_RATIO, alpha_min_ratio=0.05, n_alphas=20,
                                   fit_baseline_model=True).fit(xs, y)
    alphas = final.alphas_
    scores = np.zeros(len(alphas))
    for inner_train, inner_val in KFold(n_splits=3, shuffle=True, random_state=seed).split(xs):
        if not sm.has_comparable_pair(y["time"][inner_val], y["event"][inner_val]):
            continue  # this inner fold cannot score any alpha
        path = CoxnetSurvivalAnalysis(l1_ratio=COXNET_L1_RATIO, alphas=alphas).fit(xs[inner_train], y[inner_train])
        for k, alpha in enumerate(alphas):
            risk = path.predict(xs[inner_val], alpha=alpha)
            scores[k] += concordance_index_censored(y["event"][inner_val], y["time"][inner_val], risk)[0]
    alpha = float(alphas[int(np.argmax(scores))])
    model = make_pipeline(scaler, final)
    # Coxnet predicts with its least-regularised alpha unless told: always pass the chosen one.
    coef = final.coef_[:, int(np.argmax(scores))]
    return FittedHead(model, {"alpha": alpha}, {"alpha": alpha, "nonzero_coefficients": int(np.count_nonzero(coef))})


def _pca(n_samples: int, n_features: int) -> PCA:
    return PCA(n_components=max(1, min(PCA_COMPONENTS, n_samples - 2, n_features)), random_state=0)


def fit_coxph(x: np.ndarray, y: np.ndarray, seed: int, settings: TrainSettings | None = None) -> FittedHead:
    model = Pipeline([("scale", StandardScaler()), ("pca", _pca(*x.shape)),
                      ("cox", CoxPHSurvivalAnalysis(alpha=1e-2, ties="efron"))]).fit(x, y)
    return FittedHead(model, {}, {"pca_components": int(model.named_steps["pca"].n_components_)})


def fit_rsf(x: np.ndarray, y: np.ndarray, seed: int, settings: TrainSettings | None = None) -> FittedHead:
    model = Pipeline([("scale", StandardScaler()), ("pca", _pca(*x.shape)),
                      ("rsf", RandomSurvivalForest(n_estimators=200, min_samples_leaf=5, max_features="sqrt",
                                                   random_state=seed, n_jobs=1))]).fit(x, y)  # folds run in parallel
    return FittedHead(model, {}, {"pca_components": int(model.named_steps["pca"].n_components_), "trees": 200})


class MILHead(FittedHead):
    """A MIL network; Cox heads get survival curves from a Breslow baseline on the training risks."""

    def __init__(self, model: MILModel, baseline: BreslowEstimator | None) -> None:
        super().__init__(model, {}, model.describe)
        self.baseline = baseline

    def risk(self, x: np.ndarray) -> np.ndarray:
        return self.model.risk(list(x))

    def survival(self, x: np.ndarray, times: np.ndarray) -> np.ndarray:
        if self.baseline is None:
            return self.model.bin_survival(list(x), times)
        return _evaluate_curves(self.baseline.get_survival_function(self.risk(x)), times)


ABMILHead = MILHead  # its name before the other networks came


def fit_mil(architecture: str, loss: str, x: np.ndarray, y: np.ndarray, seed: int,
            settings: TrainSettings | None = None) -> FittedHead:
    from evaluate.abmil import train_mil

    model = train_mil(list(x), loss, seed, settings, time=y["time"].astype(np.float64), event=y["event"],
                      architecture=architecture)
    baseline = None
    if loss == "cox":
        baseline = BreslowEstimator().fit(model.risk(list(x)), y["event"], y["time"])
    return MILHead(model, baseline)


def fit_abmil_cox(x: np.ndarray, y: np.ndarray, seed: int, settings: TrainSettings | None = None) -> FittedHead:
    return fit_mil("abmil", "cox", x, y, seed, settings)


def fit_abmil_nll(x: np.ndarray, y: np.ndarray, seed: int, settings: TrainSettings | None = None) -> FittedHead:
    return fit_mil("abmil", "nll", x, y, seed, settings)


# NETWORK-cox (Cox partial likelihood) and NETWORK-nll (discrete-time NLL) for every MIL network.
MIL_HEADS = {f"{network}-{loss}": (network, loss) for network in ARCHITECTURES for loss in ("cox", "nll")}
HEADS: dict[str, Callable[[np.ndarray, np.ndarray, int, TrainSettings | None], FittedHead]] = {
    "coxnet": fit_coxnet, "coxph": fit_coxph, "rsf": fit_rsf,
    **{name: partial(fit_mil, architecture, loss) for name, (architecture, loss) in MIL_HEADS.items()},
}
BAG_HEADS = set(MIL_HEADS)  # input: an object array of tile bags (evaluate.abmil.load_bags)


def _fold_metrics(head: FittedHead, risk_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, risk_te: np.ndarray,
                  y_te: np.ndarray, seed: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    threshold = float(np.median(risk_tr))  # the training fold's median: no peeking at test risks
    metrics = sm.fold_metrics(y_tr, y_te, risk_te, lambda times: head.survival(x_te, times), seed)
    metrics["head"] = head.describe
    return metrics, risk_te, risk_te > threshold


def _run_fold(head: str, x: np.ndarray, y: np.ndarray, test: np.ndarray, seed: int, settings: TrainSettings | None
              ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, FittedHead | None]:
    """The fold's metrics, held-out risks, risk groups and fitted head; a head that cannot be fitted here (or
    whose risks overflow) gives a fold of nulls with the reason, and no predictions: the other folds count."""
    where = f"({int((~test).sum())} training, {int(test.sum())} held-out patients in this fold)"
    try:
        fitted = HEADS[head](x[~test], y[~test], seed, settings)
        risk_tr, risk_te = fitted.risk(x[~test]), fitted.risk(x[test])
    except NoComparablePairException:  # e.g. in coxnet's inner CV on a handful of training patients
        why = (f"the {head} head: a C-index had no comparable pair of patients {where}: too few patients or events "
               "per fold; use fewer folds or more patients")
    except EvaluationError as e:  # a problem of this fold's data, e.g. a MIL head diverging or too few events for bins
        why = f"the {head} head could not be fitted {where}: {e}"
    except SlidecacheError:  # a setting (e.g. an unusable --device): no fold can do better
        raise
    except (ArithmeticError, np.linalg.LinAlgError, ValueError) as e:  # the fit itself failed on these data
        why = f"the {head} head could not be fitted {where}: {type(e).__name__}: {e}"
    else:
        if np.isfinite(risk_tr).all() and np.isfinite(risk_te).all():
            return (*_fold_metrics(fitted, risk_tr, y[~test], x[test], risk_te, y[test], seed), fitted)
        why = (f"the {head} head's risk is not finite {where}: its fit diverged; use fewer folds or more "
               "patients")
    failed = {"n_test": int(test.sum()), "events_test": int(y["event"][test].sum()), "fit_failed": why,
              **{key: None for key in SUMMARY_METRICS}, "not_computed": {key: why for key in SUMMARY_METRICS}}
    return failed, np.empty(0), np.empty(0, dtype=bool), None


@dataclass
class SurvivalResult:
    head: str
    endpoint: str
    folds: list[dict[str, Any]]
    summary: dict[str, Any]
    predictions: list[dict[str, Any]]  # patient, fold, time, event, risk, high_risk
    logrank_p: float | None
    models: dict[int, FittedHead] = field(default_factory=dict)  # fold → the head that did not see it


def refit_on_all(data: PatientData, endpoint: str, head: str, seed: int = 0, features: np.ndarray | None = None,
                 settings: TrainSettings | None = None) -> tuple[FittedHead, np.ndarray]:
    """`head` fitted once on every patient with `endpoint` (to save and apply to new slides); and its inputs."""
    has, times, events = data.endpoint(endpoint)
    x = (data.features if features is None else features)[has]
    y = sm.surv(times[has], events[has])
    if len(y) < MIN_TRAIN_PATIENTS or y["event"].sum() < MIN_TRAIN_EVENTS:
        raise EvaluationError(f"{len(y)} patients with {int(y['event'].sum())} {endpoint} events: too few to fit a head")
    return HEADS[head](x, y, seed, settings), x


def cross_validate(data: PatientData, endpoint: str, head: str, folds: dict[str, int], seed: int = 0,
                   features: np.ndarray | None = None, settings: TrainSettings | None = None) -> SurvivalResult:
    """Fit `head` on each training fold, score it on the held-out fold. `features` overrides data.features;
    the MIL heads need it: one bag of tiles per patient (evaluate.abmil.load_bags)."""
    if head not in HEADS:
        raise EvaluationError(f"unknown survival head {head!r}; choose one of {', '.join(HEADS)}")
    if head in BAG_HEADS and (features is None or features.dtype != object):
        raise EvaluationError(f"the {head} head trains on tiles: pass one bag per patient (evaluate.abmil.load_bags)")
    has, times, events = data.endpoint(endpoint)
    if not has.any():
        raise EvaluationError(f"no patient of the {len(data)} joined has endpoint {endpoint}")
    x_all = data.features if features is None else features
    fold_of = np.array([folds.get(pid, -1) for pid in data.patient_ids])
    keep = has & (fold_of >= 0)
    ids = [p for p, k in zip(data.patient_ids, keep) if k]
    x, f = x_all[keep], fold_of[keep]
    y = sm.surv(times[keep], events[keep])
    if not y["event"].any():
        raise EvaluationError(f"all {len(y)} patients are censored for {endpoint}: nothing to learn or score")
    fold_ids = sorted(set(f.tolist()))
    if len(fold_ids) < 2:
        raise EvaluationError(f"the split puts all {len(y)} patients with {endpoint} in one fold: nothing to hold out")
    for fold in fold_ids:  # check every fold before spending time on any
        test, train = f == fold, f != fold
        if not y["event"][train].any():
            raise EvaluationError(f"the training part of fold {fold} has no {endpoint} event")
        if train.sum() < MIN_TRAIN_PATIENTS or y["event"][train].sum() < MIN_TRAIN_EVENTS:
            raise EvaluationError(f"the training part of fold {fold} has {int(train.sum())} patients and "
                                  f"{int(y['event'][train].sum())} {endpoint} events: a head needs at least "
                                  f"{MIN_TRAIN_PATIENTS} and {MIN_TRAIN_EVENTS} (its own inner CV splits them "
                                  "again); use fewer folds or more patients")
    scorable = [fold for fold in fold_ids if sm.has_comparable_pair(y["time"][f == fold], y["event"][f == fold])]
    if not scorable:  # a fold without one is scored null with its reason; with none, nothing could be scored
        raise EvaluationError(f"no held-out fold has a comparable pair of patients for {endpoint} (an event before "
                              "another patient's last follow-up): no C-index is defined; use fewer folds, a split "
                              "stratified by event (`python -m evaluate split`), or more patients")
    # Folds are independent and each is seeded: fit them in parallel, one per core. Bag heads run one fold
    # at a time (torch uses every core, and shipping the bags to workers would copy gigabytes).
    jobs = 1 if head in BAG_HEADS else min(len(fold_ids), os.cpu_count() or 1)
    outcomes = Parallel(n_jobs=jobs)(delayed(_run_fold)(head, x, y, f == fold, seed, settings) for fold in fold_ids)
    if all(fitted is None for *_, fitted in outcomes):
        raise EvaluationError(f"no fold of {len(fold_ids)} could fit and score the {head} head; fold {fold_ids[0]}: "
                              f"{outcomes[0][0]['fit_failed']}")
    results, predictions, models = [], [], {}
    for fold, (metrics, risk, high, fitted) in zip(fold_ids, outcomes):
        test = f == fold
        metrics["fold"] = fold
        results.append(metrics)
        if fitted is None:  # its fold is nulls with the reason; its patients have no held-out prediction
            continue
        models[fold] = fitted
        for i, r, h in zip(np.flatnonzero(test), risk, high):
            predictions.append({"patient_id": ids[i], "fold": fold, "time": float(y["time"][i]),
                                "event": bool(y["event"][i]), "risk": float(r), "high_risk": bool(h)})
    summary = sm.summarise(results, SUMMARY_METRICS)
    groups = np.array([p["high_risk"] for p in predictions])
    logrank_p = None
    if 0 < groups.sum() < len(groups):
        y_pred = sm.surv(np.array([p["time"] for p in predictions]), np.array([p["event"] for p in predictions]))
        p_value = float(compare_survival(y_pred, groups)[1])
        logrank_p = p_value if np.isfinite(p_value) else None
    return SurvivalResult(head, endpoint, results, summary, predictions, logrank_p, models)


_STAGE = re.compile(r"(?:stage\s*)?(IV|III|II|I|0)", re.IGNORECASE)
_STAGE_VALUE = {"0": 0, "I": 1, "II": 2, "III": 3, "IV": 4}


def clinical_covariates(data: PatientData) -> tuple[np.ndarray, np.ndarray]:
    """(mask, X) of age and ordinal stage (I-IV) for the patients that have both."""
    rows, mask = [], []
    for c in data.clinical:
        m = _STAGE.match(c.stage.strip()) if c.stage else None
        ok = c.age is not None and m is not None
        mask.append(ok)
        rows.append([c.age or 0.0, _STAGE_VALUE[m.group(1).upper()] if m else 0.0])
    return np.array(mask), np.array(rows, dtype=float)


def km_plot(result: SurvivalResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for label, high, colour in (("low risk", False, "#2a7ab0"), ("high risk", True, "#c0392b")):
        group = [p for p in result.predictions if p["high_risk"] == high]
        if not group:
            continue
        t, s = kaplan_meier_estimator(np.array([p["event"] for p in group]), np.array([p["time"] for p in group]))
        ax.step(t, s, where="post", color=colour, label=f"{label} (n={len(group)})")
    p = f"log-rank p = {result.logrank_p:.2g}" if result.logrank_p is not None else "one group only"
    ax.set_title(f"{result.endpoint}, {result.head}, held-out patients: {p}", fontsize=9)
    ax.set_xlabel("days")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
