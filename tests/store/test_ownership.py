"""Writer ownership on every backend: two writers of one slide never lose data silently.

The interleaving that used to lose rows: writer A appends, writer B starts the same slide (which deleted
A's group), A commits a "complete" slide whose early rows are zeros, and B's abort deletes A's slide.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from slidecache.errors import SlideBusy, SlideOwnershipLost, SlideWriteError
from store import EmbeddingStore
from store.verify import verify_store
from tests.store.helpers import slide_rows, spec, write_slide


@pytest.fixture
def store(backend) -> EmbeddingStore:
    url, options = backend
    return EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), storage_options=options)


def _no_zero_rows(store: EmbeddingStore, slide_id: str) -> bool:
    emb = store.slide(slide_id).embeddings().astype(np.float32)
    return bool((np.abs(emb).sum(axis=1) > 0).all())


def test_a_second_writer_meets_the_live_lease_and_the_first_commits_everything(store):
    coords, tissue, emb = slide_rows(24)
    a = store.write_slide("s", {"patient_id": "p"}, block_rows=8)
    a.append(coords[:16], tissue[:16], emb[:16])
    with pytest.raises(SlideBusy, match="being written by another writer .*pid"):
        store.write_slide("s", {"patient_id": "p"}, block_rows=8)
    a.append(coords[16:], tissue[16:], emb[16:])
    view = a.commit()
    assert view.n_tiles == 24 and _no_zero_rows(store, "s")
    np.testing.assert_array_equal(store.slide("s").embeddings(), emb)
    assert verify_store(store) == []


def test_a_taken_over_writer_stops_and_its_abort_keeps_the_other_writers_slide(store):
    coords, tissue, emb = slide_rows(24)
    a = store.write_slide("s", {"patient_id": "p"}, block_rows=8, lease_seconds=0.3)
    a.append(coords[:16], tissue[:16], emb[:16])
    time.sleep(0.4)  # A stalls past its lease: presumed dead
    _, _, other = slide_rows(10, seed=5)
    b = store.write_slide("s", {"patient_id": "p"}, block_rows=8)
    b.append(coords[:10], tissue[:10], other)
    with pytest.raises(SlideOwnershipLost, match="taken over by another writer"):
        a.append(coords[16:], tissue[16:], emb[16:])
    with pytest.raises(SlideWriteError, match="committed or aborted already"):
        a.commit()  # A is done: it can neither commit nor touch B's slide
    a.abort()
    b.commit()
    np.testing.assert_array_equal(store.slide("s").embeddings(), other)
    assert verify_store(store) == []


def _stalled_writer(store: EmbeddingStore):
    """A writer that appended rows, then went silent past its lease (presumed dead)."""
    coords, tissue, emb = slide_rows(12)
    writer = store.write_slide("s", {"patient_id": "p"}, block_rows=4, lease_seconds=0.3)
    writer.append(coords, tissue, emb)
    time.sleep(0.4)
    return writer


def test_abort_after_a_takeover_removes_only_its_own_rows(store):
    a = _stalled_writer(store)
    view, *_ = write_slide(store, "s", 7, seed=2)  # B takes over and commits
    a.abort()
    assert store.slide("s").n_tiles == 7 == view.n_tiles and _no_zero_rows(store, "s")
    assert verify_store(store) == []


def test_a_writer_that_commits_after_losing_its_slide_is_refused(store):
    a = _stalled_writer(store)
    write_slide(store, "s", 5, seed=2)
    with pytest.raises(SlideOwnershipLost, match="committed by another writer"):
        a.commit()
    assert store.slide("s").n_tiles == 5


def test_overwrite_keeps_the_old_version_readable_until_commit_and_abort_restores_it(store):
    _, _, _, old, _ = write_slide(store, "s", 9)
    coords, tissue, emb = slide_rows(4, seed=7)
    w = store.write_slide("s", {"patient_id": "p"}, overwrite=True)
    w.append(coords, tissue, emb)
    np.testing.assert_array_equal(store.slide("s").embeddings(), old)  # readers still see the old version
    w.abort()
    np.testing.assert_array_equal(store.slide("s").embeddings(), old)
    w = store.write_slide("s", {"patient_id": "p"}, overwrite=True)
    w.append(coords, tissue, emb)
    w.commit()
    np.testing.assert_array_equal(store.slide("s").embeddings(), emb)
    assert verify_store(store) == []


def test_rm_refuses_a_live_writer_unless_forced(store):
    coords, tissue, emb = slide_rows(8)
    a = store.write_slide("s", {"patient_id": "p"})
    a.append(coords, tissue, emb)
    with pytest.raises(SlideBusy, match="--force"):
        store.delete_slide("s")
    assert store.delete_slide("s", force=True) is True
    with pytest.raises(SlideOwnershipLost, match="was removed"):
        a.append(coords, tissue, emb)
    assert store.slide_states() == {}


def test_failure_attempts_survive_retries(store):
    for attempt in range(3):
        writer = store.write_slide("flaky", {"patient_id": "p"})  # a retry starts writing ...
        writer.abort()  # ... and fails again
        store.record_failure("flaky", OSError(f"decode error {attempt}"))
    assert store.failures()["flaky"]["attempts"] == 3
    write_slide(store, "flaky", 3)
    assert store.failures() == {}


def test_a_coordinator_takes_over_its_own_dead_writers_lease_at_once_and_no_one_elses(store):
    """The extraction driver names its writers' lease tokens: a writer process that died (its lease still
    fresh, on another host for all the store knows) is replaced at once by the driver's next writer; a
    token not named is another job's, and stays busy; abandon_slide removes only the named writer's debris."""
    coords, tissue, emb = slide_rows(16)
    dead = store.write_slide("s", {"patient_id": "p"}, block_rows=8, lease_token="a" * 32)
    dead.append(coords[:8], tissue[:8], emb[:8])  # then its process dies: nothing more from it
    with pytest.raises(SlideBusy):
        store.write_slide("s", {"patient_id": "p"}, lease_token="b" * 32)
    again = store.write_slide("s", {"patient_id": "p"}, block_rows=8, lease_token="b" * 32, own_tokens=["a" * 32])
    assert not store.abandon_slide("s", ["a" * 32])  # the live writer's lease is "b": left alone
    again.append(coords, tissue, emb)
    assert again.commit().n_tiles == 16 and _no_zero_rows(store, "s")
    assert not store.abandon_slide("s", ["b" * 32])  # complete: never abandoned
    lost = store.write_slide("t", {"patient_id": "p"}, lease_token="c" * 32)
    lost.append(coords[:4], tissue[:4], emb[:4])
    assert store.abandon_slide("t", ["c" * 32]) and "t" not in store.slide_states()
    assert verify_store(store) == []
