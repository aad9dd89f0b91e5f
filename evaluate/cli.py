"""`python -m evaluate split|import-split|survival|grade|sweep|report`: thin commands over the library.

Nothing here imports the encoder: slide vectors and tile bags are read from the store."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluate.abmil import TrainSettings, load_bags
from evaluate.features import POOLINGS, PatientData, patient_features
from evaluate.grade import GRADE_HEADS, confusion_plot, cross_validate_grade, refit_grade_on_all
from evaluate.survival import BAG_HEADS, HEADS, clinical_covariates, cross_validate, km_plot, refit_on_all
from slidecache.cli_args import ArgumentParser, run_command
from slidecache.cohorts.clinical import ENDPOINTS, load_clinical_tables
from slidecache.cohorts.splits import import_published_splits, make_folds, read_split, write_split
from slidecache.errors import ClinicalTableError, EvaluationError
from slidecache.heads.saved import check_savable, save_grade_head, save_survival_head
from slidecache.json_out import dumps
from slidecache.labels import distinct_labels
from slidecache.provenance import encoder_modules_loaded, provenance
from store.embedding_store import EmbeddingStore


def _data(args: argparse.Namespace, endpoint: str | None = None):
    store = EmbeddingStore.open(args.store)
    clinical = load_clinical_tables(args.clinical)
    if args.cancer_type:
        clinical = clinical.filter_cancer_type(args.cancer_type)
    if endpoint and (why := clinical.absent_endpoint(endpoint)):  # the table's columns, not "no patient has OS"
        raise ClinicalTableError(why)
    return store, patient_features(store, clinical, getattr(args, "pooling", "mean"))


def _folds(args: argparse.Namespace, data: PatientData, endpoint: str | None = None) -> dict[str, int]:
    """The split file when given, else folds made here from the seed (stratified by the endpoint's event)."""
    if args.split:
        return read_split(args.split)
    if endpoint is None:
        return make_folds(data.patient_ids, None, args.folds, args.seed)
    has, _, events = data.endpoint(endpoint)
    return make_folds(data.patient_ids, np.where(has, events, False), args.folds, args.seed)


def _settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, ties=args.ties,
                         device=args.device)


def _bags(args: argparse.Namespace, store: EmbeddingStore, data: PatientData) -> np.ndarray:
    bags = load_bags(store, data.slides, args.max_tiles, args.seed)
    tiles = sum(len(b) for b in bags)
    print(f"read {tiles:,} tiles from the store for {len(bags)} patients (at most {args.max_tiles} per patient)")
    return bags


def _heatmap_slides(requested: list[str], data: PatientData, scores: dict[str, float]) -> list[str]:
    """`auto` stands for the first slide of the held-out patients with the highest and the lowest score."""
    ranked = sorted(scores, key=scores.get)
    slides_of = dict(zip(data.patient_ids, data.slides))
    chosen: list[str] = []
    for item in requested:
        chosen += [slides_of[p][0] for p in (ranked[-1], ranked[0])] if item == "auto" else [item]
    return list(dict.fromkeys(chosen))


def _draw_heatmaps(args: argparse.Namespace, store: EmbeddingStore, data: PatientData, folds: dict[str, int],
                   models: dict[int, object], scores: dict[str, float], out: Path) -> list[dict]:
    from evaluate.heatmaps import draw_heatmaps

    drawn = draw_heatmaps(store, _heatmap_slides(args.heatmaps, data, scores), folds, models, out)
    for d in drawn:
        print(f"  heatmap {d['png']} ({d['tiles']} tiles, fold {d['fold']}"
              f"{'' if d['thumbnail'] else ', no stored thumbnail: drawn on a blank canvas'})")
    return drawn


