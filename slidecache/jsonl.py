"""JSON-lines reading with errors that name the file and line (annotations, reports, predictions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from slidecache.errors import SlidecacheError


def read_jsonl(path: str | Path, error: type[SlidecacheError]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object raises `error`."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}, line {number}: not JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise error(f"{path}, line {number}: each line must be a JSON object")
            yield number, row
