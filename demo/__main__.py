"""`python -m demo`: the README's main command (today: the store demo; see demo/store_demo.py)."""

import argparse
import json
import sys
from pathlib import Path

from demo.store_demo import run

parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (reused: a rerun skips what is done)")
args = parser.parse_args()
summary = run(args.out)
print(json.dumps(summary, indent=2))
print(f"\nstore written to {summary['store']}; inspect it with: python -m store info {summary['store']} --list")
sys.exit(1 if summary["verify_problems"] else 0)
