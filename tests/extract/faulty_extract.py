"""`python -m tests.extract.faulty_extract --pause-after-first-append S [--resume-when PATH] EXTRACT_ARGS`:
`python -m extract EXTRACT_ARGS` (the same library call, extract.cli.main) with a faulty stand-in from
tests/extract/faulty_stages.py given to its executor, for a test whose fault must be in a job of its own."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from extract.cli import main as extract_main
from extract.stages import Stages
from tests.extract.faulty_stages import pausing_after_first_append


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--pause-after-first-append", type=float, required=True, metavar="S")
    parser.add_argument("--resume-when", default="", metavar="PATH")
    faults, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    stages = Stages(worker=pausing_after_first_append(faults.pause_after_first_append, faults.resume_when))
    return extract_main(rest, stages)


if __name__ == "__main__":
    sys.exit(main())
