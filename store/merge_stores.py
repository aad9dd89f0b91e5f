"""Merge stores made with the same fingerprint (e.g. one per cluster shard) into one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from slidecache.errors import FingerprintMismatch, StoreSchemaError
from store.backends import display_url
from store.embedding_store import EmbeddingStore
from store.schema import COMPLETE
from store.slide_view import SlideView

_COMMIT_FIELDS = {COMPLETE, "n_tiles", "embedding_dim", "has_tokens", "token_shape", "empty_reason",
                  "write_seconds", "committed_at", "fingerprint"}


@dataclass
class MergeReport:
    copied: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # in several sources: the first source's copy is kept


def copy_slide(slide: SlideView, dst: EmbeddingStore) -> None:
    """Stream one complete slide into another store, block by block, committing at the end."""
    attrs = {k: v for k, v in slide.attrs.items() if k not in _COMMIT_FIELDS}
    token_shape = tuple(slide.attrs["token_shape"]) if slide.has_tokens else None
    with dst.write_slide(slide.slide_id, attrs, token_shape=token_shape) as writer:  # type: ignore[arg-type]
        for rows in slide.row_blocks():
            writer.append(slide.coords(rows), slide.tissue(rows), slide.embeddings(rows),
                          slide.tokens(rows) if slide.has_tokens else None)
        thumb = slide.thumbnail()
        if thumb is not None:
            writer.set_thumbnail(*thumb)
        writer.commit(empty_reason=slide.attrs.get("empty_reason"))


def merge_stores(sources: list[EmbeddingStore], dst_url: str, storage_options: Mapping[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> MergeReport:
    if not sources:
        raise StoreSchemaError("merge needs at least one source store")
    first = sources[0]
    for src in sources[1:]:
        if src.kind != first.kind:
            raise StoreSchemaError(f"{display_url(src.url)} holds {src.kind}, {display_url(first.url)} holds {first.kind}")
        if src.fingerprint != first.fingerprint:
            raise FingerprintMismatch(
                f"{display_url(src.url)} (fingerprint {src.fingerprint[:12]}) was made with another encoder or "
                f"tiling than {display_url(first.url)} ({first.fingerprint[:12]}): such stores cannot be merged"
            )
    dst = EmbeddingStore.create_or_open(
        dst_url, kind=first.kind, spec=first.spec, storage_options=storage_options,
        imported=any(s.imported for s in sources), config={"merged_from": [display_url(s.url) for s in sources]},
    )
    report = MergeReport()
    taken: set[str] = set(dst.slide_ids())
    merged_now: set[str] = set()
    for src in sources:
        for slide_id in src.slide_ids():
            if slide_id in merged_now:
                report.duplicates.append(slide_id)
            elif slide_id in taken:
                report.already_present.append(slide_id)
            else:
                copy_slide(src.slide(slide_id), dst)
                report.copied.append(slide_id)
                merged_now.add(slide_id)
                if progress:
                    progress(slide_id)
    return report
