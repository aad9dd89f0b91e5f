"""slidecache's embedding store: the contract between the one extraction pass and everything after it.

Imports neither torch nor ray, nor any other package of ours. Entry points:
`EmbeddingStore.open(url)` to read, `EmbeddingStore.create_or_open(url, kind=..., spec=...)` to write,
`load_cohort(...)` for slide tables and `load_clinical(...)` for per-patient outcomes.
"""

from store.embedding_store import SCHEMA_VERSION, EmbeddingStore, SlideView, SlideWriter
from store.errors import *  # noqa: F401,F403  (the one error hierarchy)
from store.ids import patient_id_for, tcga_patient_id, validate_slide_id
from store.provenance import fingerprint, provenance

__all__ = [
    "SCHEMA_VERSION", "EmbeddingStore", "SlideView", "SlideWriter",
    "patient_id_for", "tcga_patient_id", "validate_slide_id", "fingerprint", "provenance",
]
