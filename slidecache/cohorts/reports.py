"""The report datasets users bring, read one way for every stage: HistGen's annotation JSON (its sets kept)
and CSVs of report text per slide or patient (TCGA-Reports). `train.import_reports` turns them into
annotations; `evaluate report --references` matches them to predictions."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from slidecache.cohorts.splits import SETS
from slidecache.errors import AnnotationError

ID_COLUMNS = ("slide_id", "patient_filename", "patient_id", "case_id", "case_submitter_id", "bcr_patient_barcode", "id")
TEXT_COLUMNS = ("text", "report", "report_text", "pathology_report")


@dataclass
class ReportRow:
    """One report as the source gives it: an id (slide or patient), its text, its set if the source has one."""
    key: str
    text: str
    where: str  # file and entry / row, for messages
    split: str | None = None
    repeated_at: list[str] = field(default_factory=list)  # exact repeats of this entry left out (HistGen)


def read_histgen(path: str | Path) -> list[ReportRow]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: not a readable HistGen annotation JSON ({e})") from None
    if not isinstance(data, dict) or not set(data) & set(SETS):
        raise AnnotationError(f"{path}: expected HistGen's {{\"train\": [...], \"val\": [...], \"test\": [...]}}")
    rows: list[ReportRow] = []
    first: dict[str, ReportRow] = {}
    for split in SETS:
        for i, entry in enumerate(data.get(split) or []):
            where = f"{path}, {split}[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(entry.get("report"), str):
                raise AnnotationError(f"{where}: each entry needs a string \"id\" (the slide) and \"report\"")
            key, text = entry["id"].strip(), entry["report"]
            if not key or not text.strip():  # as the CSV import: an empty report would train as an empty target
                raise AnnotationError(f"{where}: empty {'report' if key else 'id'}{f' of slide {key}' if key else ''}; "
                                      "give it, or leave the entry out")
            if entry.get("split", split) != split:
                raise AnnotationError(f"{where}: says \"split\": {entry['split']!r} but sits under {split!r}")
            earlier = first.get(key)
            if earlier is not None:
                if earlier.text.strip() != text.strip():
                    raise AnnotationError(f"{where}: slide {key} already has another report at {earlier.where}; "
                                          "keep the right one")
                if earlier.split != split:
                    raise AnnotationError(f"{where}: slide {key} is also in {earlier.split} at {earlier.where}; "
                                          "keep it in one set")
                earlier.repeated_at.append(where)  # HistGen's published list repeats entries: kept once
                continue
            first[key] = ReportRow(key, text, where, split)
            rows.append(first[key])
    return rows


def repeats_warning(path: str | Path, reports: list[ReportRow]) -> str | None:
    """The warning for exact repeats read_histgen left out, or None."""
    repeated = [r for r in reports if r.repeated_at]
    if not repeated:
        return None
    n = sum(len(r.repeated_at) for r in repeated)
    return (f"{n} repeated entries of {path} left out (same slide, report and set), e.g. {repeated[0].key} at "
            f"{repeated[0].repeated_at[0]} repeats {repeated[0].where}")


def read_report_csv(path: str | Path, id_column: str | None = None, text_column: str | None = None) -> list[ReportRow]:
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        key = id_column or next((c for c in ID_COLUMNS if c in fields), None)
        text = text_column or next((c for c in TEXT_COLUMNS if c in fields), None)
        for name, chosen, options in (("id", key, ID_COLUMNS), ("text", text, TEXT_COLUMNS)):
            if chosen is None or chosen not in fields:
                raise AnnotationError(f"{path}: no {name} column (looked for {', '.join(options)}; found {fields}); "
                                      f"name it with --{name}-column")
        rows, seen = [], {}
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            value = (row[key] or "").strip()
            if not value or not (row[text] or "").strip():
                raise AnnotationError(f"{where}: empty {key if not value else text}; give it, or leave the row out")
            if value in seen:
                raise AnnotationError(f"{where}: {value} already has a report at {seen[value]}")
            seen[value] = where
            rows.append(ReportRow(value, row[text], where))
    return rows
