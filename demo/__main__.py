"""`python -m demo`: the README's main command. See demo/pipeline.py for what it runs."""

import argparse
import json
import sys
from pathlib import Path

from demo.pipeline import run

parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (reused: a rerun skips what is done)")
args = parser.parse_args()
result = run(args.out, log=lambda m: print(m, flush=True))
print(json.dumps(result, indent=2))
print(f"\nQC summary: {result['qc_summary']}\ninspect the store: python -m store info {result['store']} --list")
sys.exit(1 if result["verify_problems"] or result["failed"] else 0)
