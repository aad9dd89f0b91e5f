"""The extraction job on a real local Ray: bad slides recorded, good ones complete, a killed encoder
actor loses nothing, a rerun encodes nothing, and a store of another fingerprint is refused."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.inference import BatchEncoder
from extract.job import Extraction
from extract.ray_executor import RayExecutor
from extract.readers import READERS
from extract.slide_prep import prepare_slide, read_tiles
from slidecache.cohorts.slides import SlideEntry, load_cohort
from slidecache.errors import FingerprintMismatch
from store import EmbeddingStore
from store.verify import verify_store
from tests.extract.checks import assert_store_holds_each_slide_once
from tests.extract.faulty_stages import pausing_after_first_append
from tests.store.helpers import spec as other_spec

pytestmark = pytest.mark.xdist_group("test_job")  # its module fixture is built once, on one worker

TINY = dict(encoder="virchow2-tiny", precision="fp32", batch_size=16, read_chunk=8)


def quiet(_: str) -> None:
    pass


def test_bad_inputs_are_recorded_and_good_slides_complete(local_ray, synthetic_slides, shared_data, tmp_path):
    wsi = shared_data / "wsi"
    rows = [("syn0", synthetic_slides / "syn0.tiff"), ("syn1", synthetic_slides / "syn1.tiff"),
            ("not_an_image", wsi / "bad_inputs/broken-random-ascii.svs"),
            ("unknown_compression", wsi / "bad_inputs/unopenable.tiff"),
            ("undecodable_tiles", wsi / "bad_inputs/unreadable.svs"),
            ("tile_bigger_than_image", wsi / "aperio/openslide-small.svs"),
            ("bogus_mpp", wsi / "generic_tiff/boxes.tiff"),
            ("dicom_two_files", wsi / "dicom/openslide_boxes"),
            ("missing", tmp_path / "nope.svs")]
    (tmp_path / "cohort.csv").write_text("slide_id,path\n" + "".join(f"{s},{p}\n" for s, p in rows))
    entries = load_cohort(tmp_path / "cohort.csv")
    url = str(tmp_path / "store")
    extraction = Extraction(entries, [(url, ExtractConfig(**TINY))], log=quiet)
    summary = extraction.run()
    # the actor runs torch on every core, not on the one thread Ray's OMP_NUM_THREADS=1 would give it
    assert local_ray.get(extraction.actors[0].describe.remote())["threads"] == len(os.sched_getaffinity(0))
    status = {o.slide_id: o.status for o in summary.outcomes}
    assert status == {"syn0": "done", "syn1": "done", "not_an_image": "failed", "unknown_compression": "failed",
                      "undecodable_tiles": "failed", "tile_bigger_than_image": "empty", "bogus_mpp": "failed",
                      "dicom_two_files": "empty", "missing": "failed"}
    store = EmbeddingStore.open(url)
    failures = store.failures()
    assert "not a TIFF file" in failures["not_an_image"]["message"]
    assert "52479" in failures["unknown_compression"]["message"]
    assert "Bogus marker length" in failures["undecodable_tiles"]["message"]
    assert "352.8 µm/px" in failures["bogus_mpp"]["message"] and failures["bogus_mpp"]["error_class"] == "MppError"
    assert "no such file" in failures["missing"]["message"]
    small = store.slide("tile_bigger_than_image")
    assert small.n_tiles == 0 and "too small for one tile" in small.attrs["empty_reason"]
    assert store.slide("dicom_two_files").attrs["reader"] == "openslide"
    syn0 = store.slide("syn0")
    assert syn0.n_tiles > 5 and syn0.attrs["mpp"] == 0.25 and syn0.attrs["mpp_source"] == "TIFF resolution tags"
    assert syn0.attrs["tiling"]["level"] == 1 and syn0.thumbnail() is not None
    assert verify_store(store) == []

    again = Extraction(entries, [(url, ExtractConfig(**TINY))], log=quiet).run()  # a rerun encodes nothing
    assert {o.status for o in again.outcomes} == {"skipped", "failed-before"} and again.tiles == 0
    retry = Extraction(entries, [(url, ExtractConfig(**TINY, retry_failed=True))], log=quiet).run()
    assert retry.count("failed") == 5 and store.failures()["bogus_mpp"]["attempts"] == 2
    fixed = Extraction([e for e in entries if e.slide_id == "bogus_mpp"],
                       [(url, ExtractConfig(**TINY, retry_failed=True, mpp_override=0.5))], log=quiet).run()
    assert fixed.outcomes[0].status == "done" and "bogus_mpp" not in EmbeddingStore.open(url).failures()


def _describe_once_back(ray, actor, within_s: float = 60.0) -> dict:
    """The actor's description once Ray has restarted it (its calls are not retried: see extract/job.py)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return ray.get(actor.describe.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_killed_encoder_writes_its_slides_again_in_every_store(local_ray, synthetic_slides, tmp_path):
    """Two stores from one read; the encoder worker (which holds both stores' encoders) is killed (SIGKILL) while
    it holds a slide: it restarts, the slide is read and written again from its first tile, and both stores hold
    every slide once, nothing lost or written twice."""
    resume = tmp_path / "resume"
    entries = load_cohort(synthetic_slides)
    configs = [ExtractConfig(**TINY), ExtractConfig(**TINY, tokens="2x2")]
    urls = [str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]
    # the encoder holds its first slide until `resume`
    pausing = RayExecutor(configs[0], worker=pausing_after_first_append(60, str(resume)))
    logs: list[str] = []
    extraction = Extraction(entries, list(zip(urls, configs)), log=logs.append, executor=pausing)
    killed = {}

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if any(s.call is not None for s in getattr(extraction, "active", [])) and extraction._described:
                time.sleep(1.0)  # its first append has run: the worker pauses inside it, holding the slide
                pid = local_ray.get(extraction._described[0])["pid"]  # a new call would wait for the pause
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                resume.touch()
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = extraction.run()
    thread.join(timeout=5)
    assert killed, "the actor was never killed: the test did not test anything"
    assert sorted((o.store, o.status) for o in summary.outcomes) == sorted(
        [("virchow2-tiny", "done")] * 3 + [("virchow2-tiny#2", "done")] * 3)
    assert any("writing it again from its first tile" in line for line in logs), "\n".join(logs)
    restarted = _describe_once_back(local_ray, extraction.actors[0])
    assert restarted["pid"] != killed["pid"]  # it really restarted
    assert restarted["threads"] == len(os.sched_getaffinity(0))  # the two stores' encoders take turns, each with all
    stores = [EmbeddingStore.open(url) for url in urls]
    for store, cfg in zip(stores, configs):
        assert_store_holds_each_slide_once(store, entries, cfg)


