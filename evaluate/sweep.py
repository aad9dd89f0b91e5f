"""Many heads × poolings × endpoints from one store or several (one per encoder), one table: the
re-fitting users do dozens of times.

Slide vectors are read once per store and pooling, tile bags once per store; every (store, task, head,
pooling) uses the same patients and the same folds for its task, so rows of one task compare heads and
encoders directly, and the difference of two encoders' C-index comes with a paired bootstrap interval. A
slide-embedding set of a store (`set:NAME`) is one more source of slide vectors beside the poolings: its rows use
the slide-vector heads, and each survival one is compared with the same head on the first pooling. Every metric of
every row has a bootstrap interval over its held-out patients (evaluate/sweep_intervals.py), and its difference to
a reference row of its task (evaluate/sweep_reference.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from evaluate import survival_metrics as sm
from evaluate.abmil import TrainSettings, load_bags
from evaluate.features import PatientData, patient_features
from evaluate.grade import BAG_GRADE_HEADS, GRADE_HEADS, cross_validate_grade
from evaluate.survival import BAG_HEADS, HEADS, cross_validate
from evaluate.sweep_intervals import RESAMPLES, HeldOutFold, grade_folds, row_intervals, survival_folds
from slidecache.cohorts.clinical import ENDPOINTS, ClinicalTable
from slidecache.errors import EvaluationError, SlidecacheError
from store.embedding_store import EmbeddingStore

SURVIVAL_COLUMNS = ("harrell_c", "uno_c", "mean_auc", "ibs")
GRADE_COLUMNS = ("balanced_accuracy", "macro_f1", "qwk", "auc")


@dataclass
class SweepRow:
    task: str
    head: str
    pooling: str  # "tiles" for heads that read the tile bags
    patients: int
    metrics: dict[str, dict[str, float]]
    seconds: float
    error: str | None = None
    encoder: str = ""  # the store's label when several stores are swept
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)  # held-out risks, or grades
    held_out: list[HeldOutFold] = field(default_factory=list, repr=False)  # what the bootstrap scores again
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric → its bootstrap 95% interval
    difference: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric → row − reference, interval
    is_reference: bool = False  # the row every other row of its task is compared with
    bootstrap_seconds: float = 0.0  # of `seconds`, spent on the intervals

    @property
    def name(self) -> str:
        """encoder/task/head/pooling (no encoder part for one store): how --reference and the HTML name a row."""
        return "/".join(p for p in (self.encoder, self.task, self.head, self.pooling) if p)

    def ci95(self, metric: str) -> list[float] | None:
        return (self.intervals.get(metric) or {}).get("ci95")

    def as_dict(self, reasons: bool = False) -> dict[str, Any]:
        """The row's flat columns (sweep.csv): per metric its mean, std, 95% interval, and difference to the
        reference row with its interval; with `reasons`, also the intervals' and differences' records (resamples,
        skipped, why) and why a metric is null or left out of a fold ({metric: {fold: reason}}), for sweep.json."""
        row = {"encoder": self.encoder, "task": self.task, "head": self.head, "pooling": self.pooling,
               "reference": self.is_reference, "patients": self.patients, "seconds": round(self.seconds, 2),
               "error": self.error}
        for k, v in self.metrics.items():
            ci = self.ci95(k) or [None, None]
            delta = self.difference.get(k) or {}
            delta_ci = delta.get("ci95") or [None, None]
            row |= {f"{k}_mean": v["mean"], f"{k}_std": v["std"], f"{k}_ci95_low": ci[0], f"{k}_ci95_high": ci[1]}
            if self.difference:
                row |= {f"{k}_diff": delta.get("difference"), f"{k}_diff_ci95_low": delta_ci[0],
                        f"{k}_diff_ci95_high": delta_ci[1]}
        if not reasons:
            return row
        missing = {k: v["not_computed_in_folds"] for k, v in self.metrics.items() if v.get("not_computed_in_folds")}
        row |= {"intervals": self.intervals, "difference_to_reference": self.difference}
        return (row | {"not_computed": missing}) if missing else row


def _check_names(tasks: Sequence[str], survival_heads: Sequence[str], grade_heads: Sequence[str]) -> None:
    for task in tasks:
        if task != "grade" and task not in ENDPOINTS:
            raise EvaluationError(f"unknown task {task!r}: an endpoint ({', '.join(ENDPOINTS)}) or grade")
    unknown = [h for h in survival_heads if h not in HEADS] + [h for h in grade_heads if h not in GRADE_HEADS]
    if unknown:
        raise EvaluationError(f"unknown heads {unknown}: survival heads are {', '.join(HEADS)}; "
                              f"grade heads are {', '.join(GRADE_HEADS)}")


def shared_patients(by_store: Mapping[str, PatientData]) -> tuple[list[str], dict[str, int]]:
    """The patients every store holds (so encoders are compared on the same people), and how many each
    store's own join had beyond them."""
    common = set.intersection(*(set(d.patient_ids) for d in by_store.values()))
    if not common:
        raise EvaluationError("the stores share no patient joined with the clinical table: "
                              + "; ".join(f"{label}: {len(d)} patients, e.g. {d.patient_ids[:2]}" for label, d in by_store.items()))
    return sorted(common), {label: len(d) - len(common) for label, d in by_store.items()}


