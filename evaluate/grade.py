"""Grade heads from the cache over patient folds: logistic regression on the stored slide vectors
(`logreg`), or an attention-MIL classifier on tile bags (`abmil`, `transmil`, `clam-sb`, `dsmil`: the networks of
slidecache/heads/networks.py, trained by evaluate/abmil.py).

Grades come from the clinical table (G1-G4, or BLCA's High/Low Grade as its own scheme; GX and
"[Not Available]" are missing). One scheme per evaluation: mixing G1-G4 with High/Low would make the
classes meaningless, so the majority scheme is kept and the rest reported as dropped.
Metrics: accuracy, balanced accuracy, macro-F1, quadratic weighted kappa (grades are ordered),
one-vs-rest macro AUC, and the pooled held-out confusion matrix. A metric a fold cannot define (QWK when
the fold's patients and predictions are all one grade, AUC without every grade) is null with its reason;
the summary averages the folds that define it, as for survival (evaluate.survival_metrics.summarise).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from evaluate.abmil import TrainSettings, train_mil
from evaluate.features import PatientData
from evaluate.survival_metrics import NotComputed, computed, summarise
from slidecache.errors import EvaluationError
from slidecache.heads.networks import ARCHITECTURES

GRADE_ORDER = {"G1-G4": ["G1", "G2", "G3", "G4"], "high-low": ["Low Grade", "High Grade"]}


@dataclass
class GradeResult:
    scheme: str
    classes: list[str]
    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]  # metric → mean/std/folds (None with not_computed_in_folds); "chance"
    confusion: list[list[int]]  # pooled over held-out folds; rows = true, columns = predicted
    predictions: list[dict[str, Any]]
    dropped: dict[str, int]
    head: str = "logreg"
    models: dict[int, Any] = field(default_factory=dict)  # fold → the model that did not see it


def grade_labels(data: PatientData) -> tuple[np.ndarray, list[str], str, dict[str, int]]:
    """(mask of usable patients, class names in order, scheme, dropped counts)."""
    schemes = Counter(c.grade_scheme for c in data.clinical if c.grade)
    if not schemes:
        raise EvaluationError("no patient has a usable grade (GX and '[Not Available]' count as missing)")
    scheme = schemes.most_common(1)[0][0]
    present = {c.grade for c in data.clinical if c.grade_scheme == scheme}
    classes = [g for g in GRADE_ORDER[scheme] if g in present]
    if len(classes) < 2:
        raise EvaluationError(f"only one grade ({classes}) among the patients: nothing to classify")
    mask = np.array([c.grade_scheme == scheme and c.grade in classes for c in data.clinical])
    dropped = {"missing grade": sum(c.grade is None for c in data.clinical),
               "other scheme": sum(bool(c.grade) and c.grade_scheme != scheme for c in data.clinical)}
    return mask, classes, scheme, {k: v for k, v in dropped.items() if v}


GRADE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "auc")


def _qwk(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    if len(np.union1d(y, pred)) < 2:  # chance agreement is total: kappa is 0/0
        raise NotComputed("QWK is undefined on this fold: its patients are all one grade and so are the "
                          "predictions (nothing to tell from chance agreement)")
    with warnings.catch_warnings():  # an undefined kappa is reported with its reason, not a warning and NaN
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(n_classes))))


def _auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    present = np.unique(y)
    if len(present) < 2:
        raise NotComputed("AUC is undefined on this fold: its patients are all one grade")
    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    if len(present) < n_classes:
        raise NotComputed(f"one-vs-rest macro AUC needs every grade on this fold; it has {len(present)} of {n_classes}")
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def _metrics(y: np.ndarray, pred: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Every metric of one fold; an undefined one is None with its reason in `not_computed`."""
    labels = list(range(n_classes))
    compute = {
        "accuracy": lambda: float(accuracy_score(y, pred)),
        "balanced_accuracy": lambda: float(balanced_accuracy_score(y, pred)),
        "macro_f1": lambda: float(f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        "qwk": lambda: _qwk(y, pred, n_classes),
        "auc": lambda: _auc(y, proba, n_classes),
    }
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for key, metric in compute.items():
        out[key], why = computed(metric)
        if why is not None:
            reasons[key] = why
    return out | {"not_computed": reasons}


GRADE_HEADS = ("logreg", *ARCHITECTURES)
BAG_GRADE_HEADS = ARCHITECTURES  # input: an object array of tile bags (evaluate.abmil.load_bags)


def _fit_predict_proba(head: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                       seed: int, c: float, settings: TrainSettings | None) -> tuple[np.ndarray, Any]:
    if head in BAG_GRADE_HEADS:
        model = train_mil(list(x_train), "ce", seed, settings, labels=y_train, n_classes=n_classes, architecture=head)
        return model.probabilities(list(x_test)), model
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced",
                                                               random_state=seed)).fit(x_train, y_train)
    proba = np.zeros((len(x_test), n_classes))
    proba[:, model.classes_] = model.predict_proba(x_test)  # classes absent from training get 0
    return proba, model


