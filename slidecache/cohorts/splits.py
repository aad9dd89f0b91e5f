"""Patient-level folds: stratified by event, optionally site-preserving; one split file for every stage.

The file is a CSV `patient_id,fold`. Training, report generation and every head read the same file, so
no report is scored and no head is tested on a patient the model trained on.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from slidecache.cohorts.ids import patient_key
from slidecache.errors import EvaluationError


def make_folds(patient_ids: Sequence[str], events: Sequence[bool] | None = None, k: int = 5, seed: int = 0,
               sites: Sequence[str] | None = None) -> dict[str, int]:
    """{patient_id: fold}. With `sites`, all patients of a tissue source site share a fold."""
    n = len(patient_ids)
    if len(set(patient_ids)) != n:
        raise EvaluationError("patient ids must be unique: a patient's slides are pooled before splitting")
    if k < 2 or n < k:
        raise EvaluationError(f"--folds {k}: cannot make {k} folds from {n} patients; give --folds between 2 and "
                              f"{max(n, 2)}")
    y = np.asarray(events if events is not None else np.zeros(n), dtype=int)
    counts = np.bincount(y, minlength=2)
    if events is not None and 0 < counts.min() < k:
        raise EvaluationError(f"only {counts.min()} patients in the smaller event class: cannot stratify {k} folds")
    x = np.zeros((n, 1))
    if sites is not None:
        groups = np.asarray(sites)
        if len(set(groups)) < k:
            raise EvaluationError(f"only {len(set(groups))} sites: cannot keep sites apart in {k} folds")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(x, y, groups)
    else:
        parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y)
    folds = {}
    for fold, (_, test) in enumerate(parts):
        for i in test:
            folds[patient_ids[i]] = fold
    return folds


def _write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A split file written whole or not at all (a partial file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    partial.replace(path)
    return path


def write_split(path: str | Path, folds: dict[str, int]) -> Path:
    return _write_csv(path, ("patient_id", "fold"), [(pid, folds[pid]) for pid in sorted(folds)])


def read_split(path: str | Path) -> dict[str, int]:
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"patient_id", "fold"} <= set(reader.fieldnames):
            raise EvaluationError(f"{path}: a split file needs columns patient_id,fold (write one with `python -m evaluate split`)")
        folds = {}
        for row in reader:
            try:
                fold = int(row["fold"])
            except ValueError:
                raise EvaluationError(f"{path}, row {reader.line_num}: fold {row['fold']!r} is not an integer") from None
            if row["patient_id"] in folds:
                raise EvaluationError(f"{path}, row {reader.line_num}: patient {row['patient_id']} appears twice")
            folds[row["patient_id"]] = fold
    return folds


HELD_OUT_COLUMNS = ("test", "val")


def _published_sets(path: Path) -> dict[str, list[str]]:
    """{column: ids} from a CLAM/SurvPath split CSV: wide (`,train,val[,test]`, one id list per column) or
    long (an id column and a `split` column holding train/val/test)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "train" in fields:
        return {c: [r[c] for r in rows if r.get(c)] for c in fields if c in ("train", *HELD_OUT_COLUMNS)}
    if "split" in fields:
        id_col = next((c for c in ("case_id", "patient_id", "slide_id") if c in fields), None)
        if id_col:
            sets: dict[str, list[str]] = {}
            for r in rows:
                sets.setdefault(r["split"].lower(), []).append(r[id_col])
            return sets
    raise EvaluationError(f"{path}: not a published split (expected CLAM/SurvPath columns train,val[,test], or "
                          f"case_id|patient_id|slide_id with a split column); found columns {fields}")


def import_published_splits(paths: Sequence[str | Path], patient_of: Callable[[str], str] | None = None) -> dict[str, int]:
    """One published split file per fold (splits_0.csv, splits_1.csv, ...) → {patient_id: fold}.

    Fold k's held-out patients are file k's `test` column (or `val` where there is no test set). Ids are
    case ids or slide ids; `patient_of` maps an id to its patient (default: TCGA barcodes cut to the
    patient, other ids kept). A patient held out by two files, or in both the training and held-out sets
    of one file (a slide-level split that leaks patients), is an error.
    """
    to_patient = patient_of or patient_key
    folds: dict[str, int] = {}
    source: dict[str, Path] = {}
    for fold, raw in enumerate(paths):
        path = Path(raw)
        if not path.is_file():
            raise EvaluationError(f"published split file {path} does not exist")
        sets = _published_sets(path)
        column = next((c for c in HELD_OUT_COLUMNS if sets.get(c)), None)
        if column is None:
            raise EvaluationError(f"{path}: no test or val ids: nothing is held out in this fold")
        held_out = {to_patient(i) for i in sets[column]}
        leaked = held_out & {to_patient(i) for i in sets.get("train", [])}
        if leaked:
            raise EvaluationError(f"{path}: {len(leaked)} patients are in both train and {column} "
                                  f"(e.g. {sorted(leaked)[:3]}): a slide-level split; use patient-level folds")
        for patient in sorted(held_out):
            if patient in folds:
                raise EvaluationError(f"patient {patient} is held out by both {source[patient]} and {path}: "
                                      "these files are not the folds of one cross-validation")
            folds[patient], source[patient] = fold, path
    return folds


# Train / validation / test splits, kept per slide as a benchmark publishes them (HistGen: 7:1:2).
SETS = ("train", "val", "test")
SET_SPLIT_COLUMNS = ("slide_id", "patient_id", "split")


def is_set_split(path: str | Path) -> bool:
    """Whether a split file names train/val/test sets (slide_id,patient_id,split) rather than folds."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return "split" in [c.strip() for c in header]


def write_set_split(path: str | Path, rows: Sequence[tuple[str, str, str]]) -> Path:
    """rows: (slide_id, patient_id, split); written sorted by slide."""
    return _write_csv(path, SET_SPLIT_COLUMNS, sorted(rows))


def read_set_split(path: str | Path) -> dict[str, str]:
    """{slide_id: 'train' | 'val' | 'test'} from a set split file."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"slide_id", "split"} <= set(reader.fieldnames):
            raise EvaluationError(f"{path}: a train/val/test split file needs columns {','.join(SET_SPLIT_COLUMNS)} "
                                  "(write one with `python -m train.import_reports`)")
        sets: dict[str, str] = {}
        for row in reader:
            name = (row["split"] or "").strip().lower()
            if name not in SETS:
                raise EvaluationError(f"{path}, row {reader.line_num}: split {row['split']!r} is not one of {', '.join(SETS)}")
            if row["slide_id"] in sets:
                raise EvaluationError(f"{path}, row {reader.line_num}: slide {row['slide_id']} appears twice")
            sets[row["slide_id"]] = name
    return sets
