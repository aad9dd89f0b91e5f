"""The Zarr v3 embedding store: one group per slide, streamed writes, commit marker written last.

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
    Schema 1 (still read): a slide's arrays directly in its group, no `data` attribute.

A slide is visible to readers only once its marker says `complete: true`; that attribute is written by
one atomic object write (rename on local disk, one PUT on object storage) after every array is written.
Each write owns its slide through a lease in the marker (store/lease.py), renewed while it writes and
checked before every append and at commit, and writes its arrays into a group of its own: two writers
of one slide never touch each other's arrays, a second writer meeting a live lease is refused
(SlideBusy), and a writer whose slide was taken over stops without keeping or deleting anything of the
other's. An overwrite keeps the old version readable until the new one commits. Writers of different
slides never touch the same object, so processes can write a store concurrently.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.errors import ContainsGroupError, GroupNotFoundError, NodeNotFoundError

from slidecache.cohorts.ids import patient_key, validate_slide_id
from slidecache.errors import (
    FingerprintMismatch,
    SlideBusy,
    SlideNotFound,
    SlideOwnershipLost,
    SlideWriteError,
    StoreNotFound,
    StoreSchemaError,
)
from slidecache.provenance import fingerprint, provenance, spec_differences, utc_now
from slidecache.tile_embeddings import CLS
from store.backends import display_url, opening, zarr_store
from store.lease import DEFAULT_LEASE_SECONDS, Lease

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: arrays directly in the slide group; a store written to is upgraded to 2
KINDS = ("slides", "images")
SLIDES, FAILURES = "slides", "failures"
COMPLETE, WRITER, DATA = "complete", "writer", "data"
LEASE_ENV = "SLIDECACHE_LEASE_SECONDS"

_ZSTD = [ZstdCodec(level=3)]
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
DENSE_READ_FRACTION = 4  # read the whole span when at least 1 row in 4 of it is wanted
TRACEBACK_TAIL_LINES = 12

Rows = slice | Sequence[int] | np.ndarray | None


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def block_rows_for(row_bytes: int, max_rows: int = MAX_BLOCK_ROWS) -> int:
    """Rows per writer block (= rows per shard): a power of two, ≤ max_rows, ≤ ~64 MiB buffered."""
    return max(8, min(max_rows, _pow2_floor(_BLOCK_TARGET_BYTES / row_bytes)))


def chunk_rows_for(row_bytes: int, block_rows: int) -> int:
    """Rows per inner chunk: a power of two dividing block_rows, ~2 MiB, at least 2 rows (never one)."""
    return max(min(2, block_rows), min(block_rows, _pow2_floor(_CHUNK_TARGET_BYTES / row_bytes)))


class EmbeddingStore:
    """An open store. Use `EmbeddingStore.open(url)` to read, `EmbeddingStore.create_or_open(...)` to write."""

    def __init__(self, root: zarr.Group, url: str, read_only: bool) -> None:
        self._root = root
        self.url = url
        self.read_only = read_only
        attrs = dict(root.attrs)
        if attrs.get("schema_version") not in READABLE_SCHEMAS or attrs.get("kind") not in KINDS:
            raise StoreSchemaError(
                f"{display_url(url)} is not a slidecache store of schema {' or '.join(map(str, READABLE_SCHEMAS))} "
                f"(schema_version={attrs.get('schema_version')!r}, kind={attrs.get('kind')!r})"
            )
        if not read_only and attrs["schema_version"] != SCHEMA_VERSION:
            attrs["schema_version"] = SCHEMA_VERSION  # new slides are written in the schema-2 layout
            root.attrs.put(attrs)
        self._attrs = attrs
        self.lease_seconds = float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_SECONDS))

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> EmbeddingStore:
        """Open an existing store ('r' read-only, 'a' read-write). StoreNotFound when there is none."""
        read_only = mode == "r"
        with opening(url, storage_options):  # credentials, network, scheme: one error naming the URL
            try:
                root = zarr.open_group(zarr_store(url, read_only, dict(storage_options or {})),
                                       mode="r" if read_only else "r+")
            except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError) as e:
                raise StoreNotFound(f"no slidecache store at {display_url(url)}: check the path, or extract into it "
                                    "first") from e
            return cls(root, url, read_only)

    @classmethod
    def create_or_open(
        cls,
        url: str,
        *,
        kind: str,
        spec: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        imported: bool = False,
        compression: str = DEFAULT_COMPRESSION,
    ) -> EmbeddingStore:
        """Open a store for writing, creating it if absent; refuse one made with another fingerprint.

        `compression` ("zstd" or "none") applies when the store is created; an existing store keeps its own.
        """
        if kind not in KINDS:
            raise StoreSchemaError(f"store kind must be one of {KINDS}, got {kind!r}")
        if compression not in FLOAT_COMPRESSION:
            raise StoreSchemaError(f"compression must be one of {sorted(FLOAT_COMPRESSION)}, got {compression!r}")
        wanted = fingerprint(spec)
        with opening(url, storage_options):  # credentials, network, scheme: one error naming the URL
            backend = zarr_store(url, read_only=False, storage_options=dict(storage_options or {}))
            try:
                root = zarr.open_group(backend, mode="r+")
            except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError):
                root = zarr.create_group(backend, attributes={
                    "schema_version": SCHEMA_VERSION,
                    "kind": kind,
                    "fingerprint": wanted,
                    "fingerprint_spec": dict(spec),
                    "imported": imported,
                    "layout": {"compression": compression},
                    "provenance": provenance(config),
                })
                root.require_group(SLIDES)
                root.require_group(FAILURES)
                return cls(root, url, read_only=False)
            store = cls(root, url, read_only=False)
        if store.kind != kind:
            raise StoreSchemaError(f"{display_url(url)} holds {store.kind}, not {kind}: one kind per store")
        store.check_fingerprint(spec)
        return store

    def check_fingerprint(self, spec: Mapping[str, Any]) -> None:
        """Refuse a run whose encoder or tiling (`spec`) is not the one this store was made with."""
        wanted = fingerprint(spec)
        if self.fingerprint != wanted:
            diffs = "; ".join(spec_differences(spec, self.spec)) or "specs equal but hashes differ"
            raise FingerprintMismatch(
                f"refusing to write into {display_url(self.url)}: it was made with another encoder or tiling "
                f"(store {self.fingerprint[:12]}, this run {wanted[:12]}): {diffs}. "
                "Use a new store path, or the store's own settings."
            )

    # ---- root facts ----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self._attrs["kind"]

    @property
    def fingerprint(self) -> str:
        return self._attrs["fingerprint"]

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self._attrs["fingerprint_spec"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._attrs.get("provenance", {}))

    @property
    def imported(self) -> bool:
        return bool(self._attrs.get("imported", False))

    @property
    def embedding_dim(self) -> int:
        return int(self.spec["encoder"]["dim"])

    @property
    def _class_token_width(self) -> int:
        """The leading values of a tile embedding that are the class token: all of a class-token encoder's
        (UNI2-h, H-optimus, Prov-GigaPath, Phikon-v2), half of a class ‖ mean-patch one's (Virchow-2)."""
        encoder = self.spec["encoder"]
        return self.embedding_dim if encoder.get("pooling") == CLS else self.embedding_dim // 2

    @property
    def compression(self) -> str:
        return str(self._attrs.get("layout", {}).get("compression", DEFAULT_COMPRESSION))

    @property
    def root_attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    # ---- listing -------------------------------------------------------------------------------

    def _slides_group(self) -> zarr.Group:
        return self._root.require_group(SLIDES) if not self.read_only else self._root[SLIDES]  # type: ignore[return-value]

    def slide_states(self) -> dict[str, bool]:
        """Every slide group present, complete or not (debris): {slide_id: complete}."""
        return {name: bool(group.attrs.get(COMPLETE, False)) for name, group in self._slides_group().groups()}

    def slide_ids(self) -> list[str]:
        """Complete slides only, sorted: what every reader may use."""
        return sorted(sid for sid, complete in self.slide_states().items() if complete)

    def slide_patients(self) -> dict[str, str]:
        """{slide: patient key} over the complete slides with tiles (what reports and references match)."""
        patients = {}
        for slide_id in self.slide_ids():
            slide = self.slide(slide_id)
            if slide.n_tiles:
                patients[slide_id] = patient_key(slide.patient_id)
        return patients

    def __contains__(self, slide_id: str) -> bool:
        return self.is_complete(slide_id)

    def __len__(self) -> int:
        return len(self.slide_ids())

    def slide_group(self, slide_id: str) -> zarr.Group:
        """The raw group of a slide, complete or not (for verify and repair). SlideNotFound if absent."""
        validate_slide_id(slide_id)
        try:
            return zarr.open_group(self._root.store, path=f"{SLIDES}/{slide_id}", mode="r")
        except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError) as e:
            raise SlideNotFound(f"slide {slide_id!r} is not in {display_url(self.url)}") from e

    def is_complete(self, slide_id: str) -> bool:
        try:
            return bool(self.slide_group(slide_id).attrs.get(COMPLETE, False))
        except SlideNotFound:
            return False

    def slide(self, slide_id: str) -> SlideView:
        """A complete slide, read lazily. SlideNotFound for absent or unfinished slides."""
        group = self.slide_group(slide_id)
        if not group.attrs.get(COMPLETE, False):
            raise SlideNotFound(f"slide {slide_id!r} in {display_url(self.url)} is not complete (interrupted write)")
        return SlideView(slide_id, group, self._class_token_width)

    def slides(self) -> Iterator[SlideView]:
        for slide_id in self.slide_ids():
            yield self.slide(slide_id)

    # ---- writing -------------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.read_only:
            raise SlideWriteError(f"{display_url(self.url)} was opened read-only")

    def write_slide(
        self,
        slide_id: str,
        attrs: Mapping[str, Any],
        *,
        token_shape: tuple[int, int] | None = None,
        overwrite: bool = False,
        block_rows: int | None = None,
        lease_seconds: float | None = None,
        lease_token: str | None = None,
        own_tokens: Collection[str] = (),
    ) -> SlideWriter:
        """Start writing one slide; the writer owns it through a lease until commit or abort.

        Debris of a dead writer (an incomplete slide whose lease expired or whose process is gone) is
        deleted first; a slide another live writer owns raises SlideBusy. A lease whose token is
        `lease_token` or in `own_tokens` is the caller's own, from a writer process it knows is gone (a
        restarted actor, a dead node): taken over at once, without waiting for the lease to run out. A complete slide is replaced
        only with overwrite=True, and stays readable until the new version commits. `token_shape` = (T, C)
        when token grids are stored. Use as a context manager: an exception inside removes what this writer
        wrote (and nothing else).
        """
        self._require_writable()
        validate_slide_id(slide_id)
        current, lease = self._marker_lease(slide_id)  # this slide only: listing every slide would be O(n^2)
        if current is not None:
            ours = lease is not None and lease.token in {lease_token, *own_tokens} - {None}
            if lease is not None and lease.alive() and not ours:
                raise SlideBusy(
                    f"slide {slide_id!r} in {display_url(self.url)} is being written by another writer "
                    f"({lease.describe()}), which will commit it; if that writer is gone, wait for its lease to "
                    f"expire or remove the slide with `python -m store rm --force`"
                )
            if current.get(COMPLETE) and not overwrite:
                raise SlideWriteError(
                    f"slide {slide_id!r} is already complete in {display_url(self.url)}; pass overwrite=True "
                    "(or `python -m store rm`) to replace it"
                )
            if not current.get(COMPLETE):
                self._delete_slide_group(slide_id)  # a dead writer's debris
                current = None
        return SlideWriter(self, slide_id, dict(attrs), token_shape=token_shape, block_rows=block_rows,
                           replaces=current, lease=Lease.new(lease_seconds or self.lease_seconds, lease_token))

    def delete_slide(self, slide_id: str, force: bool = False) -> bool:
        """Remove a slide (complete or debris) and its failure record; True if anything was there.

        A slide a live writer owns is refused (SlideBusy) unless `force`: that writer would then find its
        slide gone at its next append and stop.
        """
        self._require_writable()
        validate_slide_id(slide_id)
        _, lease = self._marker_lease(slide_id)
        if lease is not None and lease.alive() and not force:
            raise SlideBusy(f"slide {slide_id!r} is being written ({lease.describe()}); pass force=True "
                            "(`python -m store rm --force`) to remove it anyway")
        removed = self._delete_slide_group(slide_id)
        failures = self._root.require_group(FAILURES)
        if slide_id in failures:
            del failures[slide_id]
            removed = True
        return removed

    def abandon_slide(self, slide_id: str, tokens: Collection[str]) -> bool:
        """Remove an incomplete slide whose writer held one of `tokens` (the caller's own writers, whose
        processes died): True if removed. A complete slide, or one another writer holds, is left alone."""
        self._require_writable()
        current, lease = self._marker_lease(slide_id)
        if current is None or current.get(COMPLETE) or lease is None or lease.token not in set(tokens):
            return False
        return self._delete_slide_group(slide_id)

    def _delete_slide_group(self, slide_id: str) -> bool:
        slides = self._root.require_group(SLIDES)
        if slide_id in slides:
            del slides[slide_id]
            return True
        return False

    # ---- failures ------------------------------------------------------------------------------

    def record_failure(self, slide_id: str, error: BaseException, stage: str = "extract") -> dict[str, Any]:
        """Record (or count again) a slide's failure: error class, message, traceback tail, attempts."""
        self._require_writable()
        validate_slide_id(slide_id)
        failures = self._root.require_group(FAILURES)
        previous = self.failures().get(slide_id, {})
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        record = {
            "error_class": type(error).__name__,
            "message": str(error),
            "traceback_tail": "\n".join(tb.rstrip().splitlines()[-TRACEBACK_TAIL_LINES:]),
            "attempts": int(previous.get("attempts", 0)) + 1,
            "stage": stage,
            "last_attempt_at": utc_now(),
        }
        group = failures.require_group(slide_id)
        group.attrs.put(record)
        return record

    def failures(self) -> dict[str, dict[str, Any]]:
        try:
            failures = self._root[FAILURES]
        except KeyError:
            return {}
        return {name: dict(group.attrs) for name, group in failures.groups()}  # type: ignore[union-attr]

    def clear_failure(self, slide_id: str) -> None:
        self._require_writable()
        failures = self._root.require_group(FAILURES)
        if slide_id in failures:
            del failures[slide_id]

    # ---- internals for the writer ----------------------------------------------------------------

    def _marker_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """The slide marker's attributes as stored now (a fresh read), or None when there is no slide."""
        try:
            return dict(self.slide_group(slide_id).attrs)
        except SlideNotFound:
            return None

    def _marker_lease(self, slide_id: str) -> tuple[dict[str, Any] | None, Lease | None]:
        """(the marker's attributes, the lease of the writer holding the slide), each None when absent."""
        attrs = self._marker_attrs(slide_id)
        return attrs, Lease.from_attrs((attrs or {}).get(WRITER))

    def _put_marker(self, slide_id: str, attrs: Mapping[str, Any]) -> zarr.Group:
        """Write the marker's attributes, creating the group if needed; never deletes what is inside it."""
        try:
            group = zarr.open_group(self._root.store, path=f"{SLIDES}/{slide_id}", mode="r+")
        except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError):
            try:
                return self._root.require_group(SLIDES).create_group(slide_id, attributes=dict(attrs))
            except ContainsGroupError:  # created by another writer a moment ago: the lease check decides
                group = zarr.open_group(self._root.store, path=f"{SLIDES}/{slide_id}", mode="r+")
        group.attrs.put(dict(attrs))
        return group