def refit_grade_on_all(data: PatientData, seed: int = 0, c: float = 0.1, head: str = "logreg",
                       features: np.ndarray | None = None, settings: TrainSettings | None = None
                       ) -> tuple[Any, np.ndarray, list[str], str]:
    """The grade head fitted once on every graded patient (to save and apply to new slides): model, inputs,
    classes, scheme."""
    mask, classes, scheme, _ = grade_labels(data)
    x = (data.features if features is None else features)[mask]
    y = np.array([classes.index(cl.grade) for cl, k in zip(data.clinical, mask) if k])
    if len(np.unique(y)) < 2:
        raise EvaluationError("every graded patient has the same grade: nothing to fit")
    _, model = _fit_predict_proba(head, x, y, x[:1], len(classes), seed, c, settings)
    return model, x, classes, scheme


def cross_validate_grade(data: PatientData, folds: dict[str, int], seed: int = 0, c: float = 0.1, head: str = "logreg",
                         features: np.ndarray | None = None, settings: TrainSettings | None = None) -> GradeResult:
    """`features` overrides data.features; the MIL heads need one tile bag per patient (abmil.load_bags)."""
    if head not in GRADE_HEADS:
        raise EvaluationError(f"unknown grade head {head!r}; choose one of {', '.join(GRADE_HEADS)}")
    if head in BAG_GRADE_HEADS and (features is None or features.dtype != object):
        raise EvaluationError(f"the {head} grade head trains on tiles: pass one bag per patient "
                              "(evaluate.abmil.load_bags)")
    mask, classes, scheme, dropped = grade_labels(data)
    fold_of = np.array([folds.get(p, -1) for p in data.patient_ids])
    keep = mask & (fold_of >= 0)
    x, f = (data.features if features is None else features)[keep], fold_of[keep]
    ids = [p for p, k in zip(data.patient_ids, keep) if k]
    y = np.array([classes.index(cl.grade) for cl, k in zip(data.clinical, keep) if k])
    results, predictions = [], []
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    models = {}
    for fold in sorted(set(f.tolist())):
        test, train = f == fold, f != fold
        if len(np.unique(y[train])) < 2:  # this fold cannot be fitted; the others still can (as survival does)
            held = f"one grade only ({classes[int(y[train][0])]})" if train.any() else "no patient"
            why = (f"the training part of fold {fold} holds {held}: nothing to fit; use fewer folds or a split "
                   "that spreads the grades")
            results.append({"fold": fold, "n_test": int(test.sum()), "fit_failed": why,
                            **{key: None for key in GRADE_METRICS}, "not_computed": {key: why for key in GRADE_METRICS}})
            continue
        proba, models[fold] = _fit_predict_proba(head, x[train], y[train], x[test], len(classes), seed, c, settings)
        pred = proba.argmax(axis=1)
        results.append({"fold": fold, "n_test": int(test.sum()), **_metrics(y[test], pred, proba, len(classes))})
        confusion += confusion_matrix(y[test], pred, labels=list(range(len(classes))))
        for i, p, pr in zip(np.flatnonzero(test), pred, proba):
            predictions.append({"patient_id": ids[i], "fold": fold, "true": classes[y[i]], "predicted": classes[p],
                                **{f"p_{cl}": float(v) for cl, v in zip(classes, pr)}})
    if not models:
        raise EvaluationError(f"no fold of {len(results)} could fit the grade head; {results[0]['fit_failed']}")
    summary: dict[str, Any] = summarise(results, GRADE_METRICS)  # over the folds that define each; else null
    chance = {"majority_class_accuracy": float(np.bincount(y).max() / len(y)), "balanced_accuracy": 1 / len(classes)}
    summary["chance"] = chance  # what "clearly beats chance" is measured against
    return GradeResult(scheme, classes, results, summary, confusion.tolist(), predictions, dropped, head, models)


