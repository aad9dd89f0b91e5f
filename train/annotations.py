"""Report annotations from a clinical table (and optional report texts): InternVL conversation jsonl with
`"slide"`, plus the meta JSON that names it. For the demo and for TCGA.

The answer states what the table knows: "Tumour grade: G2." and "Prognosis: high risk.". Prognosis has three
ordered groups by default, from two horizons at the tertiles of the event times (the uncensored times, as
SurvPath and our discrete-time head bin them): high when the endpoint's event came by the first horizon,
intermediate when it came between the two, low when the patient was followed past the second; a patient
censored before the second horizon has no stated prognosis. `--risk-groups 2` keeps one horizon at the
median observed time: high (event by it) or low (followed past it). Three groups, because a stated risk is
scored by its C-index and two groups cap it: on the demo's held-out fold a perfect reader of the slide
stating two groups reaches C 0.705, three 0.84. Event times rather than all observed times, because a
horizon among the censoring times leaves many patients without a stated prognosis (the demo's training
folds: 7 of 64 at the observed-time tertiles, 1 at the event-time tertiles), and a reporter taught to omit
the prognosis omits it for held-out patients too. The horizons come from the whole cohort, or, with
`--split FILE --fold K`, from the training patients only (the held-out fold must not shape its own labels).
A report text given for the slide or patient comes first.

    python -m train.annotations --store STORE --clinical TABLE [--reports reports.jsonl] [--endpoint OS]
        [--split splits.csv --fold 0] [--risk-groups 3] --out annotations.jsonl [--meta meta.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from slidecache.cli_args import run_command
from slidecache.cohorts.clinical import ENDPOINTS, ClinicalTable, load_clinical_tables
from slidecache.cohorts.ids import patient_key
from slidecache.errors import AnnotationError
from slidecache.jsonl import read_jsonl
from store.embedding_store import EmbeddingStore

QUESTION = "<image>\nWrite the pathology report for this slide, stating the tumour grade and the prognosis."


RISK_GROUPS = {2: ("high", "low"), 3: ("high", "intermediate", "low")}


def risk_groups(clinical: ClinicalTable, endpoint: str, horizon_patients: Collection[str] | None = None,
                levels: int = 3) -> tuple[dict[str, str], list[float]]:
    """({patient: 'high' | 'intermediate' | 'low'}, horizons in days), from `horizon_patients` (the training
    patients when a split is given), else every patient: the tertiles of their event times for three groups,
    the median of their observed times for two."""
    if levels not in RISK_GROUPS:
        raise AnnotationError(f"{levels} risk groups: choose 2 (high, low) or 3 (high, intermediate, low)")
    have = {pid: c.endpoints[endpoint] for pid, c in clinical.patients.items() if endpoint in c.endpoints}
    if not have:
        raise AnnotationError(f"{clinical.path}: no patient has {endpoint}")
    basis = have if horizon_patients is None else {p: o for p, o in have.items() if p in horizon_patients}
    if not basis:
        raise AnnotationError(f"{clinical.path}: none of the {len(horizon_patients or [])} training patients has "
                              f"{endpoint}: no prognosis horizon can be set")
    if levels == 2:
        horizons = [float(np.median([o.time_days for o in basis.values()]))]
    else:
        events = [o.time_days for o in basis.values() if o.event]
        if not events:
            raise AnnotationError(f"{clinical.path}: no {endpoint} event among the horizon patients: three prognosis "
                                  "groups need event times (use --risk-groups 2)")
        horizons = [float(np.quantile(events, q)) for q in (1 / 3, 2 / 3)]
    first, last = horizons[0], horizons[-1]
    groups = {}
    for pid, outcome in have.items():
        if outcome.event and outcome.time_days <= first:
            groups[pid] = "high"
        elif outcome.event and outcome.time_days <= last:
            groups[pid] = "intermediate"
        elif outcome.time_days > last:
            groups[pid] = "low"
    return groups, horizons


def report_text(grade: str | None, risk: str | None, prefix: str = "") -> str:
    parts = [prefix.strip()] if prefix.strip() else []
    if grade:
        parts.append(f"Tumour grade: {grade}.")
    if risk:
        parts.append(f"Prognosis: {risk} risk.")
    return " ".join(parts)


def _read_reports(path: Path) -> dict[str, str]:
    texts = {}
    for number, row in read_jsonl(path, AnnotationError):
        key = next((str(row[k]) for k in ("slide_id", "patient_id", "id") if k in row), None)
        if key is None or "text" not in row:
            raise AnnotationError(f"{path}, line {number}: expected {{\"slide_id\"|\"patient_id\": ..., \"text\": ...}}")
        texts[key] = str(row["text"])
    return texts


def write_annotations(store: EmbeddingStore, clinical: ClinicalTable, out: str | Path, endpoint: str = "OS",
                      reports: str | Path | None = None, training_patients: Collection[str] | None = None,
                      levels: int = 3) -> dict[str, Any]:
    """`training_patients`: set the prognosis horizons from these patients only (the split's training folds)."""
    if endpoint not in ENDPOINTS:
        raise AnnotationError(f"unknown endpoint {endpoint!r}; choose one of {', '.join(ENDPOINTS)}")
    groups, horizons = risk_groups(clinical, endpoint, training_patients, levels)
    texts = _read_reports(Path(reports)) if reports else {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = no_patient = nothing = 0
    stated = dict.fromkeys((*RISK_GROUPS[levels], "none"), 0)  # slides per stated prognosis group
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for slide_id in store.slide_ids():
            slide = store.slide(slide_id)
            patient = patient_key(slide.patient_id)
            record = clinical.patients.get(patient)
            if record is None or not slide.n_tiles:
                no_patient += 1
                continue
            text = report_text(record.grade, groups.get(patient), texts.get(slide_id, texts.get(patient, "")))
            if not text:
                nothing += 1
                continue
            stated[groups.get(patient, "none")] += 1
            row = {"id": slide_id, "slide": slide_id, "patient_id": patient,
                   "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": text}]}
            f.write(json.dumps(row) + "\n")
            written += 1
    partial.replace(out)  # never a half-written annotation file
    return {"written": written, "slides_without_patient": no_patient, "nothing_to_state": nothing,
            "risk_groups": levels, "risk_horizons_days": horizons, "slides_per_group": stated,
            "risk_horizon_from": "all patients" if training_patients is None else f"{len(training_patients)} training patients"}


