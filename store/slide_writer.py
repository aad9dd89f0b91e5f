"""The writer of one slide: rows streamed in blocks of whole shards, owned through a lease, committed last.

A write's arrays go into a group of its own (named after its lease), and the slide becomes visible only
when `commit()` writes `complete: true` into the marker, after every array: see store/embedding_store.py
for how writers of one slide exclude each other and store/schema.py for the layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Mapping, Protocol

import numpy as np
import zarr
from zarr.errors import GroupNotFoundError, NodeNotFoundError

from slidecache.errors import SlideOwnershipLost, SlideWriteError
from slidecache.provenance import utc_now
from store.lease import Lease
from store.schema import COMPLETE, DATA, FLOAT_COMPRESSION, WRITER, ZSTD, block_rows_for, chunk_rows_for
from store.slide_view import SlideView


class WriterStore(Protocol):
    """What a SlideWriter uses of its store (an EmbeddingStore): a protocol, because the store's module
    imports this one to hand out writers."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def spec(self) -> dict[str, Any]: ...

    @property
    def embedding_dim(self) -> int: ...

    @property
    def compression(self) -> str: ...

    def slide(self, slide_id: str) -> SlideView: ...

    def clear_failure(self, slide_id: str) -> None: ...

    def _marker_lease(self, slide_id: str) -> tuple[dict[str, Any] | None, Lease | None]: ...

    def _put_marker(self, slide_id: str, attrs: Mapping[str, Any]) -> zarr.Group: ...

    def _delete_slide_group(self, slide_id: str) -> bool: ...


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
        store: WriterStore,
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
            "coords": g.create_array("coords", shape=(0, 2), dtype="int32", chunks=(b, 2), compressors=ZSTD),
            "tissue": g.create_array("tissue", shape=(0,), dtype="float16", chunks=(b,), compressors=ZSTD),
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
        g.create_array("thumbnail", data=rgb, chunks=rgb.shape, compressors=ZSTD, overwrite=True)
        if tissue_mask is not None:
            mask = np.asarray(tissue_mask)
            self._check(mask.shape == rgb.shape[:2], f"tissue mask {mask.shape} must match thumbnail {rgb.shape[:2]}")
            g.create_array("tissue_mask", data=mask.astype(np.uint8), chunks=mask.shape, compressors=ZSTD, overwrite=True)
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
                self._data.create_array(name, data=vec, chunks=vec.shape, compressors=ZSTD, overwrite=True)
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
