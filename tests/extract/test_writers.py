"""The writers that run inside an encoder actor (extract/writers.py), without Ray: appends written behind
the caller in order, an append's error surfacing at the slide's next call or its commit (nothing of that
slide kept), a chunk from an earlier life of the process refused, and the lease token the caller names."""

from __future__ import annotations

import numpy as np
import pytest

from extract.writers import PinnedWriters
from slidecache.errors import SlideWriteError, WriterRestarted
from store import EmbeddingStore
from store.verify import verify_store
from tests.store.helpers import slide_rows, spec

THUMB, MASK = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool)


@pytest.fixture
def writers(tmp_path):
    url = str(tmp_path / "store.zarr")
    EmbeddingStore.create_or_open(url, kind="slides", spec=spec())
    return url, PinnedWriters(url, {}, None)


def test_rows_are_written_in_order_and_commit_waits_for_them(writers):
    url, w = writers
    coords, tissue, emb = slide_rows(40)
    assert w.open("a", {"patient_id": "p"}, THUMB, MASK, 8.0, "t" * 32, []) == "open"
    for start in range(0, 40, 8):
        assert w.append("a", start, coords[start:start + 8], tissue[start:start + 8], emb[start:start + 8], None) == 8
    assert w.commit("a", {"timings": {}}, None) == 40
    store = EmbeddingStore.open(url)
    np.testing.assert_array_equal(store.slide("a").embeddings(), emb)
    assert verify_store(store) == []
    assert w.open("a", {"patient_id": "p"}, THUMB, MASK, 8.0, "u" * 32, []) == "complete"
    assert w.refused("a")


def test_a_failed_append_fails_the_slide_and_keeps_nothing(writers):
    url, w = writers
    coords, tissue, emb = slide_rows(16)
    bad = emb.copy()
    bad[3] = np.nan
    w.open("b", {"patient_id": "p"}, THUMB, MASK, 8.0, "t" * 32, [])
    w.append("b", 0, coords[:8], tissue[:8], bad[:8], None)  # queued: its error comes at the next call
    with pytest.raises(SlideWriteError, match="NaN"):
        w.append("b", 8, coords[8:], tissue[8:], emb[8:], None)
        w.commit("b", {}, None)
    assert "b" not in EmbeddingStore.open(url).slide_states()


def test_a_chunk_for_an_earlier_life_of_the_process_is_refused(writers):
    url, w = writers
    coords, tissue, emb = slide_rows(16)
    with pytest.raises(WriterRestarted, match="holds no writer"):
        w.append("c", 8, coords[8:], tissue[8:], emb[8:], None)  # opened before a restart: not here
    w.open("c", {"patient_id": "p"}, THUMB, MASK, 8.0, "t" * 32, [])  # Ray retried the opening in the new life
    with pytest.raises(WriterRestarted, match="from row 8 reached a writer holding 0 rows"):
        w.append("c", 8, coords[8:], tissue[8:], emb[8:], None)
    again = PinnedWriters(url, {}, None)  # the driver writes it again, naming the dead writer's token
    again.open("c", {"patient_id": "p"}, THUMB, MASK, 8.0, "v" * 32, ["t" * 32])
    again.append("c", 0, coords, tissue, emb, None)
    assert again.commit("c", {}, None) == 16
