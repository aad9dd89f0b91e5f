"""`python -m demo`: the README's main command. See demo/pipeline.py for what it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from demo.cohort import DemoSize
from demo.pipeline import DemoSettings, run
from slidecache.cli_args import ArgumentParser, guarded
from slidecache.errors import PipelineError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_output"),
                        help="output folder, relative to the working directory (reused: a rerun skips what is done)")
    parser.add_argument("--patients", type=int, default=DemoSize.patients)
    parser.add_argument("--epochs", type=int, default=DemoSettings.train_epochs,
                        help="training epochs of the reporter (default: the stand-in's recipe, "
                             "configs/train/tiny.yaml; 8 with real LLM weights)")
    parser.add_argument("--encoder", default="virchow2-tiny", help="virchow2 with its weights present runs the real encoder")
    parser.add_argument("--weights", help="the encoder's hub id or local .safetensors (default: the registry's)")
    parser.add_argument("--llm_path", default="tiny-qwen2", help="e.g. Qwen/Qwen2-0.5B-Instruct when its weights are present")
    parser.add_bool("--no-train", help="stop after extraction and the split")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # one clear line, not a traceback from a later stage; a pipeline that cannot go on exits 1
    return guarded(lambda: _demo(args), lambda e: 1 if isinstance(e, PipelineError) else 2)


def _demo(args: argparse.Namespace) -> int:
    settings = DemoSettings(size=DemoSize(patients=args.patients), train_epochs=args.epochs, encoder=args.encoder,
                            weights=args.weights, llm_path=args.llm_path, train=not args.no_train)
    result = run(args.out, settings, log=lambda m: print(m, flush=True))
    print(json.dumps({k: v for k, v in result.items() if k != "evaluation"}, indent=2, default=str))
    print(f"\nsummary: {result['summary_html']}\ninspect the store: python -m store info {result['store']} --list")
    return 1 if result["verify_problems"] or result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
