"""`--cohort NAME_OR_TABLE`: a named cohort from configs/cohorts/NAME.yaml, or a folder / CSV / manifest."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from slidecache.cohorts.slides import SlideEntry, load_cohort
from slidecache.configs import shipped
from slidecache.errors import CohortError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^{}]|\{[^{}]*\})*))?\}")


def expand(value: str) -> str:
    """${VAR} and ${VAR:-default} (nested once), as in a shell; unset without a default is empty."""
    def sub(m: re.Match[str]) -> str:
        found = os.environ.get(m.group(1))
        return found if found else expand(m.group(2) or "")
    return _VAR.sub(sub, value)


def resolve_cohort(name_or_path: str) -> list[SlideEntry]:
    path = Path(name_or_path)
    if path.exists():
        return load_cohort(path)
    config = shipped("cohorts", f"{name_or_path}.yaml")
    if not config.is_file():
        known = sorted(p.stem for p in shipped("cohorts").glob("*.yaml"))
        raise CohortError(f"cohort {name_or_path!r} is neither a path nor a named cohort ({', '.join(known)} in "
                          f"{shipped('cohorts')})")
    data = yaml.safe_load(config.read_text()) or {}
    slides = expand(str(data.get("slides", "")))
    if not slides:
        raise CohortError(f"cohort {name_or_path}: {config} takes its slides from the environment; "
                          f"set the variables it names (see the comments in {config.name})")
    root = expand(str(data.get("root", ""))) or None
    return load_cohort(slides, root)