def run_sweep(store: EmbeddingStore, clinical: ClinicalTable, tasks: Sequence[str], survival_heads: Sequence[str],
              grade_heads: Sequence[str], poolings: Sequence[str], folds_for: Callable[[str, PatientData], dict[str, int]],
              seed: int = 0, settings: TrainSettings | None = None, max_tiles: int = 512,
              progress: Callable[[SweepRow], None] | None = None) -> list[SweepRow]:
    """Fit every applicable (task, head, pooling) on one store; a failing combination is a row with its
    error, not a crash."""
    return run_sweeps({"": store}, clinical, tasks, survival_heads, grade_heads, poolings, folds_for, seed,
                      settings, max_tiles, progress)[0]


def sweep_plan(labels: Sequence[str], tasks: Sequence[str], survival_heads: Sequence[str], grade_heads: Sequence[str],
               poolings: Sequence[str], sets: Mapping[str, Mapping[str, Any]] | None = None
               ) -> list[tuple[str, str, str, str]]:
    """The sweep's rows, in order, as (store label, task, head, pooling): known before anything is fitted."""
    plan = []
    for label in labels:
        for task in tasks:
            for head in (survival_heads if task != "grade" else grade_heads):
                tile_head = head in BAG_HEADS or head in BAG_GRADE_HEADS
                for pooling in (["tiles"] if tile_head else [*poolings, *(sets or {}).get(label, {})]):
                    plan.append((label, task, head, pooling))
    return plan


