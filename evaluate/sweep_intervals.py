"""Percentile bootstrap intervals of every metric of a sweep row, and paired differences between two rows.

A row keeps, per held-out fold, what its metrics need to be scored again on a resample of that fold's patients
(SurvivalFold: times, events, risks, and the training fold's IPCW weights, the fold's AUC times and each patient's
Brier losses over the fold's IBS grid; GradeFold: true and predicted grades and the class probabilities). A
resample draws each fold's held-out patients with replacement (folds in sorted order, one generator seeded
--seed, as evaluate.survival_metrics.fold_bootstrap draws them) and scores the mean over the folds that define
the metric, as the table's mean is: the interval is its 2.5 and 97.5 percentiles. The training folds are not
resampled (their censoring distribution, the AUC times and the IBS grid stay the fold's own). A resample that
leaves a metric undefined in one of those folds (e.g. no comparable pair) is skipped and counted, with the reason.

Two rows of one task are compared on the patients both hold out, one draw for both per resample and fold
(jointly): the same store given twice differs by exactly 0 [0, 0].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence, Union

import numpy as np

from evaluate import survival_metrics as sm
from evaluate.features import PatientData
from evaluate.grade import GradeResult, resampled_grade_metrics
from evaluate.survival import SurvivalResult

SURVIVAL_METRICS = ("harrell_c", "uno_c", "mean_auc", "ibs")
GRADE_METRICS = ("balanced_accuracy", "macro_f1", "qwk", "auc")
RESAMPLES = sm.BOOTSTRAP_RESAMPLES
LEVEL = 0.95

# Why a resample can leave a metric undefined though the fold's own patients define it.
WHY_SKIPPED = {
    "harrell_c": "a fold's resample held no comparable pair of patients",
    "uno_c": "a fold's resample held no comparable pair with IPCW weight before the fold's horizon",
    "mean_auc": "a fold's resample had no case or no control at one of the fold's AUC times",
    "qwk": "a fold's resample held one grade only, in both its truth and its predictions",
    "auc": "a fold's resample lacked one of the grades",
}


@dataclass(frozen=True)
class SurvivalFold:
    """One held-out fold of a survival row: per patient (in the row's prediction order) what its metrics need."""

    fold: int
    patient_ids: tuple[str, ...]
    defined: frozenset[str]  # the metrics the fold's own evaluation computed
    times: np.ndarray
    events: np.ndarray
    risk: np.ndarray
    truncated: np.ndarray | None = None  # the patients censored at the fold's IPCW horizon; None without one
    weights: np.ndarray | None = None  # 1/G at each truncated event (Uno's C, AUC)
    auc_times: np.ndarray | None = None
    losses: np.ndarray | None = None  # (patients, grid): IPCW Brier terms
    grid: np.ndarray | None = None

    def subset(self, index: Sequence[int]) -> SurvivalFold:
        pick = np.asarray(index, dtype=int)
        per_patient = {name: getattr(self, name)[pick] for name in ("times", "events", "risk", "truncated", "weights",
                                                                    "losses") if getattr(self, name) is not None}
        return replace(self, patient_ids=tuple(self.patient_ids[i] for i in pick), **per_patient)

    def resampled(self, counts: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        for key in keys:
            if key not in self.defined:
                continue
            if key == "harrell_c":
                out[key] = sm.resampled_harrell_c(counts, self.times, self.events, self.risk)
            elif key == "uno_c" and self.weights is not None:
                out[key] = sm.resampled_uno_c(counts, self.truncated, self.weights, self.risk)
            elif key == "mean_auc" and self.weights is not None and self.auc_times is not None:
                out[key] = sm.resampled_mean_auc(counts, self.truncated, self.weights, self.auc_times, self.risk)
            elif key == "ibs" and self.losses is not None:
                out[key] = sm.resampled_ibs(counts, self.losses, self.grid)
        return out


@dataclass(frozen=True)
class GradeFold:
    """One held-out fold of a grade row: true and predicted grades (class indices) and class probabilities."""

    fold: int
    patient_ids: tuple[str, ...]
    defined: frozenset[str]
    truth: np.ndarray
    predicted: np.ndarray
    proba: np.ndarray
    n_classes: int

    def subset(self, index: Sequence[int]) -> GradeFold:
        pick = np.asarray(index, dtype=int)
        return replace(self, patient_ids=tuple(self.patient_ids[i] for i in pick), truth=self.truth[pick],
                       predicted=self.predicted[pick], proba=self.proba[pick])

    def resampled(self, counts: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        values = resampled_grade_metrics(counts, self.truth, self.predicted, self.proba, self.n_classes)
        return {key: values[key] for key in keys if key in self.defined}


HeldOutFold = Union[SurvivalFold, GradeFold]


def survival_folds(result: SurvivalResult, data: PatientData, endpoint: str, folds: dict[str, int],
                   features: np.ndarray | None = None) -> list[HeldOutFold]:
    """Each fitted fold of a survival cross-validation, as the bootstrap needs it. The IBS terms need the fold's
    head again (its survival curves on the fold's grid): `features` as cross_validate was given them."""
    has, times, events = data.endpoint(endpoint)
    fold_of = np.array([folds.get(p, -1) for p in data.patient_ids])
    x_all = data.features if features is None else features
    position = {p: i for i, p in enumerate(data.patient_ids)}
    records = {m["fold"]: m for m in result.folds}
    out: list[HeldOutFold] = []
    for fold, head in sorted(result.models.items()):
        held = [p for p in result.predictions if p["fold"] == fold]
        index = np.array([position[p["patient_id"]] for p in held])
        test = sm.surv(np.array([p["time"] for p in held]), np.array([p["event"] for p in held]))
        in_train = has & (fold_of >= 0) & (fold_of != fold)  # cross_validate's training part of this fold
        train = sm.surv(times[in_train], events[in_train])
        record = records[fold]
        defined = frozenset(k for k in SURVIVAL_METRICS if record.get(k) is not None)
        ipcw: dict[str, Any] = {}
        if record.get("ipcw_horizon"):
            truncated = sm.censor_at(test, record["ipcw_horizon"]["tau"])
            weights, _ = sm.computed(lambda: sm.ipcw_weights(train, truncated))
            ipcw = {"truncated": truncated, "weights": weights}
            if record.get("auc_times") is not None:
                ipcw["auc_times"] = np.asarray(record["auc_times"], dtype=float)
            if "ibs" in defined:
                grid = sm.ibs_grid(truncated)
                ipcw["losses"], _ = sm.computed(
                    lambda: sm.brier_losses(train, truncated, head.survival(x_all[index], grid), grid))
                ipcw["grid"] = grid
        out.append(SurvivalFold(fold, tuple(p["patient_id"] for p in held), defined, test["time"], test["event"],
                                np.array([p["risk"] for p in held], dtype=float), **ipcw))
    return out


def grade_folds(result: GradeResult) -> list[HeldOutFold]:
    """Each fitted fold of a grade cross-validation, as the bootstrap needs it."""
    records = {m["fold"]: m for m in result.folds}
    classes = result.classes
    out: list[HeldOutFold] = []
    for fold in sorted(result.models):
        held = [p for p in result.predictions if p["fold"] == fold]
        defined = frozenset(k for k in GRADE_METRICS if records[fold].get(k) is not None)
        out.append(GradeFold(fold, tuple(p["patient_id"] for p in held), defined,
                             np.array([classes.index(p["true"]) for p in held]),
                             np.array([classes.index(p["predicted"]) for p in held]),
                             np.array([[p[f"p_{c}"] for c in classes] for p in held], dtype=float), len(classes)))
    return out


@dataclass
class Resampled:
    """One metric over the folds that define it for every row compared: the point (mean over those folds) and
    each resample's mean, per row."""

    points: np.ndarray  # (rows,)
    values: np.ndarray  # (rows, resamples); NaN where a fold's resample left the metric undefined
    folds: list[int]


def bootstrap(groups: Sequence[Sequence[HeldOutFold]], keys: Sequence[str], n: int = RESAMPLES,
              seed: int = 0) -> dict[str, Resampled]:
    """Every metric of `keys` for each row of each group (one fold, every row's version of it on the same
    patients in the same order), the patients drawn once per resample and fold for all rows. A fold counts for
    a metric when every row's fold defines it on these patients."""
    rng = np.random.default_rng(seed)
    points: dict[str, list[list[float]]] = {k: [] for k in keys}
    values: dict[str, list[list[np.ndarray]]] = {k: [] for k in keys}
    scored: dict[str, list[int]] = {k: [] for k in keys}
    for group in groups:
        size = len(group[0].patient_ids)
        counts = np.vstack([np.ones((1, size)), sm.resample_counts(rng, size, n)])  # row 0: the fold itself
        per_row = [fold.resampled(counts, keys) for fold in group]
        for key in keys:
            if all(key in r and np.isfinite(r[key][0]) for r in per_row):
                points[key].append([float(r[key][0]) for r in per_row])
                values[key].append([r[key][1:] for r in per_row])
                scored[key].append(group[0].fold)
    return {key: Resampled(np.mean(points[key], axis=0), np.mean(values[key], axis=0), scored[key])
            for key in keys if scored[key]}


def _interval(values: np.ndarray, key: str, n: int, seed: int, folds: list[int]) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {"folds": folds, "resamples": n, "skipped": int(n - len(finite)), "seed": seed}
    if out["skipped"]:
        out["skipped_because"] = WHY_SKIPPED.get(key, "the metric was undefined on those resamples")
    if not len(finite):
        return out | {"ci95": None, "not_computed": f"none of the {n} resamples could score it: "
                                                     f"{out['skipped_because']}"}
    return out | {"ci95": sm.percentile_interval(finite, LEVEL)}


def row_intervals(folds: Sequence[HeldOutFold], keys: Sequence[str], n: int = RESAMPLES,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """{metric: {ci95, folds, resamples, skipped[, skipped_because]}}, or {ci95: None, not_computed: why}."""
    resampled = bootstrap([(f,) for f in folds], keys, n, seed)
    out = {}
    for key in keys:
        if key not in resampled:
            out[key] = {"ci95": None, "not_computed": "no held-out fold defines it (not_computed says why, per fold)"}
            continue
        r = resampled[key]
        out[key] = _interval(r.values[0], key, n, seed, r.folds)
    return out


def aligned(reference: Sequence[HeldOutFold], other: Sequence[HeldOutFold]) -> list[tuple[HeldOutFold, HeldOutFold]]:
    """Per fold both rows scored, both rows' versions of it on the patients both hold out, in the reference's
    order."""
    theirs = {f.fold: f for f in other}
    pairs = []
    for mine in reference:
        match = theirs.get(mine.fold)
        if match is None:
            continue
        where = {p: i for i, p in enumerate(match.patient_ids)}
        shared = [i for i, p in enumerate(mine.patient_ids) if p in where]
        if shared:
            pairs.append((mine.subset(shared), match.subset([where[mine.patient_ids[i]] for i in shared])))
    return pairs


def paired_difference(row: Sequence[HeldOutFold], reference: Sequence[HeldOutFold], keys: Sequence[str],
                      n: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """{metric: {difference (row - reference), ci95, patients, folds, resamples, skipped}} on the patients both
    rows hold out, resampled jointly; a metric they cannot share is {difference: None, ci95: None, not_computed}."""
    pairs = aligned(reference, row)
    patients = sum(len(ref.patient_ids) for ref, _ in pairs)
    if not pairs:
        return {key: {"difference": None, "ci95": None, "patients": 0,
                      "not_computed": "no patient is held out by both this row and the reference row"} for key in keys}
    resampled = bootstrap(pairs, keys, n, seed)
    out = {}
    for key in keys:
        if key not in resampled:
            out[key] = {"difference": None, "ci95": None, "patients": patients,
                        "not_computed": "no held-out fold defines it for both this row and the reference row"}
            continue
        r = resampled[key]
        out[key] = {"difference": float(r.points[1] - r.points[0]), "patients": patients,
                    **_interval(r.values[1] - r.values[0], key, n, seed, r.folds)}
    return out
