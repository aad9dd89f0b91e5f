"""Generated reports scored as `python -m evaluate report` and the demo score them: caption metrics and clinical
correctness against the references, with the reporter's grounding check when a checkpoint is given; or the
HistGen benchmark (evaluate/report_benchmark.py). The result writes report_metrics.json and gives the
lines the command prints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from evaluate.grounding import GroundingResult, grounding_check, grounding_lines
from evaluate.report_metrics import ReportScores, score_reports
from slidecache.cohorts.clinical import ClinicalTable, load_clinical_tables
from slidecache.errors import EvaluationError
from slidecache.json_out import dumps
from slidecache.provenance import provenance
from store.embedding_store import EmbeddingStore

if TYPE_CHECKING:
    from evaluate.report_benchmark import HistgenBenchmark

DEFAULT_NEW_TOKENS = 128


@dataclass(frozen=True)
class ReportSettings:
    predictions: str  # jsonl: {id, text} per generated report
    references: str  # jsonl, InternVL conversation annotations, or HistGen's annotation JSON
    clinical: Sequence[str] | None = None  # adds the C-index of the stated risk group
    endpoint: str = "OS"
    protocol: str = "default"  # or "histgen"
    store: str | None = None  # histgen: the retrieval baseline; grounding: the store the checkpoint trained on
    checkpoint: str | None = None  # the grounding check
    max_new_tokens: int | None = None  # grounding; None: as the predictions were generated, else 128
    seed: int = 0  # grounding: the seed donors are drawn with
    device: str = "auto"
    threshold: int = 10  # histgen: words seen fewer times in training are <unk>
    max_seq_length: int = 100  # histgen: reports cut to this many tokens - 1


@dataclass
class ReportEvaluation:
    scores: ReportScores
    grounding: GroundingResult | None = None
    config: Mapping[str, Any] | None = None  # what report_metrics.json records as the run's provenance

    def scores_record(self) -> dict[str, Any]:
        return {"n": self.scores.n, "caption": self.scores.caption, "clinical": self.scores.clinical,
                "notes": self.scores.notes}

    def record(self) -> dict[str, Any]:
        """report_metrics.json."""
        record = self.scores_record()
        if self.config is not None:
            record["provenance"] = provenance(self.config)
        if self.grounding is not None:
            record["grounding"] = grounding_record(self.grounding)
        return record

    def score_lines(self) -> list[str]:
        lines = [f"{self.scores.n} generated reports vs references:"]
        for key, value in {**self.scores.caption, **self.scores.clinical}.items():
            lines.append(f"  {key:<22} {value:.4f}" if isinstance(value, float) else f"  {key:<22} {value}")
        return lines + [f"  note: {note}" for note in self.scores.notes]

    def grounding_lines(self) -> list[str]:
        if self.grounding is None:
            return []
        return grounding_lines(self.grounding) + [f"  note: {note}" for note in self.grounding.notes]

    def lines(self) -> list[str]:
        return self.score_lines() + self.grounding_lines()

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "report_metrics.json"
        path.write_text(dumps(self.record()))
        return path


def grounding_record(grounding: GroundingResult) -> dict[str, Any]:
    """The grounding check as metrics record it: its scores and verdict, with the regenerated texts."""
    return grounding.as_dict() | {"texts": grounding.texts}


def generation_length(settings: ReportSettings) -> int:
    """max_new_tokens, else what train.generate recorded beside the predictions, else 128."""
    if settings.max_new_tokens:
        return settings.max_new_tokens
    manifest = Path(settings.predictions).with_name(f"{Path(settings.predictions).stem}_manifest.json")
    try:
        return int(json.loads(manifest.read_text())["config"]["max_new_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_NEW_TOKENS


def check_grounding(settings: ReportSettings) -> GroundingResult:
    """The grounding check of `settings.checkpoint` on the predictions' held-out reports."""
    return grounding_check(settings.checkpoint, settings.store, settings.predictions, settings.references,
                           settings.seed, max_new_tokens=generation_length(settings), device=settings.device)


def run_report(settings: ReportSettings, config: Mapping[str, Any] | None = None,
               log: Callable[[str], None] = print) -> ReportEvaluation | HistgenBenchmark:
    """`python -m evaluate report`: the evaluation of the protocol the settings name, each part logged as it is done;
    settings that cannot go together are refused before anything is scored."""
    clinical = _clinical(settings)
    if settings.checkpoint and settings.protocol != "default":
        raise EvaluationError("--checkpoint (the grounding check) goes with the default protocol: score the HistGen "
                              "protocol and the grounding check in two runs")
    if settings.protocol == "histgen":
        from evaluate.report_benchmark import HistgenBenchmark, histgen_benchmark

        store = EmbeddingStore.open(settings.store) if settings.store else None
        benchmark = HistgenBenchmark(histgen_benchmark(settings.predictions, settings.references, store, clinical,
                                                       settings.threshold, settings.max_seq_length), config)
        for line in benchmark.lines():
            log(line)
        return benchmark
    return _scored(settings, clinical, config, log)


def evaluate_reports(settings: ReportSettings, config: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] = print) -> ReportEvaluation:
    """The default protocol: the scores, then the grounding check when the settings name a checkpoint."""
    return _scored(settings, _clinical(settings), config, log)


def _clinical(settings: ReportSettings) -> ClinicalTable | None:
    return load_clinical_tables(settings.clinical) if settings.clinical else None


def _scored(settings: ReportSettings, clinical: ClinicalTable | None, config: Mapping[str, Any] | None,
            log: Callable[[str], None]) -> ReportEvaluation:
    if settings.checkpoint and not settings.store:
        raise EvaluationError("--checkpoint (the grounding check) needs --store: the store the checkpoint trained on")
    if settings.checkpoint:  # checkpoint and store checked before anything is scored (no model built yet)
        from train.generation import open_checked

        open_checked(settings.checkpoint, settings.store)
    evaluation = ReportEvaluation(score_reports(settings.predictions, settings.references, clinical,
                                                settings.endpoint), config=config)
    for line in evaluation.score_lines():
        log(line)
    if settings.checkpoint:
        evaluation.grounding = check_grounding(settings)
        for line in evaluation.grounding_lines():
            log(line)
    return evaluation