def run_sweeps(stores: Mapping[str, EmbeddingStore], clinical: ClinicalTable, tasks: Sequence[str],
               survival_heads: Sequence[str], grade_heads: Sequence[str], poolings: Sequence[str],
               folds_for: Callable[[str, PatientData], dict[str, int]], seed: int = 0,
               settings: TrainSettings | None = None, max_tiles: int = 512,
               progress: Callable[[SweepRow], None] | None = None,
               sets: Mapping[str, Mapping[str, PatientData | str]] | None = None, resamples: int = RESAMPLES
               ) -> tuple[list[SweepRow], dict[str, int]]:
    """Every (store, task, head, pooling) on the same patients and the same folds per task (made once, from
    the first store's patients): rows of one task compare encoders directly. Also returns how many patients
    each store had that the others lack (left out). `sets`: per store label, more slide vectors beside the
    poolings ({"set:titan": the set's PatientData, or why this store has none}); the sweep keeps only the
    patients every one of them has (the set's own coverage says who it lacks). Each fitted row's metrics get
    their bootstrap intervals (`resamples` per fold, seed `seed`)."""
    _check_names(tasks, survival_heads, grade_heads)
    sets = sets or {}
    features = {label: {p: patient_features(store, clinical, p) for p in poolings} for label, store in stores.items()}
    common, dropped = shared_patients({label: f[poolings[0]] for label, f in features.items()})
    extra = {label: {name: d for name, d in sets.get(label, {}).items() if isinstance(d, PatientData)}
             for label in stores}
    for by_set in extra.values():
        for data in by_set.values():
            common = sorted(set(common) & set(data.patient_ids))
    if not common:
        raise EvaluationError("no patient has slide vectors in every slide-embedding set and pooling of the sweep: "
                              "make the sets' missing slides (`python -m extract slide-embeddings`), or sweep the "
                              "sets apart")
    for label, by_pooling in features.items():
        by_pooling.update(extra[label])
        for pooling, data in by_pooling.items():
            by_pooling[pooling] = data.subset(np.isin(data.patient_ids, common))
    first = next(iter(features.values()))[poolings[0]]
    folds = {task: folds_for(task, first) for task in tasks}
    # An endpoint whose columns the table lacks: its rows say which columns, not "no patient has endpoint".
    absent = {task: clinical.absent_endpoint(task) for task in tasks if task != "grade"}
    bags: dict[str, Any] = {}  # store label → its tile bags, read once, at its first MIL row
    rows: list[SweepRow] = []
    for label, task, head, pooling in sweep_plan(list(stores), tasks, survival_heads, grade_heads, poolings, sets):
        by_pooling = features[label]
        reference = by_pooling[poolings[0]]
        tile_head = head in BAG_HEADS or head in BAG_GRADE_HEADS
        data = reference if tile_head else by_pooling.get(pooling)
        if absent.get(task):
            row = SweepRow(task, head, pooling, 0, {}, 0.0, absent[task], label)
        elif data is None:  # a set this store does not hold: the row says why
            row = SweepRow(task, head, pooling, 0, {}, 0.0, str(sets[label][pooling]), label)
        else:
            if tile_head and label not in bags:
                bags[label] = load_bags(stores[label], reference.slides, max_tiles, seed)
            row = _fit(label, task, head, pooling, data, folds[task], seed, bags.get(label) if tile_head else None,
                       settings, resamples)
        rows.append(row)
        if progress:
            progress(row)
    return rows, dropped


def _fit(label: str, task: str, head: str, pooling: str, data: PatientData, folds: dict[str, int], seed: int,
         bags: Any, settings: TrainSettings | None, resamples: int = RESAMPLES) -> SweepRow:
    started = time.perf_counter()
    try:
        if task == "grade":
            g = cross_validate_grade(data, folds, seed, head=head, features=bags, settings=settings)
            metrics = {k: v for k, v in g.summary.items() if k in GRADE_COLUMNS}
            n, predictions = len(g.predictions), g.predictions
            fitted = time.perf_counter()
            held_out = grade_folds(g)
        else:
            s = cross_validate(data, task, head, folds, seed, bags, settings)
            metrics = {k: v for k, v in s.summary.items() if k in SURVIVAL_COLUMNS}
            n, predictions = len(s.predictions), s.predictions
            fitted = time.perf_counter()
            held_out = survival_folds(s, data, task, folds, bags)
        intervals = row_intervals(held_out, list(metrics), resamples, seed)
    except EvaluationError as e:
        return SweepRow(task, head, pooling, 0, {}, time.perf_counter() - started, str(e), label)
    except SlidecacheError:  # a setting no other row could use either (e.g. --device)
        raise
    except (ArithmeticError, ValueError) as e:  # a numerical failure of this head: its row, not the whole sweep
        return SweepRow(task, head, pooling, 0, {}, time.perf_counter() - started, f"{type(e).__name__}: {e}", label)
    done = time.perf_counter()
    return SweepRow(task, head, pooling, n, metrics, done - started, None, label, predictions, held_out, intervals,
                    bootstrap_seconds=done - fitted)


def _columns(predictions: Sequence[dict[str, Any]], *risk_of: dict[str, float]) -> tuple[np.ndarray, ...]:
    times = np.array([p["time"] for p in predictions])
    events = np.array([p["event"] for p in predictions])
    folds = np.array([p["fold"] for p in predictions])
    return (times, events, folds, *(np.array([r[p["patient_id"]] for p in predictions]) for r in risk_of))


@dataclass
class PairedDifference:
    task: str
    head: str
    pooling: str
    a: str
    b: str
    patients: int
    result: dict[str, Any] | None  # sm.paired_c_difference's, or None with `error`
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "head": self.head, "pooling": self.pooling, "a": self.a, "b": self.b,
                "patients": self.patients, "error": self.error, **(self.result or {})}


