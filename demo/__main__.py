"""`python -m demo`: the README's main command. See demo/pipeline.py for what it runs."""

import argparse
import json
import sys
from pathlib import Path

from demo.cohort import DemoSize
from demo.pipeline import DemoSettings, run

parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (reused: a rerun skips what is done)")
parser.add_argument("--patients", type=int, default=DemoSize.patients)
parser.add_argument("--epochs", type=int, default=DemoSettings.train_epochs, help="training epochs of the reporter")
parser.add_argument("--encoder", default="virchow2-tiny", help="virchow2 with its weights present runs the real encoder")
parser.add_argument("--weights", help="the encoder's hub id or local .safetensors (default: the registry's)")
parser.add_argument("--llm_path", default="tiny-qwen2", help="e.g. Qwen/Qwen2-0.5B-Instruct when its weights are present")
parser.add_argument("--no-train", action="store_true", help="stop after extraction and the split")
args = parser.parse_args()
settings = DemoSettings(size=DemoSize(patients=args.patients), train_epochs=args.epochs, encoder=args.encoder, weights=args.weights,
                        llm_path=args.llm_path, train=not args.no_train)
result = run(args.out, settings, log=lambda m: print(m, flush=True))
print(json.dumps({k: v for k, v in result.items() if k != "evaluation"}, indent=2, default=str))
print(f"\nsummary: {result['summary_html']}\ninspect the store: python -m store info {result['store']} --list")
sys.exit(1 if result["verify_problems"] or result["failed"] else 0)
