"""What `evaluate report` reads: predictions (one per id, what `python -m train.generate` writes) and references
(our annotations.jsonl, HistGen's JSON, any jsonl of id and text), matched to the predicted slides as
`train.import_reports` matches report ids: exactly, by TCGA barcode, a patient id for all its slides."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from slidecache.cohorts.ids import SlideMatcher, patient_key
from slidecache.errors import EvaluationError
from slidecache.jsonl import read_jsonl


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
        from slidecache.cohorts.reports import read_histgen, repeats_warning

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


def ids_and_texts(path: Path, lines: dict[str, list[int]] | None = None) -> dict[str, list[str]]:
    """jsonl lines: {"id"|"slide_id"|"patient_id", "text"|"answer"|"caption"} or InternVL conversations;
    `lines` gets each id's line numbers."""
    out: dict[str, list[str]] = {}
    for number, row in read_jsonl(path, EvaluationError):
        key = next((row[k] for k in ("id", "slide_id", "patient_id") if k in row), None)
        text = next((row[k] for k in ("text", "answer", "caption") if k in row), None)
        if text is None and "conversations" in row:
            text = " ".join(t["value"] for t in row["conversations"] if t.get("from") == "gpt")
        if key is None or text is None:
            raise EvaluationError(f"{path}, line {number}: needs an id (id/slide_id/patient_id) and a text "
                                  "(text/answer/caption, or InternVL conversations)")
        out.setdefault(str(key), []).append(str(text))
        if lines is not None:
            lines.setdefault(str(key), []).append(number)
    return out


def read_references(path: Path, predicted: dict[str, str]) -> dict[str, list[str]]:
    """{slide: reference texts}: the jsonl's or HistGen's JSON's ids matched to the `predicted` slides
    ({id: patient}) as the import matches them."""
    if path.suffix == ".json":  # HistGen's annotation JSON: one reference per slide, read as the import reads it
        return {k: [r.text] for k, r in match_references(read_reference_sets(path), predicted, path).items()}

    references = ids_and_texts(path)
    return {slide: references[key]
            for slide, key in SlideMatcher(predicted).rekey(list(references), str(path), EvaluationError).items()}
