"""What a head reads of a slide: the reading methods of a store's SlideView (store.slide_view), named here
so that heads need no store to be defined, saved or tested."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol

import numpy as np


class SlideTiles(Protocol):
    slide_id: str

    @property
    def attrs(self) -> Mapping[str, Any]: ...

    def embeddings(self, rows: Any = None) -> np.ndarray: ...

    def coords(self, rows: Any = None) -> np.ndarray: ...

    def pooled(self, kind: str = "mean") -> np.ndarray: ...

    def thumbnail(self) -> tuple[np.ndarray, np.ndarray | None, float] | None: ...

    def row_blocks(self, block_rows: int | None = None) -> Iterator[slice]: ...
