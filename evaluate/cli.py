"""`python -m evaluate split|import-split|survival|grade|sweep|report`: thin commands over the library.

Each command parses its flags into settings objects, calls the library (evaluate/*_eval.py) and prints what
the result gives; the result writes its own files. Nothing here imports the encoder: slide vectors and tile
bags are read from the store."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

import numpy as np

from evaluate.abmil_settings import TrainSettings
from evaluate.cohort import CohortSettings, open_patients, site_folds, store_patient_of
from evaluate.features import POOLINGS
from evaluate.grade import GRADE_HEADS
from evaluate.grade_eval import GradeSettings, run_grade
from evaluate.survival import HEADS
from evaluate.survival_eval import SurvivalSettings, run_survival
from slidecache.cli_args import ArgumentParser, output_path, run_command
from slidecache.cohorts.clinical import ENDPOINTS
from slidecache.cohorts.splits import import_published_splits, write_split
from slidecache.errors import EvaluationError


def _cohort(args: argparse.Namespace) -> CohortSettings:
    return CohortSettings(args.clinical, cancer_type=args.cancer_type, folds=args.folds, seed=args.seed,
                          split=getattr(args, "split", None))


def _abmil(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, ties=args.ties,
                         device=args.device)


def _recorded(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags as its outputs record them (provenance)."""
    return vars(args) | {"clinical": [str(c) for c in args.clinical]}


def cmd_split(args: argparse.Namespace) -> int:
    output_path(args.out, folder=False)
    _, data = open_patients(args.store, _cohort(args))
    folds = site_folds(data, args.endpoint, args.folds, args.seed, args.site_preserving)
    write_split(args.out, folds)
    sizes = np.bincount(list(folds.values()))
    print(f"wrote {args.out}: {len(folds)} patients in {args.folds} folds of {sizes.tolist()} patients "
          f"(stratified by {args.endpoint} event{', sites kept apart' if args.site_preserving else ''}; "
          f"seed {args.seed})")
    return 0


def cmd_import_split(args: argparse.Namespace) -> int:
    output_path(args.out, folder=False)
    patient_of = store_patient_of(args.store) if args.store else None
    folds = import_published_splits(args.files, patient_of)
    write_split(args.out, folds)
    sizes = np.bincount(list(folds.values()))
    print(f"wrote {args.out}: {len(folds)} patients held out across {len(args.files)} folds of {sizes.tolist()} "
          "(fold k = the test, else val, set of the k-th file)")
    return 0


def _head_command(args: argparse.Namespace, run: Callable[..., Any], settings: Any) -> int:
    """survival and grade alike: run the evaluation, write its files, print its lines."""
    out = output_path(args.out)
    evaluation = run(args.store, _cohort(args), settings, out, _recorded(args))
    evaluation.write(out)
    print("\n".join([*evaluation.lines(), evaluation.wrote(out)]))
    return 0


def _pooling(args: argparse.Namespace) -> str:
    """--pooling, refused beside --slide-embeddings (whose set holds the slide vector: nothing is pooled)."""
    if args.slide_embeddings and args.pooling is not None:
        raise EvaluationError(f"--pooling {args.pooling} pools a slide's tiles, but --slide-embeddings "
                              f"{args.slide_embeddings} reads the slide vectors stored in that set: give one of "
                              "the two")
    return args.pooling or "mean"


def cmd_survival(args: argparse.Namespace) -> int:
    return _head_command(args, run_survival, SurvivalSettings(
        endpoint=args.endpoint, head=args.head, pooling=_pooling(args), seed=args.seed, max_tiles=args.max_tiles,
        abmil=_abmil(args), heatmaps=tuple(args.heatmaps or ()), save_head=args.save_head,
        slide_embeddings=args.slide_embeddings))


def cmd_grade(args: argparse.Namespace) -> int:
    return _head_command(args, run_grade, GradeSettings(
        head=args.head, pooling=_pooling(args), seed=args.seed, max_tiles=args.max_tiles, abmil=_abmil(args),
        heatmaps=tuple(args.heatmaps or ()), save_head=args.save_head, slide_embeddings=args.slide_embeddings))