def format_summary(value: dict) -> str:
    """'0.812 ± 0.030', with the folds that could not be scored, or 'not computed: reason'."""
    missing = value.get("not_computed_in_folds") or {}
    if value.get("mean") is None:
        reasons = sorted(set(missing.values()))
        return "not computed: " + ("; ".join(reasons[:2]) or "no fold could be scored")
    text = f"{value['mean']:.3f} ± {value['std']:.3f}"
    if missing:
        fold, reason = next(iter(missing.items()))
        text += f"  ({value['folds']} folds; not in {len(missing)}, e.g. fold {fold}: {reason})"
    return text


BASELINE_MIN_PATIENTS = 20


def _clinical_baseline(data: PatientData, endpoint: str, folds: dict[str, int], seed: int) -> dict:
    """An age + stage CoxPH on the same folds, or why there is none: recorded beside the results, never instead."""
    mask, covariates = clinical_covariates(data)
    if mask.sum() < BASELINE_MIN_PATIENTS:
        return {"error": f"{int(mask.sum())} patients have both age and stage (at least {BASELINE_MIN_PATIENTS} needed)"}
    try:
        baseline = cross_validate(data.subset(mask), endpoint, "coxph", folds, seed, covariates[mask])
    except EvaluationError as e:
        return {"error": str(e)}
    return {"summary": baseline.summary, "patients": len(baseline.predictions)}


