"""One sweep as `python -m evaluate sweep` runs it: every (store, task, head, pooling) of evaluate/sweep.py on the
cohort's patients, with rows for the stores' slide-embedding sets asked for, every metric's bootstrap interval and
its difference to each task's reference row (--reference), the paired C-index differences between stores (and of
each set against the first pooling), and a check that no encoder module was imported. The result writes its files
(sweep.json, sweep.csv, sweep_predictions.csv, sweep_grade_predictions.csv, sweep.html with sweep_forest.png) and
gives the lines the command prints."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from evaluate.abmil_settings import TrainSettings
from evaluate.cohort import CohortSettings
from evaluate.features import PatientData, SetCoverage, set_features, set_label
from evaluate.sweep import (
    PairedDifference,
    SweepRow,
    best_by_task,
    format_differences,
    format_intervals,
    format_table,
    paired_differences,
    run_sweeps,
    set_differences,
    sweep_plan,
)
from evaluate.sweep_html import write_html
from evaluate.sweep_intervals import RESAMPLES
from evaluate.sweep_reference import attach_differences, check_references, choose_references
from slidecache.cohorts.clinical import ClinicalTable
from slidecache.errors import EvaluationError
from slidecache.json_out import dumps
from slidecache.labels import distinct_labels
from slidecache.provenance import encoder_modules_loaded, provenance
from store.embedding_store import EmbeddingStore


@dataclass(frozen=True)
class SweepSettings:
    stores: Sequence[str]  # one store, or one per encoder
    cohort: CohortSettings
    tasks: Sequence[str] = ("OS",)
    heads: Sequence[str] = ("coxnet", "coxph", "rsf", "abmil-cox")  # survival heads
    grade_heads: Sequence[str] = ("logreg", "abmil")
    poolings: Sequence[str] = ("mean", "max")
    max_tiles: int = 512
    abmil: TrainSettings = field(default_factory=TrainSettings)
    slide_embeddings: Sequence[str] = ()  # slide-embedding sets of the store(s): rows beside the poolings
    references: Sequence[str] = ()  # --reference: each task's row the others are compared with (sweep_reference.py)
    resamples: int = RESAMPLES  # bootstrap resamples of each fold's held-out patients, every metric


@dataclass
class SweepEvaluation:
    rows: list[SweepRow]
    stores: dict[str, EmbeddingStore]  # label ("" for one store) → store
    dropped: dict[str, int]  # store label → patients the other stores lack, left out
    differences: list[PairedDifference]
    loaded: list[str]  # encoder modules imported by this sweep (none, or it is refused)
    config: Mapping[str, Any] | None = None  # what sweep.json records as the run's provenance
    coverage: dict[str, dict[str, SetCoverage]] = field(default_factory=dict)  # store label → set → its coverage
    bootstrap: dict[str, Any] = field(default_factory=dict)  # resamples, seed, seconds spent on the intervals

    def record(self) -> dict[str, Any]:
        """sweep.json."""
        opened = list(self.stores.values())
        record = {"rows": [r.as_dict(reasons=True) for r in self.rows], "best": best_by_task(self.rows),
                  "reference_rows": {r.task: r.name for r in self.rows if r.is_reference},
                  "bootstrap": self.bootstrap,
                  "paired_differences": [d.as_dict() for d in self.differences],
                  "store_fingerprint": (opened[0].fingerprint if len(opened) == 1
                                        else {label: s.fingerprint for label, s in self.stores.items()}),
                  "stores": {label or "store": s.url for label, s in self.stores.items()},
                  "patients_left_out": self.dropped if len(self.stores) > 1 else {},
                  "re_encoded_tiles": 0, "encoder_modules_loaded": self.loaded}
        if self.coverage:
            sets = {label: {name: c.record() for name, c in by_set.items()} for label, by_set in self.coverage.items()}
            record["slide_embeddings"] = sets[""] if list(sets) == [""] else sets
        if self.config is not None:
            record["provenance"] = provenance(self.config)
        return record

    def write(self, out: Path) -> None:
        (out / "sweep.json").write_text(dumps(self.record()))  # strict JSON: a non-finite float is null, never NaN
        with open(out / "sweep.csv", "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in self.rows for k in r.as_dict()))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r.as_dict() for r in self.rows)
        survival = [r for r in self.rows if r.task != "grade"]
        with open(out / "sweep_predictions.csv", "w", newline="") as f:  # held-out risks: for the user's own statistics
            writer = csv.writer(f)
            writer.writerow(["encoder", "task", "head", "pooling", "patient_id", "fold", "time", "event", "risk"])
            writer.writerows([r.encoder, r.task, r.head, r.pooling, p["patient_id"], p["fold"], p["time"],
                              int(p["event"]), repr(p["risk"])] for r in survival for p in r.predictions)
        grade = [r for r in self.rows if r.task == "grade"]
        if grade:  # held-out grades and class probabilities, as `evaluate grade` writes predictions.csv
            probabilities = list(dict.fromkeys(k for r in grade for p in r.predictions for k in p if k.startswith("p_")))
            with open(out / "sweep_grade_predictions.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["encoder", "task", "head", "pooling", "patient_id", "fold", "true", "predicted",
                                 *probabilities])
                writer.writerows([r.encoder, r.task, r.head, r.pooling, p["patient_id"], p["fold"], p["true"],
                                  p["predicted"], *(repr(p[k]) if k in p else "" for k in probabilities)]
                                 for r in grade for p in r.predictions)
        one = store_labels(list(self.stores.values()))[0] if len(self.stores) == 1 else ""
        write_html(out, self.rows, self.bootstrap, one)  # one store: its rows carry no encoder label

    def warnings(self) -> list[str]:
        return [f"warning: {n} patients of {label} are not in every store: left out, so that every encoder is "
                "scored on the same patients" for label, n in self.dropped.items() if n] + \
            [w for by_set in self.coverage.values() for c in by_set.values() if (w := c.warning())]

    def lines(self) -> list[str]:
        lines = [format_table(self.rows)]
        if any(r.intervals for r in self.rows):
            lines += ["", format_intervals(self.rows, self.bootstrap.get("resamples", RESAMPLES),
                                           self.bootstrap.get("seed", 0))]
        if self.differences:
            lines += ["", "paired differences of Harrell's C (b - a) on the same held-out patients, "
                          "bootstrap resampling them jointly (across stores; a set against the pooled tiles):",
                      format_differences(self.differences)]
        return lines + [f"best {task}: {best}" for task, best in best_by_task(self.rows).items()]

    def check(self, out: Path) -> None:
        """Refuse a sweep that imported the encoder, or whose every head failed (after its files are written)."""
        if self.loaded:
            raise EvaluationError(f"encoder modules were imported during the sweep: {self.loaded}")
        if self.rows and all(r.error for r in self.rows):
            raise EvaluationError(f"no head of the sweep could be fitted (every row's reason is in {out}/sweep.json); "
                                  f"the first: {self.rows[0].error}")

    def wrote(self, out: Path) -> str:
        where = "the store" if len(self.stores) == 1 else f"{len(self.stores)} stores"
        grade = ", sweep_grade_predictions.csv" if any(r.task == "grade" for r in self.rows) else ""
        return (f"wrote {out}/sweep.json, sweep.csv, sweep_predictions.csv{grade}, sweep.html, sweep_forest.png; "
                f"re-encoded nothing: {len(self.rows)} fit{'' if len(self.rows) == 1 else 's'} from {where}, the encoder "
                "was never imported")


def store_labels(stores: Sequence[EmbeddingStore]) -> list[str]:
    """Each store's encoder name; a name given twice is numbered (the same store twice compares to itself)."""
    return distinct_labels([str(s.spec.get("encoder", {}).get("name") or Path(s.url).stem) for s in stores])


