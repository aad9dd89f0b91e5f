"""InternVL's meta JSON: `{name: {root, annotation, data_augment, repeat_time, length}}`, shared by the
image extraction (which images to encode) and training (which conversations to learn)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slidecache.errors import AnnotationError


@dataclass
class DatasetSpec:
    name: str
    annotation: Path
    root: str = ""
    repeat_time: float = 1.0
    data_augment: bool = False
    length: int | None = None


def read_meta(meta_path: str | Path) -> list[DatasetSpec]:
    path = Path(meta_path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnnotationError(f"meta file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}, line {e.lineno}: not JSON ({e.msg})") from e
    if not isinstance(meta, dict) or not meta:
        raise AnnotationError(f"{path}: a meta file maps dataset names to {{root, annotation, repeat_time, ...}}")
    specs = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise AnnotationError(f"{path}: dataset {name!r} needs an 'annotation' (a jsonl path)")
        annotation = Path(entry["annotation"])
        if not annotation.is_absolute():
            annotation = path.parent / annotation
        if entry.get("data_augment"):  # one view of each image or slide was encoded, once
            raise AnnotationError(f"{path}: dataset {name!r}: data_augment: true cannot apply to cached tokens (the "
                                  "encoder ran once, on one view of each image or slide); set data_augment: false")
        specs.append(DatasetSpec(name, annotation, entry.get("root", ""), float(entry.get("repeat_time", 1.0)),
                                 bool(entry.get("data_augment", False)), entry.get("length")))
    return specs
