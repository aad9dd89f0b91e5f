"""The command-line rules every slidecache CLI shares: `--storage-options JSON` read one way, and one rule for
boolean flags, the one InternVL's (Hugging Face) flags follow:
`--flag`, `--flag True`, `--flag False` (and `--flag=false`, yes/no, 1/0) all work.

A plain `nargs="?"` flag would swallow the next positional argument (`rm --force STORE ID` would read
STORE as the flag's value), so each parser first rewrites its own boolean flags to `--flag=VALUE`,
taking the next word only when it is a boolean literal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from slidecache.errors import ConfigError, SlidecacheError

TRUE, FALSE = ("true", "yes", "y", "1"), ("false", "no", "n", "0")


INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def guarded(action: Callable[[], int], refusal_code: Callable[[SlidecacheError], int] = lambda e: 2) -> int:
    """Run a command's action: our errors become one line on stderr and exit code 2 (or refusal_code's), Ctrl-C
    one line and 130. Every store write commits per slide, so what finished is kept and a rerun resumes."""
    try:
        return action()
    except SlidecacheError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return refusal_code(e)
    except KeyboardInterrupt:
        print("\ninterrupted; what was finished is kept: rerun the same command to resume", file=sys.stderr,
              flush=True)
        return INTERRUPTED


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run the chosen subcommand under `guarded`."""
    args = parser.parse_args(argv)
    return guarded(lambda: args.func(args))


def output_path(value: str, flag: str = "--out", folder: bool = True) -> Path:
    """`value` as an output folder (or, `folder` False, a file to write): refused, naming the flag, when it or a
    folder above it is an existing file (mkdir would fail with a bare FileExistsError)."""
    path = Path(value)
    for part in (path, *path.parents) if folder else path.parents:
        if part.exists() and not part.is_dir():
            where = "it" if part == path else str(part)
            advice = "give a new or existing folder for the outputs" if folder else "put the file in a folder"
            raise ConfigError(f"{flag} {value}: {where} is an existing file, not a folder: {advice}")
    return path


def storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options JSON` as fsspec takes it: a JSON object (nothing given: {}), else a ConfigError."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options must be a JSON object: {e}") from e
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return options


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `add_bool`; subparsers made from it are of this class too."""

    def add_bool(self, *names: str, default: bool | None = False, help: str = "") -> argparse.Action:
        return self.add_argument(*names, type=parse_bool, nargs="?", const=True, default=default,
                                 metavar="True|False", help=help)

    def _bool_options(self) -> set[str]:
        return {option for action in self._actions if action.type is parse_bool for option in action.option_strings}

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(normalise_bools(words, self._bool_options()), namespace)


def normalise_bools(words: list[str], options: set[str]) -> list[str]:
    """`--flag` → `--flag=True`; `--flag False` → `--flag=False`; other words unchanged (after `--` too)."""
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            out += words[i:]
            break
        if word in options:
            following = words[i + 1] if i + 1 < len(words) else None
            if following is not None and following.strip().lower() in TRUE + FALSE:
                out.append(f"{word}={following}")
                i += 2
                continue
            out.append(f"{word}=True")
        else:
            out.append(word)
        i += 1
    return out
