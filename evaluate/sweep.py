"""Many heads × poolings × endpoints from one store, one table: the re-fitting users do dozens of times.

Slide vectors are read once per pooling and tile bags once per sweep; every (task, head, pooling) uses
the same patient folds for its task, so rows of one task are directly comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from evaluate.abmil import TrainSettings, load_bags
from evaluate.features import PatientData, patient_features
from evaluate.grade import GRADE_HEADS, cross_validate_grade
from evaluate.survival import BAG_HEADS, HEADS, cross_validate
from store.clinical import ENDPOINTS, ClinicalTable
from store.embedding_store import EmbeddingStore
from store.errors import EvaluationError

SURVIVAL_COLUMNS = ("harrell_c", "uno_c", "mean_auc", "ibs")
GRADE_COLUMNS = ("balanced_accuracy", "macro_f1", "qwk", "auc")
BAG_GRADE_HEADS = {"abmil"}


@dataclass
class SweepRow:
    task: str
    head: str
    pooling: str  # "tiles" for heads that read the tile bags
    patients: int
    metrics: dict[str, dict[str, float]]
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "head": self.head, "pooling": self.pooling, "patients": self.patients,
                "seconds": round(self.seconds, 2), "error": self.error,
                **{f"{k}_{stat}": v[stat] for k, v in self.metrics.items() for stat in ("mean", "std")}}


def run_sweep(store: EmbeddingStore, clinical: ClinicalTable, tasks: Sequence[str], survival_heads: Sequence[str],
              grade_heads: Sequence[str], poolings: Sequence[str], folds_for: Callable[[str, PatientData], dict[str, int]],
              seed: int = 0, settings: TrainSettings | None = None, max_tiles: int = 512,
              progress: Callable[[SweepRow], None] | None = None) -> list[SweepRow]:
    """Fit every applicable (task, head, pooling); a failing combination is a row with its error, not a crash."""
    for task in tasks:
        if task != "grade" and task not in ENDPOINTS:
            raise EvaluationError(f"unknown task {task!r}: an endpoint ({', '.join(ENDPOINTS)}) or grade")
    unknown = [h for h in survival_heads if h not in HEADS] + [h for h in grade_heads if h not in GRADE_HEADS]
    if unknown:
        raise EvaluationError(f"unknown heads {unknown}: survival heads are {', '.join(HEADS)}; "
                              f"grade heads are {', '.join(GRADE_HEADS)}")
    by_pooling = {p: patient_features(store, clinical, p) for p in poolings}
    reference = by_pooling[poolings[0]]
    needs_bags = any(h in BAG_HEADS for h in survival_heads) or any(h in BAG_GRADE_HEADS for h in grade_heads)
    bags = load_bags(store, reference.slides, max_tiles, seed) if needs_bags else None
    rows: list[SweepRow] = []
    for task in tasks:
        folds = folds_for(task, reference)
        heads = survival_heads if task != "grade" else grade_heads
        for head in heads:
            tile_head = head in BAG_HEADS or head in BAG_GRADE_HEADS
            for pooling in (["tiles"] if tile_head else poolings):
                data = reference if tile_head else by_pooling[pooling]
                started = time.perf_counter()
                try:
                    if task == "grade":
                        g = cross_validate_grade(data, folds, seed, head=head, features=bags if tile_head else None,
                                                 settings=settings)
                        metrics = {k: v for k, v in g.summary.items() if k in GRADE_COLUMNS}
                        n, error = len(g.predictions), None
                    else:
                        s = cross_validate(data, task, head, folds, seed, bags if tile_head else None, settings)
                        metrics = {k: v for k, v in s.summary.items() if k in SURVIVAL_COLUMNS}
                        n, error = len(s.predictions), None
                except EvaluationError as e:
                    metrics, n, error = {}, 0, str(e)
                row = SweepRow(task, head, pooling, n, metrics, time.perf_counter() - started, error)
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def format_table(rows: Sequence[SweepRow]) -> str:
    columns = [c for c in (*SURVIVAL_COLUMNS, *GRADE_COLUMNS) if any(c in r.metrics for r in rows)]
    header = f"{'task':<6} {'head':<10} {'pooling':<7} {'n':>5} " + " ".join(f"{c:>15}" for c in columns) + f" {'s':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.error:
            lines.append(f"{r.task:<6} {r.head:<10} {r.pooling:<7} {'-':>5} error: {r.error}")
            continue
        cells = [_cell(r.metrics.get(c)) for c in columns]
        lines.append(f"{r.task:<6} {r.head:<10} {r.pooling:<7} {r.patients:>5} " + " ".join(cells) + f" {r.seconds:>7.1f}")
    return "\n".join(lines)


def _cell(value: dict[str, Any] | None) -> str:
    if value is None:
        return " " * 15
    if value.get("mean") is None:  # no fold could compute it: metrics.json holds the reasons
        return "n/a".rjust(15)
    return f"{value['mean']:.3f} ± {value['std']:.3f}".rjust(15)


def best_by_task(rows: Sequence[SweepRow]) -> dict[str, str]:
    """The head with the highest mean Harrell's C (survival) or QWK (grade) per task."""
    best = {}
    for task in dict.fromkeys(r.task for r in rows):
        key = "qwk" if task == "grade" else "harrell_c"
        scored = [r for r in rows if r.task == task and (r.metrics.get(key) or {}).get("mean") is not None]
        if scored:
            top = max(scored, key=lambda r: r.metrics[key]["mean"])
            best[task] = f"{top.head} ({top.pooling}) {key} {top.metrics[key]['mean']:.3f}"
    return best
