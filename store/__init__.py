"""slidecache's embedding store: the contract between the one extraction pass and everything after it.

Imports neither torch nor ray, nor any other package of ours. Entry points:
`EmbeddingStore.open(url)` to read, `EmbeddingStore.create_or_open(url, kind=..., spec=...)` to write,
`store.cohort.load_cohort(...)` for slide tables and `store.clinical.load_clinical(...)` for outcomes.
Names are imported lazily, so `store.errors` (the one error hierarchy) costs nothing to import: the GPU
benchmark imports it on machines that have torch and timm but no zarr.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import Any

from store.errors import *  # noqa: F401,F403  (the one error hierarchy)

# cuFile (loaded by cuCIM and by CUDA builds of torch) writes cufile.log into the working directory unless
# told where: every process that imports our code (CLIs, Ray workers) keeps it in the temp folder instead.
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.path.join(tempfile.gettempdir(), f"slidecache-cufile-{os.getuid()}.log"))

_LAZY = {
    "SCHEMA_VERSION": "store.embedding_store",
    "EmbeddingStore": "store.embedding_store",
    "SlideView": "store.embedding_store",
    "SlideWriter": "store.embedding_store",
    "patient_id_for": "store.ids",
    "tcga_patient_id": "store.ids",
    "patient_key": "store.ids",
    "validate_slide_id": "store.ids",
    "fingerprint": "store.provenance",
    "provenance": "store.provenance",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")


__all__ = list(_LAZY)