def cmd_sweep(args: argparse.Namespace) -> int:
    from evaluate.sweep_eval import SweepSettings, evaluate_sweep

    settings = SweepSettings(args.store, _cohort(args), tasks=args.tasks, heads=args.heads,
                             grade_heads=args.grade_heads, poolings=args.poolings, max_tiles=args.max_tiles,
                             abmil=_abmil(args), slide_embeddings=tuple(args.slide_embeddings or ()),
                             references=tuple(args.reference or ()))
    out = output_path(args.out)
    evaluation = evaluate_sweep(settings, out, _recorded(args), log=lambda line: print(line, flush=True))
    for warning in evaluation.warnings():
        print(warning, file=sys.stderr)
    evaluation.write(out)
    print("\n".join(evaluation.lines()))
    evaluation.check(out)
    print(evaluation.wrote(out))
    return 0


def cmd_prism_report(args: argparse.Namespace) -> int:
    from evaluate.prism_report import PrismReportSettings, run_prism_report

    settings = PrismReportSettings(args.store, str(output_path(args.out)), weights=args.weights, tokenizer=args.tokenizer,
                                   slides=tuple(args.slides or ()), references=args.references, device=args.device,
                                   precision=args.precision, max_new_tokens=args.max_new_tokens,
                                   num_beams=args.num_beams, any_tiling=args.any_tiling, seed=args.seed)
    result = run_prism_report(settings, vars(args), log=lambda line: print(line, flush=True))
    print("\n".join(result.lines()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evaluate.report_eval import ReportSettings, run_report

    if args.out:
        output_path(args.out)

    settings = ReportSettings(args.predictions, args.references, clinical=args.clinical, endpoint=args.endpoint,
                              protocol=args.protocol, store=args.store, checkpoint=args.checkpoint,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device,
                              threshold=args.threshold, max_seq_length=args.max_seq_length)
    evaluation = run_report(settings, vars(args))
    if args.out:
        print(f"wrote {evaluation.write(args.out)}")
    return 0


SET_HELP = ("a slide-embedding set of the store (`python -m extract slide-embeddings`, e.g. titan): fit the "
            "slide-vector head on its vectors instead of pooled tiles")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m evaluate", description="Heads and metrics from the cache.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cohort = argparse.ArgumentParser(add_help=False)  # what every command but `sweep` (several stores) shares
    cohort.add_argument("--clinical", required=True, nargs="+", help="clinical table(s): TCGA-CDR, SurvPath, slidecache")
    cohort.add_argument("--cancer-type", help="keep only this cancer type (pan-cancer tables)")
    cohort.add_argument("--folds", type=int, default=5)
    cohort.add_argument("--seed", type=int, default=0)
    common = argparse.ArgumentParser(add_help=False, parents=[cohort])
    common.add_argument("--store", required=True)
    # the survival endpoint: what `split` stratifies by and `survival` predicts (grade and sweep have their own)
    endpoint = argparse.ArgumentParser(add_help=False)
    endpoint.add_argument("--endpoint", default="OS", choices=ENDPOINTS)

    p = sub.add_parser("split", parents=[common, endpoint], help="write a patient-level split file (patient_id,fold)")
    p.add_bool("--site-preserving", help="keep each tissue source site in one fold")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("import-split", help="turn published CLAM/SurvPath split CSVs (one per fold) into a split file")
    p.add_argument("files", nargs="+", help="splits_0.csv splits_1.csv ...: fold k holds out file k's test (else val) ids")
    p.add_argument("--store", help="map slide ids to the store's patient ids (needed for non-TCGA slide ids)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_split)

    abmil = argparse.ArgumentParser(add_help=False)
    group = abmil.add_argument_group("attention-MIL heads: abmil, transmil, clam-sb, dsmil (trained on tiles read "
                                     "from the store)")
    group.add_argument("--max-tiles", type=int, default=512, help="tiles sampled per patient bag")
    group.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    group.add_argument("--lr", type=float, default=TrainSettings.lr)
    group.add_argument("--batch-size", type=int, default=TrainSettings.batch_size, help="bags per step")
    group.add_argument("--ties", default="efron", choices=["efron", "breslow"], help="the *-cox heads' tie handling")
    group.add_argument("--device", default=TrainSettings.device, help="auto (CUDA when visible), cpu, cuda, cuda:1 ...")

    heatmaps = argparse.ArgumentParser(add_help=False)
    heatmaps.add_argument("--heatmaps", nargs="+", metavar="SLIDE_ID",
                          help="heatmap PNGs over the thumbnail for these slides, or `auto` (highest and lowest "
                               "scoring patients), each by the fold's head that held the patient out: a MIL head's "
                               "attention; a slide-vector head's occlusion (its output with minus without each tile, "
                               "or k x k tile groups on slides of over 2,000 tiles); not with --slide-embeddings")

    p = sub.add_parser("survival", parents=[common, endpoint, abmil, heatmaps], help="cross-validated survival head from the cache")
    p.add_argument("--head", default="coxnet", choices=list(HEADS))
    p.add_argument("--pooling", choices=POOLINGS, help="slide-vector heads (MIL heads read tiles); default mean")
    p.add_argument("--slide-embeddings", metavar="NAME", help=SET_HELP)
    p.add_argument("--split", help="a split file from `python -m evaluate split` (default: made here from --seed)")
    p.add_argument("--save-head", metavar="DIR", help="also refit the head on every patient and save it (safetensors) "
                                                      "for `python -m train.generate --slide ... --survival-head DIR`")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_survival)

    p = sub.add_parser("grade", parents=[common, abmil, heatmaps], help="cross-validated grade classifier from the cache")
    p.add_argument("--label", default="grade", choices=["grade"], help="the clinical column to predict")
    p.add_argument("--head", default="logreg", choices=list(GRADE_HEADS))
    p.add_argument("--pooling", choices=POOLINGS, help="logreg; default mean")
    p.add_argument("--slide-embeddings", metavar="NAME", help=SET_HELP)
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
    p.add_argument("--slide-embeddings", nargs="+", metavar="NAME",
                   help="slide-embedding sets of the store(s): rows for each with the slide-vector heads, beside the "
                        "pooled rows, on the same patients and folds")
    p.add_argument("--split", help="a split file used for every task (default: folds per task from --seed)")
    p.add_argument("--reference", nargs="+", metavar="ROW",
                   help="the row each task's other rows are compared with (every metric's difference and its paired "
                        "bootstrap interval), named by any of its encoder, task, head and pooling joined by /, e.g. "
                        "coxph/mean, uni2-h/abmil-cox, grade/logreg/set:titan; default: each task's first fitted row")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("prism-report", help="PRISM's own reports (paige-ai/Prism's BioGPT decoder) for a store of "
                                            "Virchow (v1) tile features: a baseline for `report`")
    p.add_argument("--store", required=True,
                   help="a store of Virchow (v1) tile features (2560-d, 224 px tiles at 0.5 µm/px)")
    p.add_argument("--weights", default="paige-ai/Prism",
                   help="the hub id (gated: HF_TOKEN), a local model.safetensors or its folder (a config.json beside "
                        "it in the hub's format sets the architecture), or prism-random (random init)")
    p.add_argument("--tokenizer", help="BioGPT's vocab.json + merges.txt: a folder or hub id (default: beside the "
                                       "weights when there, else microsoft/biogpt at the commit PRISM's code pins)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--slides", nargs="+", metavar="ID", help="only these slides (default: every slide)")
    which.add_argument("--references", help="only the slides these references name (the file `report` will score "
                                            "against: jsonl, annotations.jsonl or HistGen's JSON)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 autocast on CUDA (as PRISM runs), fp32 on the CPU")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=5, help="beam search as PRISM's model card (1: greedy)")
    p.add_bool("--any-tiling", help="report on tiles other than the card's 224 px at 0.5 µm/px")
    p.add_argument("--seed", type=int, default=0, help="prism-random's init")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl and predictions_manifest.json")
    p.set_defaults(func=cmd_prism_report)

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
