"""Slide-embedding sets inside a store (store/slide_embeddings.py), on a local folder, memory:// and s3:// (moto):
written whole then marked, read back by slide and as one array, refused under another fingerprint naming both,
stale once their slide's tiles are written again, removable; `verify` checks them."""

from __future__ import annotations

import numpy as np
import pytest

from slidecache.errors import FingerprintMismatch, SlideNotFound, SlideWriteError
from slidecache.provenance import fingerprint
from store import EmbeddingStore
from store.verify import verify_store
from tests.store.helpers import spec, write_slide

DIM = 16


def set_spec(store: EmbeddingStore, weights: str = "random-init:seed=0") -> dict:
    return {"slide_encoder": {"name": "toy", "weights_id": weights, "weights_sha256": None, "dim": DIM,
                              "compute_precision": "fp32"}, "tiles": store.fingerprint}


def tile_store(url: str, options: dict) -> EmbeddingStore:
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), storage_options=options)
    for seed, slide_id in enumerate(("a", "b", "c")):
        write_slide(store, slide_id, 20 + seed, seed=seed)
    return store


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


def test_a_set_is_written_whole_read_back_and_goes_stale_with_its_tiles(backend):
    url, options = backend
    store = tile_store(url, options)
    emb_set = store.slide_embedding_set("toy", spec=set_spec(store))
    for seed, slide_id in enumerate(("a", "b")):
        emb_set.write(slide_id, vector(seed), tile_commit=store.slide(slide_id).commit_id, n_tiles=20 + seed)
    emb_set._slides().require_group("c")  # a write that died before its marker: no reader sees it
    reader = EmbeddingStore.open(url, storage_options=options)
    ids, array = reader.slide_embeddings("toy")
    assert ids == ["a", "b"] and array.dtype == np.float32
    np.testing.assert_array_equal(array, np.stack([vector(0), vector(1)]))
    assert reader.slide_embedding_sets()["toy"].fingerprint == fingerprint(set_spec(store))
    with pytest.raises(SlideNotFound, match="no embedding"):
        reader.slide_embedding_set("toy").embedding("c")
    assert verify_store(reader)[0].message.startswith("slide-embedding set toy: an unfinished write")

    store.delete_slide("a")
    assert reader.slide_embedding_set("toy").stale() == {"a": "its slide is no longer complete in the store"}
    write_slide(store, "a", 25, seed=9)  # slide a extracted again: its embedding was made from other rows
    assert reader.slide_embeddings("toy")[0] == ["b"] and reader.slide_embedding_set("toy").stale().keys() == {"a"}
    assert reader.slide_embeddings("toy", current=False)[0] == ["a", "b"]
    with pytest.raises(SlideNotFound, match="no current embedding of 1 slide"):
        reader.slide_embedding_set("toy").embeddings(["a", "b"])
    emb_set.write("a", vector(5), tile_commit=store.slide("a").commit_id, n_tiles=25)  # recomputed: replaces it
    np.testing.assert_array_equal(reader.slide_embedding_set("toy").embedding("a"), vector(5))
    assert len([name for name, _ in emb_set._slides()["a"].arrays()]) == 1  # the replaced version is gone


def test_a_set_of_another_fingerprint_is_refused_naming_both(tmp_path):
    store = tile_store(str(tmp_path / "s.zarr"), {})
    store.slide_embedding_set("toy", spec=set_spec(store))
    with pytest.raises(FingerprintMismatch, match=r"holds toy \(weights random-init:seed=0.*this run is toy "
                                                  r"\(weights w.safetensors.*rm-slide-embeddings"):
        store.slide_embedding_set("toy", spec=set_spec(store, "w.safetensors"))
    with pytest.raises(FingerprintMismatch, match="made from its own tiles"):
        store.slide_embedding_set("other", spec={**set_spec(store), "tiles": "0" * 64})
    with pytest.raises(SlideWriteError, match=r"is \(16,\), got \(15,\)"):
        store.slide_embedding_set("toy").write("a", np.zeros(15), tile_commit=None, n_tiles=1)
    with pytest.raises(SlideWriteError, match="NaN"):
        store.slide_embedding_set("toy").write("a", np.full(DIM, np.nan), tile_commit=None, n_tiles=1)
    with pytest.raises(SlideNotFound, match="no slide-embedding set 'nope'.*sets: toy"):
        store.slide_embedding_set("nope")
    read_only = EmbeddingStore.open(str(tmp_path / "s.zarr"))
    with pytest.raises(SlideWriteError, match="read-only"):
        read_only.slide_embedding_set("toy", spec=set_spec(store))
    assert store.delete_slide_embedding_set("toy") and not store.slide_embedding_sets()
    assert not store.delete_slide_embedding_set("toy")
