"""The store's schema: its layout, the names in it, its compression and chunking, and the root-attribute checks.

Layout (schema 2):
    <root>                 attrs: schema_version, kind, fingerprint, fingerprint_spec, provenance, imported
      slides/<slide_id>/   the marker. attrs: source, patient_id, mpp, ..., n_tiles, fingerprint, `data`;
                           `complete` LAST; `writer` (a lease) while a write is in progress
        <data>/            the arrays of the committed write, in a group named after its writer (w-<token>):
          coords      int32   (N, 2)         level-0 pixel x, y of each tile's top-left corner
          tissue      float16 (N,)           tissue fraction of each tile (NaN when unknown, e.g. imported)
          embeddings  float16 (N, D)         class ‖ mean-patch, sharded, zstd
          tokens      float16 (N, T, C)      optional pooled patch-token grids
          pooled_mean float32 (D,)           mean over the slide's tiles, written at commit
          pooled_max  float32 (D,)           max over the slide's tiles, written at commit
          thumbnail   uint8   (h, w, 3)      optional, with tissue_mask uint8 (h, w); attrs downsample
      failures/<slide_id>  attrs: error_class, message, traceback_tail, attempts, last_attempt_at
      slide_embeddings/<set>/  slide-embedding sets made from these tiles: see store/slide_embeddings.py
    Schema 1 (still read): a slide's arrays directly in its group, no `data` attribute.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from slidecache.errors import StoreSchemaError
from store.backends import display_url

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: arrays directly in the slide group; a store written to is upgraded to 2
KINDS = ("slides", "images")
SLIDES, FAILURES = "slides", "failures"
COMPLETE, WRITER, DATA = "complete", "writer", "data"
LEASE_ENV = "SLIDECACHE_LEASE_SECONDS"

ZSTD = [ZstdCodec(level=3)]  # the small arrays: coords, tissue, pooled vectors, thumbnails
# Compression of the float arrays (embeddings, tokens), chosen per store at creation; it does not change
# the numbers, so it is a layout attribute, not part of the fingerprint. "zstd" (byte-shuffle + zstd via
# blosc) stores ~0.43 of TRIDENT's fp32 bytes and suits object storage, where bytes cost time; "none"
# (~0.50) decodes faster on a local disk where the CPU is the limit. bench/store_bench.py measures both.
FLOAT_COMPRESSION = {
    "zstd": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
    "none": None,
}
DEFAULT_COMPRESSION = "zstd"
_CHUNK_TARGET_BYTES = 2 << 20  # inner chunk ~2 MiB: partial reads stay cheap
_BLOCK_TARGET_BYTES = 64 << 20  # one writer block (= one shard per array) buffered in memory at most
MAX_BLOCK_ROWS = 4096


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def block_rows_for(row_bytes: int, max_rows: int = MAX_BLOCK_ROWS) -> int:
    """Rows per writer block (= rows per shard): a power of two, ≤ max_rows, ≤ ~64 MiB buffered."""
    return max(8, min(max_rows, _pow2_floor(_BLOCK_TARGET_BYTES / row_bytes)))


def chunk_rows_for(row_bytes: int, block_rows: int) -> int:
    """Rows per inner chunk: a power of two dividing block_rows, ~2 MiB, at least 2 rows (never one)."""
    return max(min(2, block_rows), min(block_rows, _pow2_floor(_CHUNK_TARGET_BYTES / row_bytes)))


def check_root_attrs(attrs: Mapping[str, Any], url: str) -> None:
    """Refuse a root that is not a slidecache store of a schema this code reads."""
    if attrs.get("schema_version") not in READABLE_SCHEMAS or attrs.get("kind") not in KINDS:
        raise StoreSchemaError(
            f"{display_url(url)} is not a slidecache store of schema {' or '.join(map(str, READABLE_SCHEMAS))} "
            f"(schema_version={attrs.get('schema_version')!r}, kind={attrs.get('kind')!r})"
        )


def check_new_store(kind: str, compression: str) -> None:
    """Refuse a store kind or float compression this schema does not have (before anything is opened)."""
    if kind not in KINDS:
        raise StoreSchemaError(f"store kind must be one of {KINDS}, got {kind!r}")
    if compression not in FLOAT_COMPRESSION:
        raise StoreSchemaError(f"compression must be one of {sorted(FLOAT_COMPRESSION)}, got {compression!r}")


def data_group(marker: zarr.Group, attrs: Mapping[str, Any] | None = None) -> zarr.Group:
    """The group holding a committed slide's arrays: its `data` group (schema 2) or the marker itself (schema 1)."""
    name = (attrs if attrs is not None else marker.attrs).get(DATA)
    return marker[name] if name else marker  # type: ignore[return-value]
