"""A chunk that kills its encoder actor every time fails its slide after 3 attempts; the cohort goes on.

Before: `max_task_retries=-1` retried such a chunk forever (a run that never ends). The faulty encoder
(tests/extract/faulty_stages.py) makes its process exit when handed a tile of one single colour; the slide
below has a block of one exact colour large enough to hold whole tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

from demo.slides import HEMATOXYLIN, synthetic_he, write_pyramid
from extract.config import ExtractConfig
from extract.job import MAX_DEATH_RETRIES, Extraction
from extract.ray_executor import RayExecutor
from slidecache.cohorts.slides import load_cohort
from store import EmbeddingStore
from tests.extract.faulty_stages import EncoderExitingOnUniformTile

TINY = dict(encoder="virchow2-tiny", precision="fp32", batch_size=16, read_chunk=64)


def _poison_slide(path):
    pixels = synthetic_he(1600, 1600, seed=3, tissue_fraction=0.9)
    pixels[200:1400, 200:1400] = HEMATOXYLIN.astype(np.uint8)  # one exact colour: whole tiles of it
    write_pyramid(path, pixels, mpp=0.25, quality=100)


@pytest.mark.timeout(240)  # retrying forever would hang here
def test_a_chunk_that_kills_its_actor_three_times_fails_its_slide(local_ray, synthetic_slides, tmp_path):
    _poison_slide(tmp_path / "slides" / "poison.tiff")
    url = str(tmp_path / "store")
    faulty = RayExecutor(ExtractConfig(**TINY), worker=EncoderExitingOnUniformTile)
    summary = Extraction(load_cohort(tmp_path / "slides"), [(url, ExtractConfig(**TINY))], log=lambda _: None,
                         executor=faulty).run()
    (outcome,) = summary.outcomes
    assert outcome.status == "failed", outcome
    assert f"died {1 + MAX_DEATH_RETRIES} times" in outcome.error and "while encoding this slide" in outcome.error
    store = EmbeddingStore.open(url)
    assert store.failures()["poison"]["error_class"] == "EncoderError" and store.slide_states() == {}
    # the restarted actor goes on with the next slides of the same Ray session
    healthy = Extraction(load_cohort(synthetic_slides)[:1], [(url, ExtractConfig(**TINY))], log=lambda _: None,
                         executor=faulty).run()
    assert [o.status for o in healthy.outcomes] == ["done"]
