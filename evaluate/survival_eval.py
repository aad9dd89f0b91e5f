"""One survival evaluation as `python -m evaluate survival` and the demo run it: a head cross-validated on the
cohort's folds, beside an age + stage clinical baseline, with heatmaps (a MIL head's attention, a slide-vector
head's occlusion of tiles) and the head refitted on every patient and saved when asked. The result writes
today's files (metrics.json, predictions.csv, km.png) and gives the lines the command prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from evaluate.abmil_settings import TrainSettings
from evaluate.cohort import CohortSettings, open_patients, open_set_patients
from evaluate.features import PatientData, SetCoverage, pooling_label
from evaluate.heatmaps import OcclusionTarget
from evaluate.records import WritesMetrics, format_summary, run_extras, set_lines
from evaluate.survival import BAG_HEADS, SurvivalResult, clinical_covariates, cross_validate, km_plot, refit_on_all
from evaluate.tiles import bags_if_needed, draw_slide_heatmaps, heatmap_painter, refuse_with_set
from slidecache.errors import EvaluationError
from slidecache.heads.saved import save_survival_head
from store.embedding_store import EmbeddingStore

BASELINE_MIN_PATIENTS = 20
RISK = OcclusionTarget("risk", lambda head, x: head.risk(x))  # a slide-vector head's occlusion: its fold's risk


@dataclass(frozen=True)
class SurvivalSettings:
    endpoint: str = "OS"
    head: str = "coxnet"
    pooling: str = "mean"  # slide-vector heads; MIL heads read tiles
    seed: int = 0
    max_tiles: int = 512  # tiles sampled per patient bag (MIL heads)
    abmil: TrainSettings = field(default_factory=TrainSettings)  # every MIL head's training settings
    heatmaps: tuple[str, ...] = ()  # slide ids, or `auto`: MIL heads' attention, slide-vector heads' occlusion
    save_head: str | None = None  # also refit on every patient and save the head here
    clinical_baseline: bool = True  # the age + stage CoxPH beside the head
    slide_embeddings: str | None = None  # a slide-embedding set of the store: its vectors instead of pooled tiles

    @property
    def tiles(self) -> bool:
        return self.head in BAG_HEADS


@dataclass
class SurvivalEvaluation(WritesMetrics):
    settings: SurvivalSettings
    result: SurvivalResult
    store_fingerprint: str
    baseline: dict[str, Any] | None = None
    heatmaps: list[dict[str, Any]] | None = None
    saved_head: str | None = None
    config: Mapping[str, Any] | None = None  # what metrics.json records as the run's provenance
    coverage: SetCoverage | None = None  # the slide-embedding set read, and the slides it lacks

    @property
    def pooling(self) -> str:
        return pooling_label(self.settings.slide_embeddings, self.settings.tiles, self.settings.pooling)

    def brief(self) -> dict[str, Any]:
        """The head, its summary and the log-rank p: the demo's record."""
        return {"head": self.settings.head, "summary": self.result.summary, "logrank_p": self.result.logrank_p}

    def record(self) -> dict[str, Any]:
        """metrics.json."""
        result = self.result
        record = {"endpoint": self.settings.endpoint, "head": self.settings.head, "pooling": self.pooling,
                  "summary": result.summary, "logrank_p": result.logrank_p, "folds": result.folds,
                  "patients": len(result.predictions), "store_fingerprint": self.store_fingerprint,
                  "re_encoded_tiles": 0}
        if self.coverage is not None:
            record["slide_embeddings"] = self.coverage.record()
        if self.baseline is not None:
            record["clinical_baseline_age_stage"] = self.baseline
        record |= run_extras(self.config, None, None)
        if self.settings.tiles:
            record["abmil"] = vars(self.settings.abmil) | {"max_tiles": self.settings.max_tiles}
        return record | run_extras(None, self.heatmaps, self.saved_head)

    def plot(self, out: Path) -> None:
        km_plot(self.result, str(out / "km.png"))

    def lines(self) -> list[str]:
        result, settings = self.result, self.settings
        lines = [f"{settings.endpoint} {settings.head} ({self.pooling}), {len(result.predictions)} patients, "
                 f"{len(result.folds)} folds:"]
        lines += [f"  {key:<10} {format_summary(value)}" for key, value in result.summary.items()]
        if self.baseline is not None and "summary" in self.baseline:
            lines.append("  clinical baseline (age + stage CoxPH) harrell_c "
                         f"{format_summary(self.baseline['summary']['harrell_c'])}")
        elif self.baseline is not None:
            lines.append(f"  clinical baseline (age + stage CoxPH): {self.baseline['error']}")
        logrank = result.logrank_p if result.logrank_p is not None else "n/a"
        lines.append(f"  log-rank p (held-out risk groups) {logrank}")
        return lines + set_lines(self.coverage)

    def wrote(self, out: Path) -> str:
        source = "tile embeddings" if self.settings.tiles else "slide vectors"
        if self.coverage is not None:
            source = f"slide embeddings of set {self.coverage.name!r}"
        return f"wrote {out}/metrics.json, predictions.csv, km.png; re-encoded nothing ({source} read from the store)"


