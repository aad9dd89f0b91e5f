"""`slidecache COMMAND ARGS` runs `python -m COMMAND ARGS`: the same commands, for installs that put a console
script on PATH (`pip install slidecache`, a Ray runtime environment). `slidecache --help` lists them."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from importlib import metadata

COMMANDS = {
    "extract": "encode slides (or InternVL images) once into a store",
    "store": "inspect, verify, merge, import and export stores",
    "train.annotations": "write report annotations (meta JSON + jsonl) from a clinical table",
    "train.import_reports": "import public report datasets (HistGen JSON, CSV)",
    "train": "fine-tune the projector and LoRA on cached tokens",
    "train.generate": "generate reports (a meta JSON, one --image, or one --slide with its page)",
    "train.merge": "merge LoRA into the LLM for export",
    "evaluate": "survival and grade heads, sweeps, report metrics and the grounding check from the cache",
    "demo": "the whole pipeline on a synthetic cohort (make demo)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return ("usage: slidecache COMMAND [ARGS ...]   (the same as python -m COMMAND ARGS)\n\ncommands:\n"
            + "\n".join(lines) + "\n\n`slidecache COMMAND --help` describes one.")


def clashing_evaluate() -> str | None:
    """Hugging Face's `evaluate` distribution also installs a top-level package `evaluate`: in one environment
    the one installed last overwrites the other's files, and neither works. Say so before running anything."""
    try:
        dist = metadata.distribution("evaluate")
    except metadata.PackageNotFoundError:
        return None
    return (f"Hugging Face's `evaluate` {dist.version} is installed in this environment ({sys.prefix}); it shares "
            "the top-level package name `evaluate` with slidecache, so one overwrote the other. Install slidecache "
            "into its own virtual environment (or `pip uninstall evaluate` and reinstall slidecache).")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0].replace("-", "_") if "." in args[0] else args[0], args[1:]
    if command not in COMMANDS:
        print(f"slidecache: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    clash = clashing_evaluate()
    if clash:
        print(f"slidecache: {clash}", file=sys.stderr)
        return 2
    sys.argv = [f"slidecache {command}", *rest]
    try:
        runpy.run_module(command, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
