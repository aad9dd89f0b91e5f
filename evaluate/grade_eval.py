"""One grade evaluation as `python -m evaluate grade` and the demo run it: a classifier cross-validated on the
cohort's folds, with heatmaps (a MIL head's attention, logreg's occlusion of tiles) and the head refitted on
every graded patient and saved when asked. The result writes today's files (metrics.json, predictions.csv,
confusion.png) and gives the lines the command prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from evaluate.abmil_settings import TrainSettings
from evaluate.cohort import CohortSettings, open_patients, open_set_patients
from evaluate.features import PatientData, SetCoverage, pooling_label
from evaluate.grade import (
    BAG_GRADE_HEADS,
    GradeResult,
    confusion_plot,
    cross_validate_grade,
    refit_grade_on_all,
)
from evaluate.heatmaps import OcclusionTarget
from evaluate.records import WritesMetrics, format_summary, run_extras, set_lines
from evaluate.tiles import bags_if_needed, draw_slide_heatmaps, heatmap_painter, refuse_with_set
from slidecache.heads.saved import save_grade_head
from store.embedding_store import EmbeddingStore


@dataclass(frozen=True)
class GradeSettings:
    head: str = "logreg"
    pooling: str = "mean"  # logreg; the MIL heads read tiles
    seed: int = 0
    max_tiles: int = 512  # tiles sampled per patient bag (MIL heads)
    abmil: TrainSettings = field(default_factory=TrainSettings)  # every MIL head's training settings
    heatmaps: tuple[str, ...] = ()  # slide ids, or `auto`: MIL heads' attention, logreg's occlusion
    save_head: str | None = None  # also refit on every graded patient and save the head here
    slide_embeddings: str | None = None  # a slide-embedding set of the store: its vectors instead of pooled tiles

    @property
    def tiles(self) -> bool:
        return self.head in BAG_GRADE_HEADS


@dataclass
class GradeEvaluation(WritesMetrics):
    settings: GradeSettings
    result: GradeResult
    store_fingerprint: str
    heatmaps: list[dict[str, Any]] | None = None
    saved_head: str | None = None
    config: Mapping[str, Any] | None = None  # what metrics.json records as the run's provenance
    coverage: SetCoverage | None = None  # the slide-embedding set read, and the slides it lacks

    @property
    def pooling(self) -> str:
        return pooling_label(self.settings.slide_embeddings, self.settings.tiles, self.settings.pooling)

    def brief(self) -> dict[str, Any]:
        """The head, its summary, classes and confusion matrix: the demo's record."""
        return {"head": self.settings.head, "summary": self.result.summary, "classes": self.result.classes,
                "confusion": self.result.confusion}

    def record(self) -> dict[str, Any]:
        """metrics.json."""
        result = self.result
        record = {"label": "grade", "head": self.settings.head, "scheme": result.scheme, "classes": result.classes,
                  "summary": result.summary, "confusion": result.confusion, "folds": result.folds,
                  "dropped": result.dropped, "patients": len(result.predictions),
                  "pooling": self.pooling, "store_fingerprint": self.store_fingerprint, "re_encoded_tiles": 0}
        if self.coverage is not None:
            record["slide_embeddings"] = self.coverage.record()
        return record | run_extras(self.config, self.heatmaps, self.saved_head)

    def plot(self, out: Path) -> None:
        confusion_plot(self.result, str(out / "confusion.png"))

    def lines(self) -> list[str]:
        result = self.result
        lines = [f"grade ({result.scheme}: {', '.join(result.classes)}), {self.settings.head}, "
                 f"{len(result.predictions)} patients:"]
        lines += [f"  {key:<18} {format_summary(value)}" for key, value in result.summary.items() if key != "chance"]
        chance = result.summary["chance"]
        lines.append(f"  chance: majority-class accuracy {chance['majority_class_accuracy']:.3f}, "
                     f"balanced accuracy {chance['balanced_accuracy']:.3f}")
        return lines + set_lines(self.coverage)

    def wrote(self, out: Path) -> str:
        return f"wrote {out}/metrics.json, predictions.csv, confusion.png; re-encoded nothing"


def expected_grade_index(model: Any, x: np.ndarray) -> np.ndarray:
    """Σ k·p(grade k), grades numbered from 0 in order: what logreg's occlusion measures. Ordinal and signed, so a
    tile pushing towards higher grades scores above 0 whichever grade is predicted (a class absent from the fold's
    training has p 0, as in cross_validate_grade)."""
    return model.predict_proba(x) @ model.classes_.astype(np.float64)


def evaluate_grade(store: EmbeddingStore, data: PatientData, folds: dict[str, int], settings: GradeSettings,
                   out: Path = Path("."), config: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] = print, coverage: SetCoverage | None = None) -> GradeEvaluation:
    """The head cross-validated on `folds`; heatmaps are drawn into `out`. Settings that cannot work are refused
    before anything is fitted. With `settings.slide_embeddings`, `data` holds the set's vectors (`coverage`)."""
    bags = bags_if_needed(store, data, settings, "grade", log)
    result = cross_validate_grade(data, folds, settings.seed, head=settings.head, features=bags,
                                  settings=settings.abmil)
    evaluation = GradeEvaluation(settings, result, store.fingerprint, config=config, coverage=coverage)
    if settings.heatmaps:
        top = f"p_{result.classes[-1]}"  # the highest grade's probability
        scores = {p["patient_id"]: p[top] for p in result.predictions}
        target = OcclusionTarget(f"expected grade ({result.classes[0]} = 0)", expected_grade_index)
        evaluation.heatmaps = draw_slide_heatmaps(store, data, settings.heatmaps, folds, result.models, scores, out,
                                                  log, heatmap_painter(store, data, settings, target))
    if settings.save_head:
        model, inputs, classes, scheme = refit_grade_on_all(data, settings.seed, head=settings.head, features=bags,
                                                            settings=settings.abmil)
        evaluation.saved_head = str(save_grade_head(settings.save_head, settings.head, model, inputs, classes, scheme,
                                                    "tiles" if settings.tiles else settings.pooling,
                                                    store.fingerprint, result.summary))
    return evaluation


def run_grade(store_url: str, cohort: CohortSettings, settings: GradeSettings, out: Path,
              config: Mapping[str, Any] | None = None, log: Callable[[str], None] = print) -> GradeEvaluation:
    """`python -m evaluate grade`: the cohort read, `out` made, the folds made, then the evaluation."""
    coverage = None
    if settings.slide_embeddings:
        refuse_with_set(settings)
        store, data, coverage = open_set_patients(store_url, cohort, settings.slide_embeddings)
    else:
        store, data = open_patients(store_url, cohort, pooling=settings.pooling)
    out.mkdir(parents=True, exist_ok=True)
    folds = cohort.folds_of(data)
    return evaluate_grade(store, data, folds, settings, out, config, log, coverage)
