"""The read view of one committed slide: its attributes, and its arrays read lazily, only the rows asked."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import numpy as np
import zarr

from slidecache.errors import ConfigError, SlideNotFound
from store.schema import DATA, MAX_BLOCK_ROWS, data_group

DENSE_READ_FRACTION = 4  # read the whole span when at least 1 row in 4 of it is wanted

Rows = slice | Sequence[int] | np.ndarray | None


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
            width = self.embedding_dim // 2 if self._cls_width is None else self._cls_width
            if not width:
                raise ConfigError(f"slide {self.slide_id!r}: this store's encoder has no class token (a learned "
                                  "pooler's embedding); use pooling mean or max")
            return self._group["pooled_mean"][:width]  # type: ignore[index]
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