def _difference(ra: SweepRow, rb: SweepRow, key: tuple[str, str, str], a: str, b: str, seed: int) -> PairedDifference:
    """C of row b minus row a on the patients both hold out, the bootstrap resampling them jointly."""
    risk_b = {p["patient_id"]: p["risk"] for p in rb.predictions}
    both = [p for p in ra.predictions if p["patient_id"] in risk_b]
    times, events, folds, risk_a, risk_b_ = _columns(both, {p["patient_id"]: p["risk"] for p in both}, risk_b)
    try:
        result, error = sm.paired_c_difference(times, events, folds, risk_a, risk_b_, seed=seed), None
    except sm.NotComputed as e:
        result, error = None, str(e)
    return PairedDifference(*key, a, b, len(both), result, error)


def paired_differences(rows: Sequence[SweepRow], seed: int = 0) -> list[PairedDifference]:
    """Harrell's C of encoder b minus encoder a for every pair of stores and every survival (task, head,
    pooling) both fitted: on the same held-out patients, the bootstrap resampling them jointly."""
    fitted = [r for r in rows if r.task != "grade" and r.predictions]
    encoders = list(dict.fromkeys(r.encoder for r in rows))
    by_key = {(r.encoder, r.task, r.head, r.pooling): r for r in fitted}
    out = []
    for key in dict.fromkeys((r.task, r.head, r.pooling) for r in fitted):
        for i, a in enumerate(encoders):
            for b in encoders[i + 1:]:
                ra, rb = by_key.get((a, *key)), by_key.get((b, *key))
                if ra is not None and rb is not None:
                    out.append(_difference(ra, rb, key, a, b, seed))
    return out


def set_differences(rows: Sequence[SweepRow], reference: str, seed: int = 0) -> list[PairedDifference]:
    """Each survival set row (`set:NAME`) against the same store, task and head on the `reference` pooling:
    Harrell's C of the set minus the pooled tiles' on the same held-out patients (a and b name the rows)."""
    fitted = [r for r in rows if r.task != "grade" and r.predictions]
    by_key = {(r.encoder, r.task, r.head, r.pooling): r for r in fitted}
    out = []
    for rb in fitted:
        ra = by_key.get((rb.encoder, rb.task, rb.head, reference))
        if rb.pooling.startswith("set:") and ra is not None:
            where = f"{rb.encoder} " if rb.encoder else ""
            out.append(_difference(ra, rb, (rb.task, rb.head, rb.pooling), where + reference, where + rb.pooling, seed))
    return out


def format_differences(differences: Sequence[PairedDifference]) -> str:
    wide = max([len(d.pooling) for d in differences] + [7])
    header = f"{'task':<6} {'head':<12} {'pooling':<{wide}} {'C(b) - C(a)':>12} {'95% CI':>18}  b vs a"
    lines = [header, "-" * len(header)]
    for d in differences:
        if d.result is None:
            lines.append(f"{d.task:<6} {d.head:<12} {d.pooling:<{wide}} {'n/a':>12} {'':>18}  "
                         f"{d.b} vs {d.a}: {d.error}")
            continue
        lo, hi = d.result["ci95"]
        lines.append(f"{d.task:<6} {d.head:<12} {d.pooling:<{wide}} {d.result['difference']:>+12.3f} "
                     f"{f'[{lo:+.3f}, {hi:+.3f}]':>18}  {d.b} vs {d.a} ({d.patients} patients)")
    return "\n".join(lines)