def training_patients(split: str | Path, fold: int) -> set[str]:
    """The patients of a split file outside the held-out fold."""
    from slidecache.cohorts.splits import read_split

    folds = read_split(split)
    if fold not in set(folds.values()):
        raise AnnotationError(f"{split}: no fold {fold} (folds {sorted(set(folds.values()))})")
    return {p for p, f in folds.items() if f != fold}


def write_meta(meta: str | Path, annotation: str | Path, name: str = "slide_reports") -> Path:
    meta = Path(meta)
    meta.parent.mkdir(parents=True, exist_ok=True)
    entry = {"root": "", "annotation": str(Path(annotation).resolve()), "data_augment": False, "repeat_time": 1,
             "length": sum(1 for line in open(annotation, encoding="utf-8") if line.strip())}
    meta.write_text(json.dumps({name: entry}, indent=2))
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.annotations", description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--clinical", required=True, nargs="+")
    parser.add_argument("--endpoint", default="OS", choices=ENDPOINTS)
    parser.add_argument("--reports", help="jsonl of {slide_id|patient_id, text}: report texts to start answers with")
    parser.add_argument("--split", help="patient split file: the prognosis horizon comes from the training folds only")
    parser.add_argument("--fold", type=int, default=-1, help="with --split: the held-out fold")
    parser.add_argument("--risk-groups", type=int, default=3, choices=sorted(RISK_GROUPS),
                        help="prognosis groups: 3 (high, intermediate, low; horizons at the tertiles of the event "
                             "times) or 2 (high, low; at the median observed time)")
    parser.add_argument("--out", required=True, help="annotation jsonl to write")
    parser.add_argument("--meta", help="also write an InternVL meta JSON naming it")
    parser.set_defaults(func=_run)
    return run_command(parser, argv)


def _run(args: argparse.Namespace) -> int:
    if args.split and args.fold < 0:
        raise AnnotationError("--split needs --fold K: the held-out fold, whose patients do not set the horizon")
    train_patients = training_patients(args.split, args.fold) if args.split else None
    counts = write_annotations(EmbeddingStore.open(args.store), load_clinical_tables(args.clinical), args.out,
                               args.endpoint, args.reports, train_patients, args.risk_groups)
    if args.meta:
        write_meta(args.meta, args.out)
    horizons = " and ".join(f"{h:.0f}" for h in counts["risk_horizons_days"])
    print(f"wrote {counts['written']} annotations to {args.out} ({counts['risk_groups']} prognosis groups, "
          f"horizon{'s' if len(counts['risk_horizons_days']) > 1 else ''} {horizons} days, from "
          f"{counts['risk_horizon_from']}; {counts['slides_without_patient']} slides without a clinical record "
          "skipped)"
          + (f"; meta {args.meta}" if args.meta else ""))
    groups = counts["slides_per_group"]
    print("slides per stated prognosis: " + ", ".join(f"{name} {n}" for name, n in groups.items()))
    if sum(n > 0 for name, n in groups.items() if name != "none") < 2:
        print("warning: fewer than two prognosis groups are stated: no model can learn, and no C-index can score, "
              f"a risk from these labels (does the table hold {args.endpoint} events?)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
