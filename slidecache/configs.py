"""Where a config named on the command line is found: as given (relative to the working directory), else
among the configs slidecache ships, so a command copied from the README
(`--config configs/train/internvl2-1b-lora.yaml`) works from any working directory, in a checkout or a wheel
install alike (the `configs` package data, found through importlib.resources)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

# A folder on disk in every install we support (a checkout, an editable or a wheel install; not a zip).
SHIPPED = Path(str(resources.files("configs")))


# Shipped configs renamed to one naming rule (dataset-model-recipe, hyphens): old names still work, with a note.
RENAMED = {
    "internvl2_1b_virchow2_lora.yaml": "images-internvl2-1b-lora.yaml",
    "internvl2_1b_virchow2_full.yaml": "images-internvl2-1b-full.yaml",
}


def shipped(kind: str, name: str = "") -> Path:
    """The shipped folder of one kind (extract, train, cohorts), or one file in it."""
    return SHIPPED / kind / name if name else SHIPPED / kind


def find_config(path: str | Path, kind: str) -> Path:
    """`path` itself if it exists; else the shipped file it names (`configs/<kind>/x.yaml` or plain `x.yaml`);
    else `path` unchanged, for the caller's own not-found message."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if given.name in RENAMED:
        new = given.with_name(RENAMED[given.name])
        print(f"note: {given.name} is now called {new.name}; the old name will go in a later release",
              file=sys.stderr)
        given = new
    for candidate in (SHIPPED.parent / given, SHIPPED / kind / given, SHIPPED / kind / given.name):
        if not given.is_absolute() and candidate.is_file():
            return candidate
    return given
