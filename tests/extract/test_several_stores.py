"""Several encoders from one read of each slide (`--encoder a,b,c --store 'x-{encoder}.zarr'`): every store
gets the same tiles (one read per chunk, counted), keeps its own fingerprint, and a slide one store already
holds is encoded only for the others. Configs that would need another read are refused by name."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.job import Extraction
from extract.local_executor import LocalExecutor
from slidecache.cohorts.slides import load_cohort
from slidecache.errors import ConfigError
from store import EmbeddingStore
from tests.extract.checks import assert_store_holds_each_slide_once
from tests.readme import run_subprocess, to_argv

TINY = dict(encoder="virchow2-tiny", precision="fp32", batch_size=16, read_chunk=8, executor="local")
SEVERAL = "python -m extract --cohort SLIDES_OR_TABLE --encoder virchow2,uni2-h,h-optimus-1 --store 'tcga-{encoder}.zarr'"


def quiet(_: str) -> None:
    pass


def test_one_read_fills_three_stores_and_skips_what_a_store_holds(synthetic_slides, tmp_path):
    entries = load_cohort(synthetic_slides)
    tiny, small = ExtractConfig(**TINY), ExtractConfig(**{**TINY, "encoder": "virchow2-small"})
    gridded = ExtractConfig(**TINY, tokens="4x4")  # the same encoder again, with token grids: its own store
    urls = [str(tmp_path / name) for name in ("tiny.zarr", "small.zarr", "tiny-grids.zarr")]
    executor = LocalExecutor(tiny)
    try:
        Extraction(entries[:1], [(urls[0], tiny)], log=quiet, executor=executor).run()  # syn0 already in the tiny store
        before = EmbeddingStore.open(urls[0]).slide("syn0").commit_id
        lines: list[str] = []
        summary = Extraction(entries, list(zip(urls, (tiny, small, gridded))), log=lines.append,
                             executor=executor).run()
    finally:
        executor.shutdown()
    status = {(o.store, o.slide_id): o.status for o in summary.outcomes}
    assert status == {("virchow2-tiny", "syn0"): "skipped", ("virchow2-tiny", "syn1"): "done",
                      ("virchow2-tiny", "syn2"): "done", **{(label, f"syn{i}"): "done" for i in range(3)
                                                              for label in ("virchow2-small", "virchow2-tiny#2")}}
    assert "3 slides to extract (virchow2-tiny 2, virchow2-small 3, virchow2-tiny#2 3)" in "\n".join(lines)
    stores = [EmbeddingStore.open(url) for url in urls]
    assert stores[0].slide("syn0").commit_id == before  # held already: not written again
    for entry in entries:
        slides = [store.slide(entry.slide_id) for store in stores]
        # every chunk read once, however many stores it fed
        assert summary.chunk_reads[entry.slide_id] == math.ceil(slides[0].n_tiles / TINY["read_chunk"])
        for other in slides[1:]:
            np.testing.assert_array_equal(other.coords(), slides[0].coords())
            np.testing.assert_array_equal(other.tissue(), slides[0].tissue())
        # the same encoder fed the same tiles: the same numbers, bit for bit
        np.testing.assert_array_equal(slides[2].embeddings(), slides[0].embeddings())
    assert stores[1].spec["encoder"]["name"] == "virchow2-small" and stores[1].embedding_dim == 768  # class ‖ mean patch of width 384
    assert stores[2].spec["tiling"]["tokens"] == "4x4" and stores[0].spec["tiling"]["tokens"] is None
    for store, cfg in zip(stores, (tiny, small, gridded)):
        assert_store_holds_each_slide_once(store, entries, cfg)


def test_encoders_that_would_need_another_read_are_refused_by_name(tmp_path):
    tiny = ExtractConfig(**TINY)
    with pytest.raises(ConfigError, match=r"differ in tile_px \(virchow2-tiny: 224, virchow2-small: 256\)"):
        Extraction([], [(str(tmp_path / "a"), tiny),
                        (str(tmp_path / "b"), ExtractConfig(**{**TINY, "encoder": "virchow2-small"}, tile_px=256))])
    with pytest.raises(ConfigError, match="min_tissue"):
        Extraction([], [(str(tmp_path / "a"), tiny), (str(tmp_path / "b"), ExtractConfig(**TINY, min_tissue=0.5))])
    with pytest.raises(ConfigError, match="must differ"):
        Extraction([], [(str(tmp_path / "a"), tiny), (str(tmp_path / "a"), tiny)])


@pytest.mark.readme(SEVERAL)
def test_several_encoders_from_the_command_line(synthetic_slides, tmp_path):
    (tmp_path / "slides").mkdir()
    for name in ("syn0", "syn1"):
        shutil.copy(synthetic_slides / f"{name}.tiff", tmp_path / "slides" / f"{name}.tiff")
    run = to_argv(SEVERAL, {"SLIDES_OR_TABLE": "slides"})
    run.argv[run.argv.index("--encoder") + 1] = "virchow2-tiny,virchow2-small"  # the registry's CPU-size twins
    result = run_subprocess(run, tmp_path, timeout=600)
    assert result.code == 0 and "Traceback" not in result.log, result.log[-3000:]
    assert "2 slides read once for every store that lacked them" in result.stdout
    for name, dim in (("virchow2-tiny", 128), ("virchow2-small", 768)):
        store = EmbeddingStore.open(str(tmp_path / f"tcga-{name}.zarr"))
        assert store.slide_ids() == ["syn0", "syn1"] and store.embedding_dim == dim
        assert (tmp_path / f"tcga-{name}.zarr.qc" / "summary.md").is_file()  # QC per store
    rerun = run_subprocess(run, tmp_path, timeout=600)
    assert rerun.code == 0 and "0 slides to extract (virchow2-tiny 0, virchow2-small 0)" in rerun.stdout
    wrong = to_argv(SEVERAL, {"SLIDES_OR_TABLE": "slides"})
    wrong.argv[wrong.argv.index("--store") + 1] = "one.zarr"
    refused = run_subprocess(wrong, tmp_path, timeout=120)
    assert refused.code == 2 and "put {encoder} in the store's name" in refused.stderr
