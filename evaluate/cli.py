"""`python -m evaluate split|survival ...`: thin commands over the library; nothing here re-encodes."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluate.features import POOLINGS, patient_features
from evaluate.grade import confusion_plot, cross_validate_grade
from evaluate.splits import make_folds, read_split, write_split
from evaluate.survival import HEADS, clinical_covariates, cross_validate, km_plot
from store.cli import run_command
from store.clinical import ENDPOINTS, load_clinical_tables
from store.embedding_store import EmbeddingStore
from store.provenance import provenance


def _data(args: argparse.Namespace):
    store = EmbeddingStore.open(args.store)
    clinical = load_clinical_tables(args.clinical)
    if args.cancer_type:
        clinical = clinical.filter_cancer_type(args.cancer_type)
    return store, patient_features(store, clinical, getattr(args, "pooling", "mean"))


def _folds(args: argparse.Namespace, data) -> dict[str, int]:
    """The split file when given, else folds made here from the seed (stratified by the endpoint's event)."""
    if args.split:
        return read_split(args.split)
    has, _, events = data.endpoint(args.endpoint)
    return make_folds(data.patient_ids, np.where(has, events, False), args.folds, args.seed)


def _write_outputs(out: Path, report: dict, predictions: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(predictions[0]))
        writer.writeheader()
        writer.writerows(predictions)


def cmd_split(args: argparse.Namespace) -> int:
    _, data = _data(args)
    has, _, events = data.endpoint(args.endpoint)
    sites = [c.site or "?" for c in data.clinical] if args.site_preserving else None
    folds = make_folds(data.patient_ids, np.where(has, events, False), args.folds, args.seed, sites)
    write_split(args.out, folds)
    sizes = np.bincount(list(folds.values()))
    print(f"wrote {args.out}: {len(folds)} patients in {args.folds} folds of {sizes.tolist()} patients "
          f"(stratified by {args.endpoint} event{', sites kept apart' if sites else ''}; seed {args.seed})")
    return 0


def cmd_survival(args: argparse.Namespace) -> int:
    store, data = _data(args)
    folds = _folds(args, data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = cross_validate(data, args.endpoint, args.head, folds, args.seed)
    report = {"endpoint": args.endpoint, "head": args.head, "pooling": args.pooling, "summary": result.summary,
              "logrank_p": result.logrank_p, "folds": result.folds, "patients": len(result.predictions),
              "store_fingerprint": store.fingerprint, "re_encoded_tiles": 0}
    mask, covariates = clinical_covariates(data)
    if mask.sum() >= 20:
        baseline = cross_validate(data.subset(mask), args.endpoint, "coxph", folds, args.seed, covariates[mask])
        report["clinical_baseline_age_stage"] = {"summary": baseline.summary, "patients": len(baseline.predictions)}
    report["provenance"] = provenance(vars(args) | {"clinical": [str(c) for c in args.clinical]})
    _write_outputs(out, report, result.predictions)
    km_plot(result, str(out / "km.png"))
    print(f"{args.endpoint} {args.head} ({args.pooling} pooling), {len(result.predictions)} patients, {len(result.folds)} folds:")
    for key, value in result.summary.items():
        print(f"  {key:<10} {value['mean']:.3f} ± {value['std']:.3f}")
    if "clinical_baseline_age_stage" in report:
        base = report["clinical_baseline_age_stage"]["summary"].get("harrell_c")
        if base:
            print(f"  clinical baseline (age + stage CoxPH) harrell_c {base['mean']:.3f} ± {base['std']:.3f}")
    print(f"  log-rank p (held-out risk groups) {result.logrank_p if result.logrank_p is not None else 'n/a'}")
    print(f"wrote {out}/metrics.json, predictions.csv, km.png; re-encoded nothing (slide vectors read from the store)")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    store, data = _data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = cross_validate_grade(data, _folds(args, data), args.seed)
    report = {"label": "grade", "scheme": result.scheme, "classes": result.classes, "summary": result.summary,
              "confusion": result.confusion, "folds": result.folds, "dropped": result.dropped,
              "patients": len(result.predictions), "store_fingerprint": store.fingerprint, "re_encoded_tiles": 0,
              "provenance": provenance(vars(args) | {"clinical": [str(c) for c in args.clinical]})}
    _write_outputs(out, report, result.predictions)
    confusion_plot(result, str(out / "confusion.png"))
    print(f"grade ({result.scheme}: {', '.join(result.classes)}), logistic regression, {len(result.predictions)} patients:")
    for key, value in result.summary.items():
        if "mean" in value:
            print(f"  {key:<18} {value['mean']:.3f} ± {value['std']:.3f}")
    print(f"  chance: majority-class accuracy {result.summary['chance']['majority_class_accuracy']:.3f}, "
          f"balanced accuracy {result.summary['chance']['balanced_accuracy']:.3f}")
    print(f"wrote {out}/metrics.json, predictions.csv, confusion.png; re-encoded nothing")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evaluate.report_metrics import score_reports

    scores = score_reports(args.predictions, args.references)
    report = {"n": scores.n, "caption": scores.caption, "clinical": scores.clinical, "notes": scores.notes,
              "provenance": provenance(vars(args))}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report_metrics.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"{scores.n} generated reports vs references:")
    for key, value in {**scores.caption, **scores.clinical}.items():
        print(f"  {key:<22} {value:.4f}" if isinstance(value, float) else f"  {key:<22} {value}")
    for note in scores.notes:
        print(f"  note: {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate", description="Heads and metrics from the cache.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", required=True)
    common.add_argument("--clinical", required=True, nargs="+", help="clinical table(s): TCGA-CDR, SurvPath, slidecache")
    common.add_argument("--endpoint", default="OS", choices=ENDPOINTS)
    common.add_argument("--cancer-type", help="keep only this cancer type (pan-cancer tables)")
    common.add_argument("--folds", type=int, default=5)
    common.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("split", parents=[common], help="write a patient-level split file (patient_id,fold)")
    p.add_argument("--site-preserving", action="store_true", help="keep each tissue source site in one fold")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("survival", parents=[common], help="cross-validated survival head on stored slide vectors")
    p.add_argument("--head", default="coxnet", choices=list(HEADS))
    p.add_argument("--pooling", default="mean", choices=POOLINGS)
    p.add_argument("--split", help="a split file from `python -m evaluate split` (default: made here from --seed)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_survival)

    p = sub.add_parser("grade", parents=[common], help="cross-validated grade classifier on stored slide vectors")
    p.add_argument("--label", default="grade", choices=["grade"], help="the clinical column to predict")
    p.add_argument("--pooling", default="mean", choices=POOLINGS)
    p.add_argument("--split", help="a split file from `python -m evaluate split`")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("report", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr and clinical correctness of generated reports")
    p.add_argument("--predictions", required=True, help="jsonl: {id, text} per generated report")
    p.add_argument("--references", required=True, help="jsonl: {id, text}, or the InternVL conversation annotations")
    p.add_argument("--out", help="folder for report_metrics.json")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
