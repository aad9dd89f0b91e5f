"""Generate reports from a checkpoint and the store: jsonl for `python -m evaluate report`.

    python -m train.generate --checkpoint RUN_DIR --store STORE --meta_path META [--split FILE --fold K]
        [--batch_size 8] [--max_new_tokens 128] [--do_sample --temperature 0.7 --top_p 0.9] --out gen.jsonl
    python -m train.generate --checkpoint RUN_DIR --store STORE --slide PATH.svs [--survival_head DIR]
        [--grade_head DIR] [--page_dir DIR]     # one new slide → report.html (train/slide_report.py)

Prompts are the annotations' turns up to the first assistant turn; tiles are the spatially spread
selection (deterministic). With --split/--fold only the held-out fold's patients are generated, and with a
train/val/test split file only its test set (or --subset val), so no report is scored on a patient the model
trained on. The output folder gets a run manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

# Light imports only at the top: a reader process of the local executor imports the driver's __main__ module
# (multiprocessing does, for `python -m train.generate`), and torch there cost each reader ~5 s and made cuCIM
# print cuFile/libcuda noise. The library is train/generation.py, imported when the command runs.
from slidecache.cli_args import ArgumentParser, run_command
from slidecache.errors import TrainingError


def build_parser() -> ArgumentParser:
    from train.generation import DEFAULT_IMAGE_PROMPT

    parser = ArgumentParser(prog="python -m train.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a training --output_dir or one of its checkpoint-N")
    parser.add_argument("--store", required=True)
    parser.add_argument("--meta_path", help="annotations to answer (cached slides or images)")
    parser.add_argument("--image", help="a new image: encoded on the fly with the store's encoder and tiling")
    parser.add_argument("--prompt", help=f"the question asked about --image (default {DEFAULT_IMAGE_PROMPT!r}) or "
                                          "--slide (default: the one train.annotations writes)")
    parser.add_argument("--weights", help="with --image or --slide: the encoder's local .safetensors or hub id "
                                           "(checked against the store)")
    parser.add_argument("--slide", help="a new slide file (or DICOM folder): encoded with the store's encoder and "
                                        "tiling (or read from the store when it holds it) and reported on a page")
    parser.add_argument("--mpp_override", "--mpp-override", type=float,
                        help="with --slide: the slide's µm/px, for a file whose metadata lacks it (or is wrong)")
    parser.add_argument("--survival_head", "--survival-head", help="with --slide: a head saved by `python -m evaluate "
                                                                   "survival ... --save-head DIR` (risk group)")
    parser.add_argument("--grade_head", "--grade-head", help="with --slide: a head saved by `python -m evaluate grade "
                                                             "... --save-head DIR`")
    parser.add_argument("--page_dir", "--page-dir", help="with --slide: the page's folder (default: "
                                                         "slide_reports/SLIDE_ID)")
    parser.add_argument("--split", help="a fold file (with --fold: that fold's patients) or a train/val/test file")
    parser.add_argument("--fold", type=int, default=-1)
    parser.add_argument("--subset", default="test", choices=["val", "test"],
                        help="with a train/val/test split: the set to generate for")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_bool("--do_sample", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--out", help="jsonl of generated texts (required with --meta_path)")
    parser.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def _run(args: argparse.Namespace) -> int:
    if args.slide:
        from train.slide_report import PAGE, report_slide

        record = report_slide(args.checkpoint, args.slide, args.store, args.page_dir, args.survival_head,
                              args.grade_head, args.weights, args.prompt, args.max_new_tokens, args.seed, args.device,
                              mpp_override=args.mpp_override)
        print(record["report"])
        for name, value in record["prediction_rows"]:
            print(f"  {name}: {value}")
        print(f"wrote {Path(record['page_dir']) / PAGE}")
        return 0
    if args.survival_head or args.grade_head or args.page_dir or args.mpp_override is not None:
        raise TrainingError("--survival_head, --grade_head, --page_dir and --mpp_override go with --slide")
    from train.generation import DEFAULT_IMAGE_PROMPT, answer_image, generate_reports

    if args.image:
        text = answer_image(args.checkpoint, args.image, args.store, args.prompt or DEFAULT_IMAGE_PROMPT, args.weights,
                            args.max_new_tokens,
                            args.do_sample, args.temperature, args.top_p, args.seed, args.device)
        print(text)
        if args.out:
            Path(args.out).write_text(json.dumps({"image": args.image, "prompt": args.prompt, "text": text}) + "\n")
        return 0
    if not args.meta_path or not args.out:
        raise TrainingError("give --meta_path and --out (annotations to answer), or --image (one new image)")
    result = generate_reports(args.checkpoint, args.store, args.meta_path, args.out, args.split, args.fold,
                              args.subset, args.batch_size, args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                              args.seed, args.device)
    print(f"wrote {result['reports']} reports to {args.out} in {result['seconds']:.1f} s "
          f"({result['new_tokens'] / max(result['seconds'], 1e-9):.1f} new tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