def confusion_plot(result: GradeResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(result.confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(result.classes) + 2, 1.2 * len(result.classes) + 1.5), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(result.classes)), result.classes)
    ax.set_yticks(range(len(result.classes)), result.classes)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    qwk = result.summary.get("qwk", {}).get("mean")
    ax.set_title(f"grade, held-out patients (QWK {qwk:.2f})" if qwk is not None else "grade, held-out patients", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _resampled_binary_auc(counts: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample: the share of (positive, negative) pairs scored in order, ties half (NaN without
    both)."""
    pairs = (score[:, None] > score[None, :]) + 0.5 * (score[:, None] == score[None, :])
    pos, neg = positive.astype(float), (~positive).astype(float)
    numerator = (((counts * pos) @ pairs) * (counts * neg)).sum(axis=1)
    return _safe_ratio(numerator, (counts @ pos) * (counts @ neg))


def resampled_grade_metrics(counts: np.ndarray, y: np.ndarray, pred: np.ndarray, proba: np.ndarray,
                            n_classes: int) -> dict[str, np.ndarray]:
    """Balanced accuracy, macro-F1, QWK and AUC (as _metrics defines them) of each bootstrap resample of one
    held-out fold, `counts` (n_resamples, n_patients) saying how often each patient is drawn: all from the
    resamples' weighted confusion matrices and pair counts. NaN where the resample leaves the metric undefined
    (QWK: truth and predictions all one grade; AUC: a grade missing)."""
    classes = np.arange(n_classes)
    truth, called = (y[:, None] == classes).astype(float), (pred[:, None] == classes).astype(float)
    confusion = np.einsum("bi,ik,il->bkl", counts, truth, called)  # rows true, columns predicted
    rows, columns, hits = confusion.sum(axis=2), confusion.sum(axis=1), np.diagonal(confusion, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(rows > 0, hits / np.where(rows > 0, rows, 1.0), np.nan)
        balanced = np.nanmean(recall, axis=1)  # over the grades the resample holds, as scikit-learn
    f1 = np.nan_to_num(_safe_ratio(2 * hits, rows + columns))  # 2TP / (2TP + FP + FN); 0 when undefined
    weights = (classes[:, None] - classes[None, :]) ** 2.0
    total = confusion.sum(axis=(1, 2))
    expected = rows[:, :, None] * columns[:, None, :] / total[:, None, None]
    disagreement = np.einsum("kl,bkl->b", weights, expected)
    qwk = 1 - _safe_ratio(np.einsum("kl,bkl->b", weights, confusion), disagreement)
    if n_classes == 2:
        auc = _resampled_binary_auc(counts, y == 1, proba[:, 1])
    else:
        per_class = np.stack([_resampled_binary_auc(counts, y == k, proba[:, k]) for k in classes], axis=1)
        auc = np.where((rows > 0).all(axis=1), per_class.mean(axis=1), np.nan)
    return {"balanced_accuracy": balanced, "macro_f1": f1.mean(axis=1), "qwk": qwk, "auc": auc}
