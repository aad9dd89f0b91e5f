"""Patient-level folds: stratified by event, optionally site-preserving; one split file for every stage.

The file is a CSV `patient_id,fold`. Training, report generation and every head read the same file, so
no report is scored and no head is tested on a patient the model trained on.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from store.errors import EvaluationError


def make_folds(patient_ids: Sequence[str], events: Sequence[bool] | None = None, k: int = 5, seed: int = 0,
               sites: Sequence[str] | None = None) -> dict[str, int]:
    """{patient_id: fold}. With `sites`, all patients of a tissue source site share a fold."""
    n = len(patient_ids)
    if len(set(patient_ids)) != n:
        raise EvaluationError("patient ids must be unique: a patient's slides are pooled before splitting")
    if k < 2 or n < k:
        raise EvaluationError(f"cannot make {k} folds from {n} patients")
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


def write_split(path: str | Path, folds: dict[str, int]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "fold"])
        for pid in sorted(folds):
            writer.writerow([pid, folds[pid]])
    return path


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