def test_store_of_another_fingerprint_is_refused(local_ray, synthetic_slides, tmp_path):
    url = str(tmp_path / "store")
    EmbeddingStore.create_or_open(url, kind="slides", spec=other_spec(dim=128))
    with pytest.raises(FingerprintMismatch, match="encoder.name: store has 'test-encoder', this run has 'virchow2-tiny'"):
        Extraction(load_cohort(synthetic_slides), [(url, ExtractConfig(**TINY))], log=quiet).run()


def test_a_complete_store_checks_its_fingerprint_without_starting_an_encoder(local_ray, synthetic_slides, tmp_path):
    url = str(tmp_path / "store")
    entries = load_cohort(synthetic_slides)[:1]
    Extraction(entries, [(url, ExtractConfig(**TINY))], log=quiet).run()
    lines: list[str] = []
    rerun = Extraction(entries, [(url, ExtractConfig(**TINY))], log=lines.append)
    summary = rerun.run()
    assert [o.status for o in summary.outcomes] == ["skipped"] and rerun.actors == []
    assert "0 slides to extract; 1 already complete" in lines[0] and "no encoder started" in lines[0]
    # another encoder or tiling over the same complete store: refused, from the config alone
    with pytest.raises(FingerprintMismatch, match="encoder.name: store has 'virchow2-tiny', this run has 'virchow2-small'"):
        Extraction(entries, [(url, ExtractConfig(**{**TINY, "encoder": "virchow2-small"}))], log=quiet).run()
    with pytest.raises(FingerprintMismatch, match="tiling.tile_px: store has 224, this run has 112"):
        Extraction(entries, [(url, ExtractConfig(**TINY, tile_px=112))], log=quiet).run()


def test_token_grids_and_limit(local_ray, synthetic_slides, tmp_path):
    url = str(tmp_path / "store")
    summary = Extraction(load_cohort(synthetic_slides), [(url, ExtractConfig(**TINY, tokens="4x4", limit=1))],
                         log=quiet).run()
    assert [o.status for o in summary.outcomes] == ["done"]
    slide = EmbeddingStore.open(url).slide("syn0")
    assert slide.tokens().shape == (slide.n_tiles, 16, 64)
    assert EmbeddingStore.open(url).spec["tiling"]["tokens"] == "4x4"


def test_same_tile_same_embedding_through_every_reader(synthetic_slides):
    cfg = ExtractConfig(**TINY)
    entry = SlideEntry("syn1", str(synthetic_slides / "syn1.tiff"), "syn1")
    prepared = prepare_slide(entry, cfg)
    encoder = BatchEncoder(cfg)
    coords = prepared.coords[:4]
    results = {name: encoder(read_tiles(name, entry.path, prepared.plan, coords))[0].astype(np.float32) for name in READERS}
    for name, emb in results.items():
        np.testing.assert_allclose(emb, results["openslide"], atol=1e-2, err_msg=name)
