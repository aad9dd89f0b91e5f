"""`extract images` on the extraction's executors: Ray actors built from the same seam as slides' encoders, an
encoder process that dies on an image is restarted and its batch fails alone after 3 deaths, recorded in the
store, while the other images are written by the encoders themselves (no tile goes back to the driver)."""

from __future__ import annotations

import shutil

import pytest

from extract.config import ExtractConfig
from extract.image_worker import ImageEncoderWorker
from extract.images import DEATHS_PER_BATCH, ImageExtraction, collect_images, image_encoder_config
from extract.local_executor import LocalExecutor
from extract.ray_executor import RayExecutor
from slidecache.cohorts.ids import image_key
from store import EmbeddingStore
from tests.extract.faulty_stages import ImageEncoderExitingOn
from tests.images.helpers import write_dataset

TINY = dict(encoder="virchow2-tiny", precision="fp32", batch_size=16)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def _dataset_with_a_poison_image(root):
    meta = write_dataset(root)
    shutil.copy(root / "images" / "small.png", root / "images" / "poison.png")
    annotation = root / "captions.jsonl"
    annotation.write_text(annotation.read_text() + '{"id": "p", "image": "poison.png", "conversations": []}\n')
    return meta


@pytest.mark.timeout(300)
def test_an_image_that_kills_its_encoder_fails_alone_and_the_rest_are_written(local_ray, tmp_path):
    entries = collect_images(_dataset_with_a_poison_image(tmp_path))
    cfg = image_encoder_config(ExtractConfig(**TINY))
    url = str(tmp_path / "images.zarr")
    executor = RayExecutor(cfg, worker=ImageEncoderExitingOn)
    summary = ImageExtraction(entries, url, cfg, executor, batch_images=2, log=lambda _: None).run()
    poison = image_key("he_captions", "poison.png")
    assert [key for key, _ in summary.failed] == [poison]
    assert f"died {DEATHS_PER_BATCH} times" in summary.failed[0][1]
    store = EmbeddingStore.open(url)  # the poison is last, alone in its batch of 2: every other image is written
    assert set(store.slide_ids()) == {e.key for e in entries} - {poison} == set(summary.done)
    assert store.failures()[poison]["error_class"] == "EncoderError"


def test_the_local_and_the_ray_executor_write_the_same_images(local_ray, tmp_path):
    entries = collect_images(write_dataset(tmp_path / "data"))
    cfg = image_encoder_config(ExtractConfig(**TINY))
    stores = {}
    for name, executor in (("local", LocalExecutor(cfg, worker=ImageEncoderWorker)),
                           ("ray", RayExecutor(cfg, worker=ImageEncoderWorker))):
        url = str(tmp_path / f"{name}.zarr")
        summary = ImageExtraction(entries, url, cfg, executor, log=lambda _: None).run()
        assert len(summary.done) == len(entries) and not summary.failed
        stores[name] = EmbeddingStore.open(url)
    local, ray = stores["local"], stores["ray"]
    assert local.fingerprint == ray.fingerprint
    for key in local.slide_ids():
        assert (local.slide(key).embeddings() == ray.slide(key).embeddings()).all(), key
        assert local.slide(key).attrs["layout"] == ray.slide(key).attrs["layout"]