def _write_outputs(out: Path, report: dict, predictions: list[dict]) -> None:
    (out / "metrics.json").write_text(dumps(report))  # strict JSON: a non-finite float is null, never NaN
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
    store, data = _data(args, args.endpoint)
    folds = _folds(args, data, args.endpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = args.head in BAG_HEADS
    if args.heatmaps and not tiles:
        raise EvaluationError("--heatmaps draws ABMIL attention: use --head abmil-cox or abmil-nll")
    if args.save_head:
        check_savable("survival", args.head)
    bags = _bags(args, store, data) if tiles else None
    result = cross_validate(data, args.endpoint, args.head, folds, args.seed, bags, _settings(args))
    report = {"endpoint": args.endpoint, "head": args.head, "pooling": "tiles" if tiles else args.pooling,
              "summary": result.summary,
              "logrank_p": result.logrank_p, "folds": result.folds, "patients": len(result.predictions),
              "store_fingerprint": store.fingerprint, "re_encoded_tiles": 0,
              "clinical_baseline_age_stage": _clinical_baseline(data, args.endpoint, folds, args.seed)}
    report["provenance"] = provenance(vars(args) | {"clinical": [str(c) for c in args.clinical]})
    if tiles:
        report["abmil"] = vars(_settings(args)) | {"max_tiles": args.max_tiles}
    if args.heatmaps:
        models = {fold: head.model for fold, head in result.models.items()}
        risks = {p["patient_id"]: p["risk"] for p in result.predictions}
        report["heatmaps"] = _draw_heatmaps(args, store, data, folds, models, risks, out)
    if args.save_head:
        fitted, inputs = refit_on_all(data, args.endpoint, args.head, args.seed, bags, _settings(args))
        report["saved_head"] = str(save_survival_head(args.save_head, args.head, fitted, inputs, args.endpoint,
                                                      report["pooling"], store.fingerprint, result.summary))
    _write_outputs(out, report, result.predictions)
    km_plot(result, str(out / "km.png"))
    print(f"{args.endpoint} {args.head} ({report['pooling']}), {len(result.predictions)} patients, {len(result.folds)} folds:")
    for key, value in result.summary.items():
        print(f"  {key:<10} {format_summary(value)}")
    baseline = report["clinical_baseline_age_stage"]
    if "summary" in baseline:
        print(f"  clinical baseline (age + stage CoxPH) harrell_c {format_summary(baseline['summary']['harrell_c'])}")
    else:
        print(f"  clinical baseline (age + stage CoxPH): {baseline['error']}")
    print(f"  log-rank p (held-out risk groups) {result.logrank_p if result.logrank_p is not None else 'n/a'}")
    source = "tile embeddings" if tiles else "slide vectors"
    print(f"wrote {out}/metrics.json, predictions.csv, km.png; re-encoded nothing ({source} read from the store)")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    store, data = _data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folds = _folds(args, data)
    tiles = args.head == "abmil"
    if args.heatmaps and not tiles:
        raise EvaluationError("--heatmaps draws ABMIL attention: use --head abmil")
    if args.save_head:
        check_savable("grade", args.head)
    bags = _bags(args, store, data) if tiles else None
    result = cross_validate_grade(data, folds, args.seed, head=args.head, features=bags, settings=_settings(args))
    report = {"label": "grade", "head": args.head, "scheme": result.scheme, "classes": result.classes, "summary": result.summary,
              "confusion": result.confusion, "folds": result.folds, "dropped": result.dropped,
              "patients": len(result.predictions), "store_fingerprint": store.fingerprint, "re_encoded_tiles": 0,
              "provenance": provenance(vars(args) | {"clinical": [str(c) for c in args.clinical]})}
    if args.heatmaps:
        top = f"p_{result.classes[-1]}"  # the highest grade's probability
        scores = {p["patient_id"]: p[top] for p in result.predictions}
        report["heatmaps"] = _draw_heatmaps(args, store, data, folds, result.models, scores, out)
    if args.save_head:
        model, inputs, classes, scheme = refit_grade_on_all(data, args.seed, head=args.head, features=bags,
                                                            settings=_settings(args))
        report["saved_head"] = str(save_grade_head(args.save_head, args.head, model, inputs, classes, scheme,
                                                   "tiles" if tiles else args.pooling, store.fingerprint, result.summary))
    _write_outputs(out, report, result.predictions)
    confusion_plot(result, str(out / "confusion.png"))
    print(f"grade ({result.scheme}: {', '.join(result.classes)}), {args.head}, {len(result.predictions)} patients:")
    for key, value in result.summary.items():
        if key != "chance":
            print(f"  {key:<18} {format_summary(value)}")
    print(f"  chance: majority-class accuracy {result.summary['chance']['majority_class_accuracy']:.3f}, "
          f"balanced accuracy {result.summary['chance']['balanced_accuracy']:.3f}")
    print(f"wrote {out}/metrics.json, predictions.csv, confusion.png; re-encoded nothing")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evaluate.report_metrics import score_reports

    clinical = load_clinical_tables(args.clinical) if args.clinical else None
    if args.checkpoint and args.protocol != "default":
        raise EvaluationError("--checkpoint (the grounding check) goes with the default protocol: score the HistGen "
                              "protocol and the grounding check in two runs")
    if args.protocol == "histgen":
        from evaluate.report_benchmark import histgen_benchmark, print_benchmark, write_benchmark

        store = EmbeddingStore.open(args.store) if args.store else None
        result = histgen_benchmark(args.predictions, args.references, store, clinical, args.threshold,
                                   args.max_seq_length)
        print_benchmark(result)
        if args.out:
            print(f"wrote {write_benchmark(result, args.out, provenance(vars(args)))}")
        return 0
    if args.checkpoint and not args.store:
        raise EvaluationError("--checkpoint (the grounding check) needs --store: the store the checkpoint trained on")
    if args.checkpoint:  # checkpoint and store checked before anything is scored (no model built yet)
        from train.generation import open_checked

        open_checked(args.checkpoint, args.store)
    scores = score_reports(args.predictions, args.references, clinical, args.endpoint)
    report = {"n": scores.n, "caption": scores.caption, "clinical": scores.clinical, "notes": scores.notes,
              "provenance": provenance(vars(args))}
    print(f"{scores.n} generated reports vs references:")
    for key, value in {**scores.caption, **scores.clinical}.items():
        print(f"  {key:<22} {value:.4f}" if isinstance(value, float) else f"  {key:<22} {value}")
    for note in scores.notes:
        print(f"  note: {note}")
    if args.checkpoint:
        from evaluate.grounding import grounding_check, grounding_lines

        grounding = grounding_check(args.checkpoint, args.store, args.predictions, args.references, args.seed,
                                    max_new_tokens=_generation_length(args), device=args.device)
        report["grounding"] = grounding.as_dict() | {"texts": grounding.texts}
        print("\n".join(grounding_lines(grounding)))
        for note in grounding.notes:
            print(f"  note: {note}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report_metrics.json").write_text(dumps(report))
        print(f"wrote {out / 'report_metrics.json'}")
    return 0


def _generation_length(args: argparse.Namespace) -> int:
    """--max-new-tokens, else what train.generate recorded beside the predictions, else 128."""
    if args.max_new_tokens:
        return args.max_new_tokens
    manifest = Path(args.predictions).with_name(f"{Path(args.predictions).stem}_manifest.json")
    try:
        return int(json.loads(manifest.read_text())["config"]["max_new_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return 128


def cmd_import_split(args: argparse.Namespace) -> int:
    patient_of = None
    if args.store:  # slide ids → the store's patient ids (non-TCGA slide ids carry no patient in their name)
        store = EmbeddingStore.open(args.store)
        known = {sid: store.slide(sid).patient_id for sid in store.slide_ids()}
        patient_of = lambda i: known.get(i, i)  # noqa: E731
    folds = import_published_splits(args.files, patient_of)
    write_split(args.out, folds)
    sizes = np.bincount(list(folds.values()))
    print(f"wrote {args.out}: {len(folds)} patients held out across {len(args.files)} folds of {sizes.tolist()} "
          "(fold k = the test, else val, set of the k-th file)")
    return 0


def _store_labels(stores: Sequence[EmbeddingStore]) -> list[str]:
    """Each store's encoder name; a name given twice is numbered (the same store twice compares to itself)."""
    return distinct_labels([str(s.spec.get("encoder", {}).get("name") or Path(s.url).stem) for s in stores])


def cmd_sweep(args: argparse.Namespace) -> int:
    from evaluate.sweep import best_by_task, format_differences, format_table, paired_differences, run_sweeps

    already = set(encoder_modules_loaded())  # a process that ran extraction before (a test, a notebook)
    opened = [EmbeddingStore.open(url) for url in args.store]
    labels = _store_labels(opened) if len(opened) > 1 else [""]
    stores = dict(zip(labels, opened))
    clinical = load_clinical_tables(args.clinical)
    if args.cancer_type:
        clinical = clinical.filter_cancer_type(args.cancer_type)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def folds_for(task: str, data: PatientData) -> dict[str, int]:
        return _folds(args, data, None if task == "grade" else task)

    def progress(row) -> None:
        where = f"{row.encoder} " if row.encoder else ""
        print(f"  {where}{row.task} {row.head} {row.pooling}: " + (f"error: {row.error}" if row.error else f"{row.seconds:.1f} s"),
              flush=True)

    rows, dropped = run_sweeps(stores, clinical, args.tasks, args.heads, args.grade_heads, args.poolings, folds_for,
                               args.seed, _settings(args), args.max_tiles, progress)
    for label, n in dropped.items():
        if n:
            print(f"warning: {n} patients of {label} are not in every store: left out, so that every encoder is "
                  "scored on the same patients", file=sys.stderr)
    differences = paired_differences(rows, args.seed) if len(stores) > 1 else []
    loaded = sorted(set(encoder_modules_loaded()) - already)  # imported by this sweep
    report = {"rows": [r.as_dict(reasons=True) for r in rows], "best": best_by_task(rows),
              "paired_differences": [d.as_dict() for d in differences],
              "store_fingerprint": (opened[0].fingerprint if len(opened) == 1
                                    else {label: s.fingerprint for label, s in stores.items()}),
              "stores": {label or "store": s.url for label, s in stores.items()},
              "patients_left_out": dropped if len(stores) > 1 else {},
              "re_encoded_tiles": 0, "encoder_modules_loaded": loaded,
              "provenance": provenance(vars(args) | {"clinical": [str(c) for c in args.clinical]})}
    (out / "sweep.json").write_text(dumps(report))  # strict JSON: a non-finite float is null, never NaN
    with open(out / "sweep.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r.as_dict()))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
    with open(out / "sweep_predictions.csv", "w", newline="") as f:  # held-out risks: for the user's own statistics
        writer = csv.writer(f)
        writer.writerow(["encoder", "task", "head", "pooling", "patient_id", "fold", "time", "event", "risk"])
        writer.writerows([r.encoder, r.task, r.head, r.pooling, p["patient_id"], p["fold"], p["time"], int(p["event"]),
                          repr(p["risk"])] for r in rows for p in r.predictions)
    print(format_table(rows))
    if differences:
        print("\npaired differences of Harrell's C (b - a) on the same held-out patients, "
              "bootstrap resampling them jointly across stores:")
        print(format_differences(differences))
    for task, best in report["best"].items():
        print(f"best {task}: {best}")
    if loaded:
        raise EvaluationError(f"encoder modules were imported during the sweep: {loaded}")
    if rows and all(r.error for r in rows):
        raise EvaluationError(f"no head of the sweep could be fitted (every row's reason is in {out}/sweep.json); "
                              f"the first: {rows[0].error}")
    print(f"wrote {out}/sweep.json, sweep.csv, sweep_predictions.csv; re-encoded nothing: {len(rows)} fits from "
          f"{'the store' if len(stores) == 1 else f'{len(stores)} stores'}, the encoder was never imported")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m evaluate", description="Heads and metrics from the cache.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cohort = argparse.ArgumentParser(add_help=False)  # what every command but `sweep` (several stores) shares
    cohort.add_argument("--clinical", required=True, nargs="+", help="clinical table(s): TCGA-CDR, SurvPath, slidecache")
    cohort.add_argument("--endpoint", default="OS", choices=ENDPOINTS)
    cohort.add_argument("--cancer-type", help="keep only this cancer type (pan-cancer tables)")
    cohort.add_argument("--folds", type=int, default=5)
    cohort.add_argument("--seed", type=int, default=0)
    common = argparse.ArgumentParser(add_help=False, parents=[cohort])
    common.add_argument("--store", required=True)

    p = sub.add_parser("split", parents=[common], help="write a patient-level split file (patient_id,fold)")
    p.add_bool("--site-preserving", help="keep each tissue source site in one fold")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("import-split", help="turn published CLAM/SurvPath split CSVs (one per fold) into a split file")
    p.add_argument("files", nargs="+", help="splits_0.csv splits_1.csv ...: fold k holds out file k's test (else val) ids")
    p.add_argument("--store", help="map slide ids to the store's patient ids (needed for non-TCGA slide ids)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_split)

    abmil = argparse.ArgumentParser(add_help=False)
    group = abmil.add_argument_group("ABMIL heads (trained on tiles read from the store)")
    group.add_argument("--max-tiles", type=int, default=512, help="tiles sampled per patient bag")
    group.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    group.add_argument("--lr", type=float, default=TrainSettings.lr)
    group.add_argument("--batch-size", type=int, default=TrainSettings.batch_size, help="bags per step")
    group.add_argument("--ties", default="efron", choices=["efron", "breslow"], help="abmil-cox tie handling")
    group.add_argument("--device", default=TrainSettings.device, help="auto (CUDA when visible), cpu, cuda, cuda:1 ...")

    heatmaps = argparse.ArgumentParser(add_help=False)
    heatmaps.add_argument("--heatmaps", nargs="+", metavar="SLIDE_ID",
                          help="ABMIL heads: attention PNGs for these slides, or `auto` (highest and lowest scoring patients)")

    p = sub.add_parser("survival", parents=[common, abmil, heatmaps], help="cross-validated survival head from the cache")
    p.add_argument("--head", default="coxnet", choices=list(HEADS))
    p.add_argument("--pooling", default="mean", choices=POOLINGS, help="slide-vector heads (ABMIL reads tiles)")
    p.add_argument("--split", help="a split file from `python -m evaluate split` (default: made here from --seed)")
    p.add_argument("--save-head", metavar="DIR", help="also refit the head on every patient and save it (safetensors) "
                                                      "for `python -m train.generate --slide ... --survival-head DIR`")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_survival)

    p = sub.add_parser("grade", parents=[common, abmil, heatmaps], help="cross-validated grade classifier from the cache")
    p.add_argument("--label", default="grade", choices=["grade"], help="the clinical column to predict")
    p.add_argument("--head", default="logreg", choices=list(GRADE_HEADS))
    p.add_argument("--pooling", default="mean", choices=POOLINGS)
    p.add_argument("--split", help="a split file from `python -m evaluate split`")
    p.add_argument("--save-head", metavar="DIR", help="also refit the head on every graded patient and save it "
                                                      "for `python -m train.generate --slide ... --grade-head DIR`")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("sweep", parents=[cohort, abmil], help="many heads x poolings x endpoints (x encoders), one table")
    p.add_argument("--store", required=True, nargs="+",
                   help="one store, or one per encoder (e.g. tcga-virchow2.zarr tcga-uni2-h.zarr): every store is fitted "
                        "on the patients all of them hold, on the same folds, with C-index differences between "
                        "encoders and their paired bootstrap intervals")
    p.add_argument("--tasks", nargs="+", default=["OS"], choices=[*ENDPOINTS, "grade"])
    p.add_argument("--heads", nargs="+", default=["coxnet", "coxph", "rsf", "abmil-cox"], choices=list(HEADS),
                   help="survival heads")
    p.add_argument("--grade-heads", nargs="+", default=["logreg", "abmil"], choices=list(GRADE_HEADS))
    p.add_argument("--poolings", nargs="+", default=["mean", "max"], choices=POOLINGS)
    p.add_argument("--split", help="a split file used for every task (default: folds per task from --seed)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr and clinical correctness of generated reports")
    p.add_argument("--predictions", required=True, help="jsonl: {id, text} per generated report")
    p.add_argument("--references", required=True,
                   help="jsonl: {id, text}, the InternVL conversation annotations, or HistGen's annotation JSON; ids "
                        "match the predictions' slides as train.import_reports matches them (exactly, by TCGA "
                        "barcode, a patient id for all its slides)")
    p.add_argument("--clinical", nargs="+", help="clinical table(s): adds the C-index of the stated risk group")
    p.add_argument("--endpoint", default="OS", choices=ENDPOINTS, help="the endpoint the stated risk is scored on")
    p.add_argument("--protocol", default="default", choices=["default", "histgen"],
                   help="histgen: the HistGen WSI-report benchmark's cleaning, vocabulary and metrics on the test set, "
                        "with baselines; --references is then HistGen's annotation JSON or train.import_reports' "
                        "annotations.jsonl")
    p.add_argument("--store", help="histgen: the store, for the nearest-report-by-embedding baseline; with "
                                   "--checkpoint: the store it trained on")
    p.add_argument("--checkpoint", help="the grounding check: regenerate each report with another held-out patient's "
                                        "slide (of another grade) and with blank tiles, and score whether the stated "
                                        "grade follows the slide (needs --store; --references the annotations)")
    p.add_argument("--max-new-tokens", type=int, help="grounding: tokens per regenerated report (default: as the "
                                                      "predictions were generated, else 128)")
    p.add_argument("--seed", type=int, default=0, help="grounding: the seed donors are drawn with")
    p.add_argument("--device", default="auto", help="grounding: auto, cpu, cuda ...")
    p.add_argument("--threshold", type=int, default=10, help="histgen: words seen fewer times in training are <unk>")
    p.add_argument("--max-seq-length", type=int, default=100, help="histgen: reports cut to this many tokens - 1")
    p.add_argument("--out", help="folder for report_metrics.json")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
