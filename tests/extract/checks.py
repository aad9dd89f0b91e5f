"""Checks shared by the extraction tests."""

from __future__ import annotations

import numpy as np

from extract.config import ExtractConfig
from extract.inference import BatchEncoder
from extract.slide_prep import prepare_slide, read_tiles
from slidecache.cohorts.slides import SlideEntry
from store import EmbeddingStore
from store.verify import verify_store


def assert_store_holds_each_slide_once(store: EmbeddingStore, entries: list[SlideEntry], cfg: ExtractConfig) -> None:
    """Every kept tile once, in order, with the embedding the encoder gives it when run directly (to fp16
    and batching tolerance), and a store that verifies."""
    encoder = BatchEncoder(cfg)
    for entry in entries:
        prepared = prepare_slide(entry, cfg)
        slide = store.slide(entry.slide_id)
        np.testing.assert_array_equal(slide.coords(), prepared.coords)
        expected, _ = encoder(read_tiles(prepared.reader, entry.path, prepared.plan, prepared.coords))
        np.testing.assert_allclose(slide.embeddings().astype(np.float32), expected.astype(np.float32), atol=2e-3)
    problems = verify_store(store)
    assert problems == [], problems