def format_table(rows: Sequence[SweepRow]) -> str:
    columns = [c for c in (*SURVIVAL_COLUMNS, *GRADE_COLUMNS) if any(c in r.metrics for r in rows)]
    width = max([len(r.encoder) for r in rows] + [7]) if any(r.encoder for r in rows) else 0
    lead = (lambda r: f"{r.encoder:<{width}} ") if width else (lambda r: "")
    with_ci = any(r.ci95("harrell_c") for r in rows)
    wide = max([len(r.pooling) for r in rows] + [7])  # a set's rows are named `set:NAME`
    header = (f"{'encoder':<{width}} " if width else "") + f"{'task':<6} {'head':<12} {'pooling':<{wide}} {'n':>5} " \
        + " ".join(f"{c:>15}" for c in columns) + (f" {'C 95% CI':>16}" if with_ci else "") + f" {'s':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.error:
            lines.append(f"{lead(r)}{r.task:<6} {r.head:<12} {r.pooling:<{wide}} {'-':>5} error: {r.error}")
            continue
        cells = [_cell(r.metrics.get(c)) for c in columns]
        ci = r.ci95("harrell_c")
        ci_cell = (f" {f'[{ci[0]:.3f}, {ci[1]:.3f}]':>16}" if ci else f" {'':>16}") if with_ci else ""
        lines.append(f"{lead(r)}{r.task:<6} {r.head:<12} {r.pooling:<{wide}} {r.patients:>5} " + " ".join(cells)
                     + ci_cell + f" {r.seconds:>7.1f}")
    return "\n".join(lines)


def _cell(value: dict[str, Any] | None) -> str:
    if value is None:
        return " " * 15
    if not _finite_mean(value):  # no fold could compute it: sweep.json holds the reasons
        return "n/a".rjust(15)
    return f"{value['mean']:.3f} ± {value['std']:.3f}".rjust(15)


def _finite_mean(value: dict[str, Any] | None) -> bool:
    mean = (value or {}).get("mean")
    return mean is not None and bool(np.isfinite(mean))


def best_by_task(rows: Sequence[SweepRow]) -> dict[str, str]:
    """The head with the highest mean Harrell's C (survival) or QWK (grade) per task; a row whose mean is
    null (or NaN) is never ranked: it would win or lose by how max() meets NaN, not by its score."""
    best = {}
    for task in dict.fromkeys(r.task for r in rows):
        key = "qwk" if task == "grade" else "harrell_c"
        scored = [r for r in rows if r.task == task and _finite_mean(r.metrics.get(key))]
        if scored:
            top = max(scored, key=lambda r: r.metrics[key]["mean"])
            where = f"{top.encoder}: " if top.encoder else ""
            best[task] = f"{where}{top.head} ({top.pooling}) {key} {top.metrics[key]['mean']:.3f}"
    return best


def _interval_cell(row: SweepRow, metric: str) -> str:
    mean = (row.metrics.get(metric) or {}).get("mean")
    if not _finite_mean(row.metrics.get(metric)):
        return "n/a"
    ci = row.ci95(metric)
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{mean:.3f} [no interval]"


def _difference_cell(row: SweepRow, metric: str) -> str:
    if row.is_reference:
        return "reference"
    delta = row.difference.get(metric) or {}
    if delta.get("difference") is None:
        return "n/a"
    ci = delta.get("ci95")
    return f"{delta['difference']:+.3f} " + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[no interval]")


def format_intervals(rows: Sequence[SweepRow], resamples: int, seed: int) -> str:
    """Per task: each row's metrics as mean [95% interval], then each row minus the task's reference row (marked
    *) with its interval; n/a where sweep.json's intervals and difference_to_reference say why."""
    lines = [f"95% bootstrap intervals: {resamples} resamples of each fold's held-out patients (seed {seed}); "
             "differences: row - the task's reference row (*) on the patients both hold out, resampled jointly"]
    for task in dict.fromkeys(r.task for r in rows):
        of_task = [r for r in rows if r.task == task]
        columns = [c for c in (GRADE_COLUMNS if task == "grade" else SURVIVAL_COLUMNS)
                   if any(c in r.metrics for r in of_task)]
        reference = next((r.name for r in of_task if r.is_reference), "none")
        wide = max(len(r.name) for r in of_task)
        for title, cell, size in ((f"{task}: mean [95% CI]", _interval_cell, 22),
                                  (f"{task}: row - {reference} [95% CI]", _difference_cell, 25)):
            lines += ["", title, f"  {'row':<{wide}} " + " ".join(f"{c:>{size}}" for c in columns)]
            for r in of_task:
                mark = "*" if r.is_reference else " "
                cells = " ".join(f"{cell(r, c):>{size}}" for c in columns) if not r.error else f"error: {r.error}"
                lines.append(f"{mark} {r.name:<{wide}} {cells}")
    return "\n".join(lines)
