"""slidecache's embedding store: the contract between the one extraction pass and everything after it.

Imports neither torch nor ray, nor any stage package of ours (only `slidecache`, the shared library).
Entry points: `EmbeddingStore.open(url)` to read, `EmbeddingStore.create_or_open(url, kind=..., spec=...)`
to write. Names are imported lazily, so `import store` costs nothing until a store is opened.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {  # name -> the module that defines it
    "SCHEMA_VERSION": "store.schema",
    "EmbeddingStore": "store.embedding_store",
    "SlideView": "store.slide_view",
    "SlideWriter": "store.slide_writer",
    "SlideEmbeddingSet": "store.slide_embeddings",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")


__all__ = list(_LAZY)
