"""The store contract: every backend (local folder, memory://, s3:// on a local moto server) passes it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from slidecache.errors import (
    FingerprintMismatch,
    InvalidSlideId,
    SlideNotFound,
    SlideWriteError,
    StoreNotFound,
    StoreSchemaError,
)
from store import EmbeddingStore
from store.schema import data_group
from store.verify import verify_store
from tests.store.helpers import DIM, slide_rows, spec, write_slide


@pytest.fixture
def store(backend) -> EmbeddingStore:
    url, options = backend
    return EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), storage_options=options,
                                         config={"storage_options": options, "hf_token": "hf_secretvalue123"})


def test_round_trip_all_arrays(store, backend):
    n = 1500
    coords, tissue, emb = slide_rows(n)
    tokens = np.random.default_rng(1).normal(size=(n, 4, 8)).astype(np.float16)
    thumb = np.random.default_rng(2).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    mask = thumb[..., 0] > 128
    with store.write_slide("TCGA-AB-1234-01Z-00-DX1", {"patient_id": "TCGA-AB-1234", "mpp": 0.25},
                           token_shape=(4, 8), block_rows=256) as w:
        for start in range(0, n, 700):  # blocks that do not align with the shards
            stop = start + 700
            w.append(coords[start:stop], tissue[start:stop], emb[start:stop], tokens[start:stop])
        w.set_thumbnail(thumb, mask, downsample=32.0)
        w.commit(extra_attrs={"reader": "test"})

    reopened = EmbeddingStore.open(backend[0], storage_options=backend[1])
    assert reopened.slide_ids() == ["TCGA-AB-1234-01Z-00-DX1"]
    s = reopened.slide("TCGA-AB-1234-01Z-00-DX1")
    assert s.n_tiles == n and s.embedding_dim == DIM and s.patient_id == "TCGA-AB-1234"
    assert s.attrs["reader"] == "test" and s.attrs["complete"] is True
    np.testing.assert_array_equal(s.embeddings(), emb)
    np.testing.assert_array_equal(s.coords(), coords)
    np.testing.assert_array_equal(s.tissue(), tissue.astype(np.float16))
    np.testing.assert_array_equal(s.tokens(), tokens)
    np.testing.assert_allclose(s.pooled("mean"), emb.astype(np.float64).mean(0), atol=1e-6)
    np.testing.assert_array_equal(s.pooled("max"), emb.max(0).astype(np.float32))
    np.testing.assert_array_equal(s.pooled("cls"), s.pooled("mean")[: DIM // 2])
    got_thumb, got_mask, downsample = s.thumbnail()
    np.testing.assert_array_equal(got_thumb, thumb)
    np.testing.assert_array_equal(got_mask.astype(bool), mask)
    assert downsample == 32.0
    assert reopened.slide("TCGA-AB-1234-01Z-00-DX1").attrs["fingerprint"] == reopened.fingerprint


def test_lazy_reads_by_range_and_index(store):
    _, _, _, emb, _ = write_slide(store, "s1", 3000, block_rows=512)
    s = store.slide("s1")
    np.testing.assert_array_equal(s.embeddings(slice(100, 900)), emb[100:900])
    index = np.array([2999, 5, 5, 1024, 0, 512])
    np.testing.assert_array_equal(s.embeddings(index), emb[index])
    np.testing.assert_array_equal(s.embeddings([-1]), emb[[-1]])
    assert s.embeddings(np.array([], dtype=int)).shape == (0, DIM)
    with pytest.raises(IndexError, match="3000 tiles"):
        s.embeddings([3000])
    blocks = list(s.row_blocks())
    assert blocks[0] == slice(0, 512) and blocks[-1].stop == 3000


def test_unfinished_slide_is_invisible_and_replaced_once_its_writer_is_dead(store):
    coords, tissue, emb = slide_rows(600)
    w = store.write_slide("half", {"patient_id": "p"}, block_rows=128, lease_seconds=3)  # seconds: a loaded
    w.append(coords, tissue, emb)  # several shards already on storage, no commit  # S3 server is slow
    assert store.slide_ids() == []
    assert store.slide_states() == {"half": False}
    with pytest.raises(SlideNotFound, match="not complete"):
        store.slide("half")
    w.heartbeat()  # renewed now (it is due), then the writer goes silent
    problems = verify_store(store)
    assert [p.severity for p in problems] == ["warning"] and "being written" in problems[0].message
    time.sleep(3.1)  # its lease runs out
    problems = verify_store(store)
    assert [p.severity for p in problems] == ["warning"] and "interrupted" in problems[0].message
    view, *_ = write_slide(store, "half", 50, seed=3)  # the next write deletes the debris first
    assert view.n_tiles == 50 and store.slide_ids() == ["half"]


def test_exception_inside_writer_leaves_nothing(store):
    coords, tissue, emb = slide_rows(100)
    with pytest.raises(RuntimeError, match="reader died"):
        with store.write_slide("boom", {"patient_id": "p"}) as w:
            w.append(coords, tissue, emb)
            raise RuntimeError("reader died")
    assert store.slide_states() == {}


def test_zero_tile_slide_needs_a_reason(store):
    with store.write_slide("empty", {"patient_id": "p"}) as w:
        with pytest.raises(SlideWriteError, match="empty_reason"):
            w.commit()
        w.commit(empty_reason="no tissue above 25%")
    s = store.slide("empty")
    assert s.n_tiles == 0 and s.attrs["empty_reason"] == "no tissue above 25%"
    assert s.embeddings().shape == (0, DIM)
    with pytest.raises(SlideNotFound, match="no tiles"):
        s.pooled()
    assert verify_store(store) == []


def test_bad_rows_are_refused_with_the_row(store):
    coords, tissue, emb = slide_rows(10)
    with store.write_slide("bad", {"patient_id": "p"}) as w:
        emb = emb.astype(np.float32)
        emb[7, 3] = np.nan
        with pytest.raises(SlideWriteError, match="row 7 is NaN"):
            w.append(coords, tissue, emb)
        too_big = np.full((10, DIM), 1e6, np.float32)  # overflows float16
        with pytest.raises(SlideWriteError, match="row 0 is NaN/Inf"):
            w.append(coords, tissue, too_big)
        with pytest.raises(SlideWriteError, match=r"embeddings must be \(n, 32\)"):
            w.append(coords, tissue, np.zeros((10, 31)))
        with pytest.raises(SlideWriteError, match="coords must be"):
            w.append(coords[:9], tissue, np.zeros((10, DIM)))
        with pytest.raises(SlideWriteError, match="tokens given"):
            w.append(coords, tissue, np.zeros((10, DIM)), tokens=np.zeros((10, 4, 8)))
        w.append(coords, tissue, np.zeros((10, DIM)))
        w.commit()
    assert store.slide("bad").n_tiles == 10


def test_complete_slide_is_not_overwritten_by_accident(store):
    write_slide(store, "s", 20)
    with pytest.raises(SlideWriteError, match="already complete"):
        store.write_slide("s", {"patient_id": "p"})
    view, *_ = write_slide_overwrite(store, "s", 7)
    assert view.n_tiles == 7


def write_slide_overwrite(store, slide_id, n):
    coords, tissue, emb = slide_rows(n, seed=9)
    with store.write_slide(slide_id, {"patient_id": "p"}, overwrite=True) as w:
        w.append(coords, tissue, emb)
        return (w.commit(),)


def test_fingerprint_and_kind_are_enforced(store, backend):
    url, options = backend
    write_slide(store, "s", 5)
    same = EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), storage_options=options)
    assert same.slide_ids() == ["s"]
    with pytest.raises(FingerprintMismatch, match=r"tiling.tile_px: store has 224, this run has 256"):
        EmbeddingStore.create_or_open(url, kind="slides", spec=spec(tile_px=256), storage_options=options)
    with pytest.raises(StoreSchemaError, match="one kind per store"):
        EmbeddingStore.create_or_open(url, kind="images", spec=spec(), storage_options=options)


def test_failures_are_counted_and_cleared_by_success(store):
    for attempt in range(2):
        try:
            raise OSError(f"cannot decode tile ({attempt})")
        except OSError as e:
            record = store.record_failure("flaky", e)
    assert record["attempts"] == 2 and record["error_class"] == "OSError"
    assert "cannot decode tile (1)" in record["message"] and "OSError" in record["traceback_tail"]
    assert set(store.failures()) == {"flaky"}
    write_slide(store, "flaky", 3)
    assert store.failures() == {}


def test_delete_slide(store):
    write_slide(store, "a", 3)
    write_slide(store, "b", 3)
    assert store.delete_slide("a") is True
    assert store.delete_slide("a") is False
    assert store.slide_ids() == ["b"]


def test_invalid_slide_ids_are_refused(store):
    for bad in ["", "a/b", "..", "x..y", "a\\b", ".hidden", "tab\there", " padded"]:
        with pytest.raises(InvalidSlideId):
            store.write_slide(bad, {"patient_id": "p"})


def test_verify_finds_tampering(store):
    write_slide(store, "good", 40)
    write_slide(store, "tampered", 40, seed=1)
    assert verify_store(store) == []
    group = store._root["slides/tampered"]
    data_group(group)["pooled_mean"][0] = 1000.0
    attrs = dict(group.attrs)
    attrs["n_tiles"] = 41
    group.attrs.put(attrs)
    messages = [str(p) for p in verify_store(store)]
    assert messages and all("slide tampered" in m for m in messages)
    assert any("coords has shape (40, 2), expected (41, 2)" in m for m in messages)


def test_no_secret_reaches_the_store(store, backend):
    write_slide(store, "s", 3)
    attrs = json.dumps(EmbeddingStore.open(backend[0], storage_options=backend[1]).root_attrs)
    assert "hf_secretvalue123" not in attrs
    assert '"secret": "x"' not in attrs and '"key": "x"' not in attrs
    assert "<redacted>" in attrs


def test_open_missing_store(backend):
    url, options = backend
    with pytest.raises(StoreNotFound, match="no slidecache store"):
        EmbeddingStore.open(url, storage_options=options)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_compression_is_a_layout_choice_not_a_fingerprint(tmp_path, compression):
    url = str(tmp_path / compression)
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), compression=compression)
    _, _, _, emb, _ = write_slide(store, "s", 700)
    reopened = EmbeddingStore.open(url)
    assert reopened.compression == compression
    np.testing.assert_array_equal(reopened.slide("s").embeddings(), emb)
    other = EmbeddingStore.create_or_open(str(tmp_path / "other"), kind="slides", spec=spec(), compression="none")
    assert other.fingerprint == store.fingerprint  # same numbers, same fingerprint
    with pytest.raises(StoreSchemaError, match="compression must be one of"):
        EmbeddingStore.create_or_open(str(tmp_path / "bad"), kind="slides", spec=spec(), compression="gzip")
