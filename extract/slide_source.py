"""What a slide file is, by content: recorded with every slide, so a file merely named like a stored slide is
never taken for it (train.generate --slide reuses stored embeddings only for the same file content)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

EDGE_BYTES = 1 << 20  # the header (TIFF IFDs, DICOM preamble) and the last MiB: cheap on a 2 GB slide
DIGEST_METHOD = "sha256 of each file's name, size, first and last MiB"


def _files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]


def content_digest(path: str | Path) -> str:
    """A digest of the slide file (or DICOM folder) that changes when its content does, reading ≤ 2 MiB a file."""
    digest = hashlib.sha256()
    for file in _files(Path(path)):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(EDGE_BYTES))
            if size > 2 * EDGE_BYTES:
                handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def source_facts(path: str | Path) -> dict[str, Any]:
    """The facts a store records about a slide's file: path, total size, newest mtime and the content digest."""
    p = Path(path)
    files = _files(p)
    return {"path": str(p), "size": sum(f.stat().st_size for f in files),
            "mtime": max(f.stat().st_mtime for f in files) if files else None,
            "digest": content_digest(p), "digest_method": DIGEST_METHOD}


def source_difference(recorded: dict[str, Any] | None, path: str | Path) -> str | None:
    """Why the file at path is not the one a store recorded (None when it is). Stores written before the digest
    was recorded are compared by size alone, and say so."""
    recorded = recorded or {}
    p = Path(path)
    size = sum(f.stat().st_size for f in _files(p))
    if recorded.get("size") is not None and int(recorded["size"]) != size:
        return f"{size:,} bytes here, {int(recorded['size']):,} bytes recorded from {recorded.get('path', '?')}"
    if recorded.get("digest"):
        if recorded["digest"] != content_digest(p):
            return f"same size, different content from {recorded.get('path', '?')} (content digest differs)"
        return None
    if recorded.get("size") is None:
        return "the store records no size or digest of its file: it cannot be shown to be this file"
    return None