def clinical_baseline(data: PatientData, endpoint: str, folds: dict[str, int], seed: int) -> dict[str, Any]:
    """An age + stage CoxPH on the same folds, or why there is none: recorded beside the results, never instead."""
    mask, covariates = clinical_covariates(data)
    if mask.sum() < BASELINE_MIN_PATIENTS:
        return {"error": f"{int(mask.sum())} patients have both age and stage "
                         f"(at least {BASELINE_MIN_PATIENTS} needed)"}
    try:
        baseline = cross_validate(data.subset(mask), endpoint, "coxph", folds, seed, covariates[mask])
    except EvaluationError as e:
        return {"error": str(e)}
    return {"summary": baseline.summary, "patients": len(baseline.predictions)}


def evaluate_survival(store: EmbeddingStore, data: PatientData, folds: dict[str, int], settings: SurvivalSettings,
                      out: Path = Path("."), config: Mapping[str, Any] | None = None,
                      log: Callable[[str], None] = print, coverage: SetCoverage | None = None) -> SurvivalEvaluation:
    """The head cross-validated on `folds`; heatmaps are drawn into `out`. Settings that cannot work are refused
    before anything is fitted. With `settings.slide_embeddings`, `data` holds the set's vectors (`coverage`)."""
    bags = bags_if_needed(store, data, settings, "survival", log)
    result = cross_validate(data, settings.endpoint, settings.head, folds, settings.seed, bags, settings.abmil)
    evaluation = SurvivalEvaluation(settings, result, store.fingerprint, config=config, coverage=coverage)
    if settings.clinical_baseline:
        evaluation.baseline = clinical_baseline(data, settings.endpoint, folds, settings.seed)
    if settings.heatmaps:
        # A MIL head draws its network's attention; a slide-vector head is occluded through its risk.
        models = {fold: head.model if settings.tiles else head for fold, head in result.models.items()}
        risks = {p["patient_id"]: p["risk"] for p in result.predictions}
        evaluation.heatmaps = draw_slide_heatmaps(store, data, settings.heatmaps, folds, models, risks, out, log,
                                                  heatmap_painter(store, data, settings, RISK))
    if settings.save_head:
        fitted, inputs = refit_on_all(data, settings.endpoint, settings.head, settings.seed, bags, settings.abmil)
        evaluation.saved_head = str(save_survival_head(settings.save_head, settings.head, fitted, inputs,
                                                       settings.endpoint, evaluation.pooling, store.fingerprint,
                                                       result.summary))
    return evaluation


def run_survival(store_url: str, cohort: CohortSettings, settings: SurvivalSettings, out: Path,
                 config: Mapping[str, Any] | None = None, log: Callable[[str], None] = print) -> SurvivalEvaluation:
    """`python -m evaluate survival`: the cohort read, its folds made, `out` made before anything is fitted."""
    coverage = None
    if settings.slide_embeddings:
        refuse_with_set(settings)
        store, data, coverage = open_set_patients(store_url, cohort, settings.slide_embeddings, settings.endpoint)
    else:
        store, data = open_patients(store_url, cohort, settings.endpoint, settings.pooling)
    folds = cohort.folds_of(data, settings.endpoint)
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_survival(store, data, folds, settings, out, config, log, coverage)