def progress_line(row: SweepRow) -> str:
    where = f"{row.encoder} " if row.encoder else ""
    return f"  {where}{row.task} {row.head} {row.pooling}: " + (f"error: {row.error}" if row.error
                                                                else f"{row.seconds:.1f} s")


def sweep_sets(stores: Mapping[str, EmbeddingStore], clinical: ClinicalTable, names: Sequence[str]
               ) -> tuple[dict[str, dict[str, PatientData | str]], dict[str, dict[str, SetCoverage]]]:
    """Each store's vectors of each set ({label: {"set:NAME": data, or why it has none}}) and their coverage; a
    set no store holds is refused (a typo, most likely), one only some stores hold gives the others error rows."""
    sets: dict[str, dict[str, PatientData | str]] = {label: {} for label in stores}
    coverage: dict[str, dict[str, SetCoverage]] = {label: {} for label in stores}
    for name in dict.fromkeys(names):
        for label, store in stores.items():
            try:
                data, coverage[label][name] = set_features(store, clinical, name)
                sets[label][set_label(name)] = data
            except EvaluationError as e:
                sets[label][set_label(name)] = str(e)
        if not any(name in c for c in coverage.values()):
            raise EvaluationError(str(sets[next(iter(stores))][set_label(name)]))
    return sets, coverage


def evaluate_sweep(settings: SweepSettings, out: Path, config: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] = print) -> SweepEvaluation:
    """Every row, each logged as it is fitted; `out` is made before anything is fitted."""
    already = set(encoder_modules_loaded())  # a process that ran extraction before (a test, a notebook)
    opened = [EmbeddingStore.open(url) for url in settings.stores]
    labels = store_labels(opened) if len(opened) > 1 else [""]
    stores = dict(zip(labels, opened))
    cohort = settings.cohort
    clinical = cohort.table()
    out.mkdir(parents=True, exist_ok=True)

    def folds_for(task: str, data: PatientData) -> dict[str, int]:
        return cohort.folds_of(data, None if task == "grade" else task)

    sets, coverage = sweep_sets(stores, clinical, settings.slide_embeddings)
    check_references(settings.references, sweep_plan(labels, settings.tasks, settings.heads, settings.grade_heads,
                                                     settings.poolings, sets))  # before an hour of fitting
    rows, dropped = run_sweeps(stores, clinical, settings.tasks, settings.heads, settings.grade_heads,
                               settings.poolings, folds_for, cohort.seed, settings.abmil, settings.max_tiles,
                               lambda row: log(progress_line(row)), sets, settings.resamples)
    seconds = attach_differences(rows, choose_references(rows, settings.references, log), settings.resamples,
                                 cohort.seed)
    bootstrap = {"resamples": settings.resamples, "seed": cohort.seed, "level": 0.95,
                 "seconds": round(seconds + sum(r.bootstrap_seconds for r in rows), 3),
                 "how": "percentile bootstrap of the mean over folds, each fold's held-out patients resampled; "
                        "differences on the patients both rows hold out, resampled jointly; the training folds, AUC "
                        "times and IBS grids fixed as the fold's own estimate chose them"}
    differences = paired_differences(rows, cohort.seed) if len(stores) > 1 else []
    differences += set_differences(rows, settings.poolings[0], cohort.seed)
    loaded = sorted(set(encoder_modules_loaded()) - already)  # imported by this sweep
    return SweepEvaluation(rows, stores, dropped, differences, loaded, config, coverage, bootstrap)