@dataclass
class _Pending:
    coords: list[np.ndarray]
    tissue: list[np.ndarray]
    embeddings: list[np.ndarray]
    tokens: list[np.ndarray]
    rows: int = 0


class SlideWriter:
    """Streams one slide's rows into the store in blocks of whole shards; `commit()` makes it visible.

    Memory stays at one block (≤ ~64 MiB) however many tiles the slide has. The running sum and max
    for the pooled vectors are kept in float64/float32 as rows arrive. The writer owns the slide through
    `lease`: checked before each append and at commit (SlideOwnershipLost when another writer took the
    slide over), renewed by `heartbeat()` (called by append, and by callers that wait between appends).
    """

    def __init__(
        self,
        store: EmbeddingStore,
        slide_id: str,
        attrs: dict[str, Any],
        *,
        token_shape: tuple[int, int] | None,
        block_rows: int | None,
        replaces: dict[str, Any] | None,
        lease: Lease,
    ) -> None:
        if COMPLETE in attrs:
            raise SlideWriteError(f"slide {slide_id!r}: '{COMPLETE}' is written by commit(), not by the caller")
        self.store = store
        self.slide_id = slide_id
        self.dim = store.embedding_dim
        self.dtype = np.dtype(store.spec["encoder"].get("dtype", "float16"))
        self.token_shape = tuple(token_shape) if token_shape else None
        row_bytes = self.dim * self.dtype.itemsize + 8 + 2
        if self.token_shape:
            row_bytes += int(np.prod(self.token_shape)) * self.dtype.itemsize
        self.block_rows = block_rows or block_rows_for(row_bytes)
        self.lease = lease
        self.data_name = f"w-{lease.token[:16]}"
        self._started = time.perf_counter()
        self._attrs = {**attrs, "fingerprint": store.fingerprint}  # the new version's, written at commit
        self._replaces = replaces  # the complete version this write replaces (readable until commit), or None
        self._done = False
        self._group = store._put_marker(slide_id, self._marker())
        self._check_owner()  # read after write: of two writers that started together, one goes on
        self._data = self._group.create_group(self.data_name)
        self._arrays = self._create_arrays()
        self._pending = _Pending([], [], [], [])
        self._written = 0
        self._sum = np.zeros(self.dim, dtype=np.float64)
        self._max = np.full(self.dim, -np.inf, dtype=np.float32)

    def _marker(self) -> dict[str, Any]:
        base = dict(self._replaces) if self._replaces is not None else {**self._attrs, COMPLETE: False}
        return {**base, WRITER: self.lease.to_attrs()}

    def _create_arrays(self) -> dict[str, zarr.Array]:
        b = self.block_rows
        g = self._data
        floats = FLOAT_COMPRESSION[self.store.compression]
        emb_chunk = chunk_rows_for(self.dim * self.dtype.itemsize, b)
        arrays = {
            "coords": g.create_array("coords", shape=(0, 2), dtype="int32", chunks=(b, 2), compressors=_ZSTD),
            "tissue": g.create_array("tissue", shape=(0,), dtype="float16", chunks=(b,), compressors=_ZSTD),
            "embeddings": g.create_array("embeddings", shape=(0, self.dim), dtype=self.dtype,
                                         chunks=(emb_chunk, self.dim), shards=(b, self.dim), compressors=floats),
        }
        if self.token_shape:
            t, c = self.token_shape
            tok_chunk = chunk_rows_for(t * c * self.dtype.itemsize, b)
            arrays["tokens"] = g.create_array("tokens", shape=(0, t, c), dtype=self.dtype,
                                              chunks=(tok_chunk, t, c), shards=(b, t, c), compressors=floats)
        return arrays

    # ---- ownership -----------------------------------------------------------------------------

    def _check_owner(self) -> None:
        """Raise SlideOwnershipLost (after removing this writer's own arrays) unless the marker holds our lease."""
        current, holder = self.store._marker_lease(self.slide_id)
        if holder is not None and holder.token == self.lease.token:
            return
        self._done = True
        self._remove_own_data()
        if current is None:
            why = "was removed (`python -m store rm --force`?)"
        elif holder is not None:
            why = f"was taken over by another writer ({holder.describe()})"
        else:
            why = "was committed by another writer"
        raise SlideOwnershipLost(f"slide {self.slide_id!r} {why} while this writer was writing it (its lease "
                                 f"{'was renewed' if self._written else 'started'} {time.time() - self.lease.heartbeat_at:.0f} s "
                                 "ago); this writer stopped and kept nothing")

    def heartbeat(self) -> None:
        """Renew the lease when a tenth of it has passed (cheap to call often)."""
        if self._done or not self.lease.due_for_renewal():
            return
        self._check_owner()
        self.lease = self.lease.renewed()
        self._group.attrs.put(self._marker())

    def _remove_own_data(self) -> None:
        try:
            if self.data_name in self._group:
                del self._group[self.data_name]
        except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError, KeyError):
            pass  # the whole slide is gone already

    # ---- rows ----------------------------------------------------------------------------------

    def append(
        self,
        coords: np.ndarray,
        tissue: np.ndarray,
        embeddings: np.ndarray,
        tokens: np.ndarray | None = None,
    ) -> None:
        """Add rows: coords (n, 2) level-0 px, tissue (n,), embeddings (n, D), tokens (n, T, C)."""
        if self._done:
            raise SlideWriteError(f"slide {self.slide_id!r}: append after commit or abort")
        coords = np.asarray(coords)
        tissue = np.asarray(tissue, dtype=np.float32).reshape(-1)
        emb = np.asarray(embeddings)
        n = emb.shape[0] if emb.ndim == 2 else -1
        self._check(emb.ndim == 2 and emb.shape[1] == self.dim,
                    f"embeddings must be (n, {self.dim}), got {emb.shape}")
        self._check(coords.shape == (n, 2), f"coords must be ({n}, 2), got {coords.shape}")
        self._check(tissue.shape == (n,), f"tissue must have {n} values, got {tissue.shape}")
        self._check(np.issubdtype(coords.dtype, np.integer), f"coords must be integers, got {coords.dtype}")
        if n and (coords.min() < 0 or coords.max() > np.iinfo(np.int32).max):
            raise SlideWriteError(f"slide {self.slide_id!r}: coords must be non-negative int32 level-0 pixels")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is caught just below
            stored = emb.astype(self.dtype, copy=False)
        bad = ~np.isfinite(stored).all(axis=1)
        if bad.any():
            row = self._written + self._pending.rows + int(np.argmax(bad))
            raise SlideWriteError(
                f"slide {self.slide_id!r}: embedding row {row} is NaN/Inf (after casting to {self.dtype}); "
                "check the encoder's precision and input"
            )
        if self.token_shape:
            self._check(tokens is not None, "this slide stores token grids: pass tokens")
            tok = np.asarray(tokens).astype(self.dtype, copy=False)
            self._check(tok.shape == (n, *self.token_shape), f"tokens must be ({n}, {self.token_shape}), got {tok.shape}")
            self._check(bool(np.isfinite(tok).all()), "token grids hold NaN/Inf")
        elif tokens is not None:
            raise SlideWriteError(f"slide {self.slide_id!r}: tokens given but the writer was opened without token_shape")
        if self.lease.due_for_renewal():
            self.heartbeat()  # checks ownership too
        else:
            self._check_owner()
        if self.token_shape:
            self._pending.tokens.append(tok)
        self._sum += stored.astype(np.float64).sum(axis=0)
        if n:
            np.maximum(self._max, stored.max(axis=0).astype(np.float32), out=self._max)
        self._pending.coords.append(coords.astype(np.int32))
        self._pending.tissue.append(tissue.astype(np.float16))
        self._pending.embeddings.append(stored)
        self._pending.rows += n
        while self._pending.rows >= self.block_rows:
            self._flush(self.block_rows)

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise SlideWriteError(f"slide {self.slide_id!r}: {message}")

    def _flush(self, rows: int) -> None:
        """Write the first `rows` pending rows at the end of every array (whole shards except the last)."""
        if rows == 0:
            return
        p = self._pending
        parts = {"coords": p.coords, "tissue": p.tissue, "embeddings": p.embeddings}
        if self.token_shape:
            parts["tokens"] = p.tokens
        start, stop = self._written, self._written + rows
        for name, blocks in parts.items():
            data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
            head, rest = data[:rows], data[rows:]
            array = self._arrays[name]
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = head
            blocks[:] = [rest] if len(rest) else []
        p.rows -= rows
        self._written = stop

    def set_thumbnail(self, rgb: np.ndarray, tissue_mask: np.ndarray | None, downsample: float) -> None:
        """A small RGB picture of the slide (uint8 h x w x 3), its tissue mask and level-0 px per pixel."""
        rgb = np.asarray(rgb)
        self._check(rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8,
                     f"thumbnail must be uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
        g = self._data
        g.create_array("thumbnail", data=rgb, chunks=rgb.shape, compressors=_ZSTD, overwrite=True)
        if tissue_mask is not None:
            mask = np.asarray(tissue_mask)
            self._check(mask.shape == rgb.shape[:2], f"tissue mask {mask.shape} must match thumbnail {rgb.shape[:2]}")
            g.create_array("tissue_mask", data=mask.astype(np.uint8), chunks=mask.shape, compressors=_ZSTD, overwrite=True)
        g["thumbnail"].attrs.put({"downsample": float(downsample)})

    @property
    def rows_written(self) -> int:
        return self._written + self._pending.rows

    # ---- commit / abort ------------------------------------------------------------------------

    def commit(self, extra_attrs: Mapping[str, Any] | None = None, empty_reason: str | None = None) -> SlideView:
        """Flush, write pooled vectors, then the commit marker (last). A slide of 0 tiles needs a reason."""
        if self._done:
            raise SlideWriteError(f"slide {self.slide_id!r}: committed or aborted already")
        self._flush(self._pending.rows)
        n = self._written
        if n == 0 and not empty_reason:
            raise SlideWriteError(f"slide {self.slide_id!r}: no tiles were written; commit with empty_reason=...")
        if n:
            mean = (self._sum / n).astype(np.float32)
            for name, vec in (("pooled_mean", mean), ("pooled_max", self._max)):
                self._data.create_array(name, data=vec, chunks=vec.shape, compressors=_ZSTD, overwrite=True)
        attrs = {**self._attrs, **(extra_attrs or {})}
        attrs.update({
            "n_tiles": n,
            "embedding_dim": self.dim,
            "has_tokens": bool(self.token_shape),
            "token_shape": list(self.token_shape) if self.token_shape else None,
            "empty_reason": empty_reason if n == 0 else None,
            "write_seconds": round(time.perf_counter() - self._started, 3),
            "committed_at": utc_now(),
            DATA: self.data_name,
            COMPLETE: True,  # the marker: one atomic write of the group's zarr.json, after everything else
        })
        self._check_owner()  # the last moment another writer could have taken the slide over
        self._group.attrs.put(attrs)
        self._done = True
        for name in [name for name, _ in self._group.members() if name != self.data_name]:
            del self._group[name]  # the replaced version, a dead writer's leftovers, or schema-1 arrays
        self.store.clear_failure(self.slide_id)
        return self.store.slide(self.slide_id)

    def abort(self) -> None:
        """Remove what this writer wrote (best effort; a crash leaves debris the next writer removes once the
        lease is dead). A replaced complete version stays as it was; another writer's slide is never touched."""
        if self._done:
            return
        self._done = True
        _, holder = self.store._marker_lease(self.slide_id)
        if holder is None or holder.token != self.lease.token:
            self._remove_own_data()
        elif self._replaces is not None:
            self._group.attrs.put(self._replaces)  # the old version, readable all along, without our lease
            self._remove_own_data()
        else:
            self.store._delete_slide_group(self.slide_id)

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.abort()
            raise SlideWriteError(f"slide {self.slide_id!r}: writer closed without commit(); nothing was kept")


def data_group(marker: zarr.Group, attrs: Mapping[str, Any] | None = None) -> zarr.Group:
    """The group holding a committed slide's arrays: its `data` group (schema 2) or the marker itself (schema 1)."""
    name = (attrs if attrs is not None else marker.attrs).get(DATA)
    return marker[name] if name else marker  # type: ignore[return-value]


class SlideView:
    """One complete slide, read lazily: arrays are read only for the rows asked."""

    def __init__(self, slide_id: str, group: zarr.Group, class_token_width: int | None = None) -> None:
        self.slide_id = slide_id
        self._cls_width = class_token_width  # None: the first half (class ‖ mean patch embeddings)
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._group = data_group(group, self.attrs)

    def __repr__(self) -> str:
        return f"SlideView({self.slide_id!r}, n_tiles={self.n_tiles}, dim={self.embedding_dim})"

    @property
    def n_tiles(self) -> int:
        return int(self.attrs["n_tiles"])

    @property
    def embedding_dim(self) -> int:
        return int(self.attrs["embedding_dim"])

    @property
    def patient_id(self) -> str:
        return str(self.attrs.get("patient_id") or self.slide_id)

    @property
    def commit_id(self) -> str | None:
        """Which commit of the slide this is: every commit writes its own data group, so it differs for a slide
        deleted and written again within the second `committed_at` resolves. Hashed, so that what copies it
        (QC files, digests) holds nothing of the writer's lease token the group is named after."""
        if "committed_at" not in self.attrs:
            return None
        identity = f"{self.attrs['committed_at']}/{self.attrs.get(DATA, '')}"
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    @property
    def has_tokens(self) -> bool:
        return bool(self.attrs.get("has_tokens"))

    def _read(self, name: str, rows: Rows) -> np.ndarray:
        array = self._group[name]
        if rows is None:
            return array[...]  # type: ignore[index]
        if isinstance(rows, slice):
            return array[rows]  # type: ignore[index]
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        if index.size == 0:
            return np.empty((0, *array.shape[1:]), dtype=array.dtype)  # type: ignore[union-attr]
        if index.min() < -self.n_tiles or index.max() >= self.n_tiles:
            raise IndexError(f"slide {self.slide_id!r} has {self.n_tiles} tiles; row index out of range")
        index = np.where(index < 0, index + self.n_tiles, index)
        unique, inverse = np.unique(index, return_inverse=True)  # sorted reads, then back to caller order
        lo, hi = int(unique[0]), int(unique[-1]) + 1
        if len(unique) * DENSE_READ_FRACTION >= hi - lo:
            # Dense selections: one contiguous read, then index in memory (zarr's orthogonal indexing
            # decodes per index run and is ~20x slower than a slice when most rows are wanted).
            return array[lo:hi][unique - lo][inverse]  # type: ignore[index]
        return array.oindex[(unique,) + (slice(None),) * (array.ndim - 1)][inverse]  # type: ignore[union-attr]

    def embeddings(self, rows: Rows = None) -> np.ndarray:
        """(n, D) float16 for a slice, an index array (any order, repeats allowed) or all rows."""
        return self._read("embeddings", rows)

    def coords(self, rows: Rows = None) -> np.ndarray:
        return self._read("coords", rows)

    def tissue(self, rows: Rows = None) -> np.ndarray:
        return self._read("tissue", rows)

    def tokens(self, rows: Rows = None) -> np.ndarray:
        if not self.has_tokens:
            raise SlideNotFound(f"slide {self.slide_id!r} was extracted without token grids (--tokens)")
        return self._read("tokens", rows)

    def pooled(self, kind: str = "mean") -> np.ndarray:
        """The slide vector written at commit: 'mean', 'max', or 'cls' (the class-token half of the mean)."""
        if self.n_tiles == 0:
            raise SlideNotFound(f"slide {self.slide_id!r} has no tiles ({self.attrs.get('empty_reason')})")
        if kind == "cls":
            return self._group["pooled_mean"][: self._cls_width or self.embedding_dim // 2]  # type: ignore[index]
        if kind not in ("mean", "max"):
            raise ValueError(f"pooling must be mean, max or cls, got {kind!r}")
        return self._group[f"pooled_{kind}"][...]  # type: ignore[index]

    def thumbnail(self) -> tuple[np.ndarray, np.ndarray | None, float] | None:
        """(rgb, tissue mask or None, level-0 px per thumbnail px), or None when none was stored."""
        if "thumbnail" not in self._group:
            return None
        thumb = self._group["thumbnail"]
        mask = self._group["tissue_mask"][...] if "tissue_mask" in self._group else None  # type: ignore[index]
        return thumb[...], mask, float(thumb.attrs["downsample"])  # type: ignore[index]

    def row_blocks(self, block_rows: int | None = None) -> Iterator[slice]:
        """Slices covering all rows, aligned to the stored shards: for streaming a whole slide."""
        step = block_rows or int(self._group["embeddings"].shards[0] or MAX_BLOCK_ROWS)  # type: ignore[union-attr]
        for start in range(0, self.n_tiles, step):
            yield slice(start, min(start + step, self.n_tiles))

    def array_names(self) -> list[str]:
        return sorted(name for name, _ in self._group.arrays())
