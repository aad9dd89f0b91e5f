"""`evaluate report --protocol histgen`: generated reports scored as the HistGen benchmark scores them, beside
two baselines on the same test set and with the grade read from the text checked against the clinical table.

References come with their sets: HistGen's annotation JSON, or the annotations.jsonl of
`python -m train.import_reports` (each row's raw "report" and "split"). Only test reports are scored; the
vocabulary comes from the training reports. Baselines: the most frequent training report for every test
slide, and (with --store) the report of the training slide nearest by pooled embedding: where a model does
not beat them, its n-gram scores come from shared template text, not from reading the slide. Reference ids
match the predicted (and --store's) slides as `train.import_reports` matches them: exactly, by TCGA barcode,
or a patient id for all its slides. Predictions repeating an id are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from evaluate.histgen_protocol import (
    MAX_SEQ_LENGTH,
    THRESHOLD,
    Vocabulary,
    histgen_scores,
    most_frequent_report,
    nearest_training_reports,
)
from evaluate.report_grades import coverage, score_grades_against_table
from evaluate.report_inputs import match_references, prediction_patients, read_predictions, read_reference_sets
from slidecache import json_out
from slidecache.cohorts.clinical import ClinicalTable
from slidecache.errors import EvaluationError
from slidecache.provenance import provenance
from store.embedding_store import EmbeddingStore


def _pooled(store: EmbeddingStore, slides: list[str]) -> dict[str, Any]:
    have = set(store.slide_ids())
    views = (store.slide(s) for s in slides if s in have)
    return {v.slide_id: v.pooled("mean") for v in views if v.n_tiles}


def histgen_benchmark(predictions_path: str | Path, references_path: str | Path, store: EmbeddingStore | None = None,
                      clinical: ClinicalTable | None = None, threshold: int = THRESHOLD,
                      max_seq_length: int = MAX_SEQ_LENGTH) -> dict[str, Any]:
    notes: list[str] = []
    predictions = read_predictions(predictions_path)
    slides = prediction_patients(predictions_path)
    if store is not None:
        slides = store.slide_patients() | slides  # training references matched to store slides: the retrieval baseline
    references = match_references(read_reference_sets(references_path, notes), slides, references_path)
    unknown = sorted(set(predictions) - set(references))
    if unknown:
        raise EvaluationError(f"{len(unknown)} predictions have no reference in {references_path} (e.g. {unknown[:3]})")
    outside = sorted(k for k in predictions if references[k].split != "test")
    if outside:
        raise EvaluationError(f"{len(outside)} predictions are for slides outside the test set (e.g. {outside[:3]}: "
                              f"{references[outside[0]].split}); generate with `python -m train.generate --split "
                              "split.csv` (its test set)")
    training = {k: r.text for k, r in references.items() if r.split == "train"}
    vocabulary = Vocabulary.from_training(training.values(), threshold, max_seq_length)
    test_refs = {k: references[k].text for k in predictions}
    missing_test = sorted(k for k, r in references.items() if r.split == "test" and k not in predictions)
    result: dict[str, Any] = {
        "protocol": {"name": "histgen", "threshold": threshold, "max_seq_length": max_seq_length,
                     "vocabulary_words": len(vocabulary.words) + 1, "training_reports": len(training)},
        "test_reports": len(predictions), "test_reports_without_prediction": len(missing_test),
        "model": histgen_scores(predictions, test_refs, vocabulary), "baselines": {}, "notes": notes,
    }
    if missing_test:
        result["notes"].append(f"{len(missing_test)} test reports have no prediction (e.g. {missing_test[:3]}): "
                               "the scores are over the predicted ones only")
    frequent = most_frequent_report(training)
    result["baselines"]["most_frequent_training_report"] = histgen_scores({k: frequent for k in predictions}, test_refs,
                                                                          vocabulary)
    if store is not None:
        test_vectors, train_vectors = _pooled(store, list(predictions)), _pooled(store, list(training))
        if test_vectors and train_vectors:
            nearest = nearest_training_reports(test_vectors, train_vectors, training)
            result["baselines"]["nearest_training_report_by_embedding"] = histgen_scores(
                nearest, {k: test_refs[k] for k in nearest}, vocabulary)
            if len(nearest) < len(predictions):
                result["notes"].append(f"retrieval baseline over {len(nearest)} of {len(predictions)} test slides "
                                       "(the others are not in the store)")
        else:
            result["notes"].append("no retrieval baseline: the store holds none of the test or training slides")
    else:
        result["notes"].append("no retrieval baseline: give --store (pooled slide embeddings) for it")
    if clinical is not None:
        patient_of = {k: references[k].patient for k in predictions}
        grades = {p: c.grade for p, c in clinical.patients.items()}
        types = {p: c.cancer_type for p, c in clinical.patients.items()}
        result["clinical_correctness"] = {
            "model": score_grades_against_table(predictions, patient_of, grades, types),
            "references": score_grades_against_table(test_refs, patient_of, grades, types),
        }
    result["grade_coverage"] = {"model": coverage(predictions.values()),
                                "references": coverage(test_refs.values())}
    return result


def benchmark_lines(result: dict[str, Any]) -> list[str]:
    """The benchmark as `evaluate report --protocol histgen` prints it: a table of the model and its baselines,
    the grade stated per cancer type, and the notes."""
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"]
    protocol = result["protocol"]
    lines = [f"HistGen protocol: {result['test_reports']} test reports, vocabulary of "
             f"{protocol['vocabulary_words']} words from {protocol['training_reports']} training "
             f"reports (threshold {protocol['threshold']}, max length {protocol['max_seq_length']})",
             "  " + f"{'':<48}" + "".join(f"{n:>9}" for n in names)]
    rows = {"model": result["model"], **{f"baseline: {k.replace('_', ' ')}": v for k, v in result["baselines"].items()}}
    for label, scores in rows.items():
        cells = "".join(f"{scores[n]:>9.4f}" if n in scores else f"{'-':>9}" for n in names)
        lines.append("  " + f"{label:<48}" + cells)
    for who, table in (result.get("clinical_correctness") or {}).items():
        for cancer_type, entry in table.items():
            scored = (f"accuracy {entry['accuracy']:.3f}" + (f", QWK {entry['qwk']:.3f}" if "qwk" in entry else "")
                      + f" over {entry['scored']}") if "accuracy" in entry else str(entry["scored"])
            lines.append(f"  grade stated by the {who}, {cancer_type}: coverage {entry['coverage']:.2f} of "
                         f"{entry['reports']}; {scored}")
    return lines + [f"  note: {note}" for note in result["notes"]]


@dataclass
class HistgenBenchmark:
    """The benchmark's result as the command prints and writes it (report_metrics.json, with provenance)."""

    result: dict[str, Any]
    config: Mapping[str, Any] | None = None  # what report_metrics.json records as the run's provenance

    def lines(self) -> list[str]:
        return benchmark_lines(self.result)

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "report_metrics.json"
        path.write_text(json_out.dumps(self.result | {"provenance": provenance(self.config)}))
        return path
