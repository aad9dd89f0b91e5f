"""Import the report datasets users have into annotations, a meta JSON and a train/val/test split.

    python -m train.import_reports --store STORE --histgen annotation.json --out DIR
    python -m train.import_reports --store STORE --reports-csv TCGA_Reports.csv [--split SETS.csv] --out DIR
        [--clinical TABLE ...] [--append-clinical] [--ask-grade-prognosis] [--strict-patients] [--skip-missing]

Sources: HistGen's annotation JSON ({"train"|"val"|"test": [{"id": <slide id>, "report": <text>, ...}]}),
whose split is kept as given; or a CSV of pathology report text per patient or slide (TCGA-Reports:
`patient_filename,text`; other column names with --id-column / --text-column), whose split comes from
--split (a train/val/test file) or is drawn here by patient, 7:1:2 as HistGen's, with --seed.

DIR gets `annotations.jsonl` (InternVL conversations with "slide", "patient_id", "split" and the raw
"report"), `meta.json` naming it, and `split.csv` (slide_id,patient_id,split): training uses only train,
`train.generate` only test (or val), `evaluate report --protocol histgen` scores only test.
A slide id matches the store's exactly, or by its TCGA barcode (the part before the first '.') when that
names one slide there; a patient id matches all its slides (`evaluate report` matches references to
predictions the same way). Slides missing from the store are an error listing them, unless --skip-missing.
Ids lose surrounding spaces; an empty id or report is an error naming the entry (HistGen and CSV alike); a
HistGen entry repeated exactly (same id, report and set) is kept once, with a warning; the same id with
another report or set is an error naming it.
A patient with slides in two sets is counted and warned about; --strict-patients refuses.
With --append-clinical the answer ends with our grade and prognosis sentences from the clinical table
(the prognosis horizon from training patients only).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from slidecache.cli_args import run_command
from slidecache.cohorts.clinical import ENDPOINTS, ClinicalTable, load_clinical_tables
from slidecache.cohorts.ids import SlideMatcher
from slidecache.cohorts.reports import (
    ID_COLUMNS,
    TEXT_COLUMNS,
    ReportRow,
    read_histgen,
    read_report_csv,
    repeats_warning,
)
from slidecache.cohorts.splits import SETS, read_set_split, write_set_split
from slidecache.errors import AnnotationError
from store.embedding_store import EmbeddingStore
from train.annotations import report_text, risk_groups, write_meta

REPORT_QUESTION = "<image>\nWrite the pathology report for this slide."
GRADE_PROGNOSIS_QUESTION = ("<image>\nWrite the pathology report for this slide, stating the tumour grade and "
                            "the prognosis.")
HISTGEN_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


@dataclass
class Imported:
    rows: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    patients_in_two_sets: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def draw_patient_split(patients: Sequence[str], seed: int) -> dict[str, str]:
    """Patients shuffled with `seed` and cut 7:1:2 into train / val / test (HistGen's proportions)."""
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    n_train = round(len(order) * HISTGEN_FRACTIONS["train"])
    n_val = round(len(order) * HISTGEN_FRACTIONS["val"])
    return {p: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, p in enumerate(order)}


def import_reports(store: EmbeddingStore, reports: list[ReportRow], sets: dict[str, str] | None = None,
                   seed: int = 0, question: str = REPORT_QUESTION, clinical: ClinicalTable | None = None,
                   endpoint: str = "OS", skip_missing: bool = False, strict_patients: bool = False) -> Imported:
    """Annotation rows for `reports`. A report's set is its own (HistGen), else `sets` {slide: set}, else
    drawn by patient. `clinical`: append our grade and prognosis sentences."""
    matcher = SlideMatcher(store.slide_patients())
    patient_of = matcher.patient_of
    result = Imported()
    placed: list[tuple[ReportRow, list[str]]] = []
    for report in reports:
        slides = matcher.slides_for(report.key)
        if slides:
            placed.append((report, slides))
        else:
            result.missing.append(report.key)
    if result.missing and not skip_missing:
        raise AnnotationError(f"{len(result.missing)} of {len(reports)} reports name slides the store {store.url} does "
                              f"not hold (e.g. {result.missing[:5]}); extract them, or pass --skip-missing to leave "
                              "them out")
    drawn = (draw_patient_split(sorted({patient_of[s] for _, slides in placed for s in slides}), seed)
             if sets is None and any(r.split is None for r, _ in placed) else {})
    assigned: list[tuple[ReportRow, str, str]] = []
    source_of: dict[str, str] = {}
    for report, slides in placed:
        for slide in slides:
            if slide in source_of:
                raise AnnotationError(f"{report.where}: slide {slide} already has a report from {source_of[slide]}")
            source_of[slide] = report.where
            split = report.split or (sets.get(slide) if sets is not None else drawn[patient_of[slide]])
            if split is None:
                raise AnnotationError(f"{report.where}: slide {slide} is not in the --split file; add it or leave it out")
            assigned.append((report, slide, split))
    sets_of_patient: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for report, slide, split in assigned:
        sets_of_patient[patient_of[slide]].append((slide, split))
    result.patients_in_two_sets = {p: rows for p, rows in sorted(sets_of_patient.items()) if len({s for _, s in rows}) > 1}
    if result.patients_in_two_sets and strict_patients:
        patient, rows = next(iter(result.patients_in_two_sets.items()))
        (a, sa), (b, sb) = next(((x, y) for x in rows for y in rows if x[1] != y[1]))
        raise AnnotationError(f"{len(result.patients_in_two_sets)} patients have slides in two sets (--strict-patients); "
                              f"e.g. {patient}: slide {a} in {sa}, slide {b} in {sb}")
    groups: dict[str, str] = {}
    if clinical is not None:
        training = {patient_of[s] for _, s, split in assigned if split == "train"}
        groups, _ = risk_groups(clinical, endpoint, training)
    for report, slide, split in assigned:
        patient = patient_of[slide]
        answer = report.text.strip()
        if clinical is not None:
            record = clinical.patients.get(patient)
            answer = report_text(record.grade if record else None, groups.get(patient), answer)
        result.rows.append({"id": slide, "slide": slide, "patient_id": patient, "split": split, "report": report.text,
                            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    return result


def write_import(result: Imported, out: str | Path) -> dict[str, Path]:
    """annotations.jsonl, meta.json and split.csv in `out`, each written whole or not at all."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    annotations = out / "annotations.jsonl"
    partial = out / "annotations.jsonl.partial"
    with open(partial, "w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row) + "\n")
    partial.replace(annotations)
    write_set_split(out / "split.csv", [(r["slide"], r["patient_id"], r["split"]) for r in result.rows])
    meta = write_meta(out / "meta.json", annotations, name="slide_reports")
    return {"annotations": annotations, "meta": meta, "split": out / "split.csv"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.import_reports", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--store", required=True, help="the embedding store holding the slides")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--histgen", help="HistGen's annotation JSON (its split kept)")
    source.add_argument("--reports-csv", help="CSV of report text per patient or slide")
    parser.add_argument("--id-column", help="--reports-csv: the id column (default: the first of %s)" % ", ".join(ID_COLUMNS))
    parser.add_argument("--text-column", help="--reports-csv: the text column (default: the first of %s)"
                        % ", ".join(TEXT_COLUMNS))
    parser.add_argument("--split", help="--reports-csv: a train/val/test split file (default: drawn 7:1:2 by patient)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a drawn split")
    parser.add_argument("--ask-grade-prognosis", action="store_true", help="the question asks for grade and prognosis")
    parser.add_argument("--clinical", nargs="+", help="clinical table(s), for --append-clinical")
    parser.add_argument("--append-clinical", action="store_true",
                        help="end each answer with the grade and prognosis sentences from --clinical")
    parser.add_argument("--endpoint", default="OS", choices=ENDPOINTS, help="the endpoint of the prognosis sentence")
    parser.add_argument("--skip-missing", action="store_true", help="leave out reports whose slides the store lacks")
    parser.add_argument("--strict-patients", action="store_true", help="refuse a patient with slides in two sets")
    parser.add_argument("--out", required=True, help="folder for annotations.jsonl, meta.json, split.csv")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.append_clinical and not args.clinical:
        raise AnnotationError("--append-clinical needs --clinical TABLE: the grade and prognosis come from it")
    if args.split and args.histgen:
        raise AnnotationError("--split is for --reports-csv: HistGen's JSON carries its own split, kept as given")
    reports = read_histgen(args.histgen) if args.histgen else read_report_csv(args.reports_csv, args.id_column,
                                                                              args.text_column)
    result = import_reports(EmbeddingStore.open(args.store), reports, read_set_split(args.split) if args.split else None,
                            args.seed, GRADE_PROGNOSIS_QUESTION if args.ask_grade_prognosis else REPORT_QUESTION,
                            load_clinical_tables(args.clinical) if args.append_clinical else None, args.endpoint,
                            args.skip_missing, args.strict_patients)
    paths = write_import(result, args.out)
    counts = {s: sum(r["split"] == s for r in result.rows) for s in SETS}
    print(f"wrote {len(result.rows)} annotations ({', '.join(f'{s} {n}' for s, n in counts.items())}) to "
          f"{paths['annotations']}; meta {paths['meta']}; split {paths['split']}")
    if result.missing:
        print(f"skipped {len(result.missing)} reports whose slides the store lacks, e.g. {result.missing[:5]}")
    repeats = repeats_warning(args.histgen, reports) if args.histgen else None
    if repeats:
        print(f"warning: {repeats}")
    if result.patients_in_two_sets:
        patient, rows = next(iter(result.patients_in_two_sets.items()))
        print(f"warning: {len(result.patients_in_two_sets)} patients have slides in two sets (kept as given), e.g. "
              f"{patient}: {rows}; --strict-patients refuses such a split")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
