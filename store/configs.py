"""Where a config named on the command line is found: as given (relative to the working directory), else
among the configs shipped in the repository's `configs/` folder, so a command copied from the README
(`--config configs/train/internvl2-1b-lora.yaml`) works from any working directory."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "configs"


def find_config(path: str | Path, kind: str) -> Path:
    """`path` itself if it exists; else the shipped file it names (`configs/<kind>/x.yaml` or plain `x.yaml`);
    else `path` unchanged, for the caller's own not-found message."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    for candidate in (SHIPPED.parent / given, SHIPPED / kind / given, SHIPPED / kind / given.name):
        if not given.is_absolute() and candidate.is_file():
            return candidate
    return given
