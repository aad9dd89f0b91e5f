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
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from evaluate import json_out
from evaluate.histgen_protocol import (
    MAX_SEQ_LENGTH,
    THRESHOLD,
    Vocabulary,
    histgen_scores,
    most_frequent_report,
    nearest_training_reports,
)
from evaluate.report_grades import coverage, score_grades_against_table
from store.clinical import ClinicalTable
from store.embedding_store import EmbeddingStore
from store.errors import EvaluationError
from store.ids import SlideMatcher, patient_key
from store.jsonl import read_jsonl


@dataclass(frozen=True)
class ReferenceReport:
    text: str
    split: str
    patient: str


def read_reference_sets(path: str | Path, notes: list[str] | None = None) -> dict[str, ReferenceReport]:
    """{report id: reference} from HistGen's JSON (read as the import reads it: exact repeats kept once and
    told in `notes`) or our imported annotations.jsonl."""
    path = Path(path)
    if path.suffix == ".json":
        from train.import_reports import read_histgen, repeats_warning

        reports = read_histgen(path)  # refused as the import refuses it: empty reports, conflicting repeats
        repeats = repeats_warning(path, reports)
        if repeats and notes is not None:
            notes.append(repeats)
        return {r.key: ReferenceReport(r.text, r.split or "", patient_key(r.key)) for r in reports}
    out: dict[str, ReferenceReport] = {}
    line_of: dict[str, int] = {}
    for number, row in read_jsonl(path, EvaluationError):
        if "split" not in row or "report" not in row:
            raise EvaluationError(f"{path}, line {number}: the HistGen protocol needs each reference's \"report\" and "
                                  "\"split\" (HistGen's annotation JSON, or `python -m train.import_reports` output)")
        key = str(row.get("id", row.get("slide"))).strip()
        if not str(row["report"]).strip():  # an empty training report would become the most frequent baseline
            raise EvaluationError(f"{path}, line {number}: {key} has an empty \"report\"; leave the line out, or "
                                  "re-import with `python -m train.import_reports` (which refuses it)")
        reference = ReferenceReport(str(row["report"]), str(row["split"]),
                                    str(row.get("patient_id") or patient_key(key)))
        if key in out and out[key] != reference:
            raise EvaluationError(f"{path}, lines {line_of[key]} and {number}: {key} has two different references "
                                  "(report or split); keep one")
        line_of.setdefault(key, number)
        out[key] = reference
    return out


def duplicate_ids_error(path: str | Path, lines: Mapping[str, list[int]]) -> EvaluationError | None:
    """The refusal of ids that several lines of `path` predict ({id: line numbers}), or None."""
    repeated = {k: v for k, v in lines.items() if len(v) > 1}
    if not repeated:
        return None
    listed = "; ".join(f"{k} (lines {', '.join(map(str, v))})" for k, v in list(repeated.items())[:5])
    more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
    return EvaluationError(f"{path}: {len(repeated)} ids have more than one prediction: {listed}{more}; keep one "
                           "prediction per id")


def read_predictions(path: str | Path) -> dict[str, str]:
    out: dict[str, str] = {}
    lines: dict[str, list[int]] = defaultdict(list)
    for number, row in read_jsonl(path, EvaluationError):
        if "id" not in row or "text" not in row:
            raise EvaluationError(f"{path}, line {number}: a prediction needs \"id\" and \"text\" "
                                  "(what `python -m train.generate` writes)")
        out[str(row["id"])] = str(row["text"])
        lines[str(row["id"])].append(number)
    if (error := duplicate_ids_error(path, lines)) is not None:
        raise error
    if not out:
        raise EvaluationError(f"{path} holds no predictions")
    return out


def prediction_patients(path: str | Path) -> dict[str, str]:
    """{prediction id: patient}: the prediction's "patient_id" (train.generate writes it), else the id's TCGA
    patient, else the id."""
    out = {}
    for _, row in read_jsonl(path, EvaluationError):
        key = next((str(row[k]) for k in ("id", "slide_id", "patient_id") if k in row), None)
        if key is not None:
            patient = str(row.get("patient_id") or key)
            out[key] = patient_key(patient)
    return out


def match_references(references: Mapping[str, ReferenceReport], patient_of: Mapping[str, str], source: str | Path
                     ) -> dict[str, ReferenceReport]:
    """`references` keyed by the slides of `patient_of` (the predicted ones, and the store's) each id matches,
    as the import matches report ids to slides; an id matching none keeps its own key."""

    out = {}
    for slide, key in SlideMatcher(patient_of).rekey(list(references), str(source), EvaluationError).items():
        ref = references[key]
        out[slide] = ReferenceReport(ref.text, ref.split, patient_of.get(slide, ref.patient)) if slide != key else ref
    return out


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
        from train.import_reports import store_patients

        slides = store_patients(store) | slides  # training references matched to store slides: the retrieval baseline
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


def print_benchmark(result: dict[str, Any]) -> None:
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"]
    print(f"HistGen protocol: {result['test_reports']} test reports, vocabulary of "
          f"{result['protocol']['vocabulary_words']} words from {result['protocol']['training_reports']} training "
          f"reports (threshold {result['protocol']['threshold']}, max length {result['protocol']['max_seq_length']})")
    print("  " + f"{'':<48}" + "".join(f"{n:>9}" for n in names))
    rows = {"model": result["model"], **{f"baseline: {k.replace('_', ' ')}": v for k, v in result["baselines"].items()}}
    for label, scores in rows.items():
        print("  " + f"{label:<48}" + "".join(f"{scores[n]:>9.4f}" if n in scores else f"{'-':>9}" for n in names))
    for who, table in (result.get("clinical_correctness") or {}).items():
        for cancer_type, entry in table.items():
            scored = (f"accuracy {entry['accuracy']:.3f}" + (f", QWK {entry['qwk']:.3f}" if "qwk" in entry else "")
                      + f" over {entry['scored']}") if "accuracy" in entry else str(entry["scored"])
            print(f"  grade stated by the {who}, {cancer_type}: coverage {entry['coverage']:.2f} of {entry['reports']}; "
                  f"{scored}")
    for note in result["notes"]:
        print(f"  note: {note}")


def write_benchmark(result: dict[str, Any], out: str | Path, provenance: dict[str, Any]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report_metrics.json"
    path.write_text(json_out.dumps(result | {"provenance": provenance}))
    return path
