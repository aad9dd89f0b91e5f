"""The single-node executor: `python -m extract` on a machine where Ray cannot be imported (the GPU bench
machine has none) picks it by itself, writes what the Ray path writes, records bad slides, and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extract.config import ExtractConfig
from extract.executors import executor_session, resolve_executor
from extract.job import Extraction
from extract.local_executor import LocalExecutor
from extract.stages import Stages
from extract.writers import PinnedWriters
from slidecache.cohorts.slides import load_cohort
from slidecache.errors import ConfigError, EncoderError
from store import EmbeddingStore
from tests.extract.checks import assert_store_holds_each_slide_once

REPO = Path(__file__).resolve().parents[2]
TINY = dict(encoder="virchow2-tiny", precision="fp32", batch_size=16, read_chunk=8)


def _without_ray(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import ray` fails in every process (the driver and its reader processes)."""
    block = tmp_path / "no_ray"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # this test's machine has no Ray\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(REPO)]), "RAY_ADDRESS": ""}


def test_extract_without_ray_writes_the_same_store(synthetic_slides, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "garbage.svs").write_bytes(os.urandom(4096))
    rows = [f"syn{i},{synthetic_slides / f'syn{i}.tiff'}" for i in range(3)] + ["garbage,garbage.svs", "gone,gone.svs"]
    (work / "cohort.csv").write_text("slide_id,path\n" + "\n".join(rows) + "\n")
    command = [sys.executable, "-m", "extract", "--cohort", "cohort.csv", "--store", "out.zarr",
               "--encoder", "virchow2-tiny", "--batch-size", "16", "--no-qc"]
    env = _without_ray(tmp_path)
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr  # two slides failed; the cohort went on
    assert "FAILED: garbage" in done.stdout and "FAILED: gone" in done.stdout
    assert "3 done" in done.stdout and "2 failed" in done.stdout
    assert "ModuleNotFoundError" not in done.stderr and "import of ray halted" not in done.stderr

    store = EmbeddingStore.open(str(work / "out.zarr"))
    assert store.provenance["config"]["executor"] == "local"  # what ran, not "auto"
    assert sorted(store.slide_ids()) == ["syn0", "syn1", "syn2"] and set(store.failures()) == {"garbage", "gone"}
    cfg = ExtractConfig(**{**TINY, "read_chunk": None}).for_device("cpu")
    assert_store_holds_each_slide_once(store, load_cohort(synthetic_slides), cfg)

    again = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert "3 already complete" in again.stdout and "0 done" in again.stdout  # a rerun encodes nothing


def test_an_encoder_that_cannot_be_built_is_a_clear_error(synthetic_slides, tmp_path):
    cfg = ExtractConfig(**TINY, weights=str(tmp_path / "missing.safetensors"), executor="local")
    with executor_session(cfg) as executor, pytest.raises(EncoderError, match="missing.safetensors': no such file"):
        Extraction(load_cohort(synthetic_slides), [(str(tmp_path / "store"), cfg)], log=lambda _: None,
                   executor=executor).run()


def test_local_executor_refuses_more_encoders_than_gpus(tmp_path):
    executor = LocalExecutor(ExtractConfig(**TINY))
    try:
        with pytest.raises(ConfigError, match="one encoder per GPU"):
            executor.start_encoders(([(ExtractConfig(**TINY), str(tmp_path / "s"))], {}), count=3, gpus=2, nodes=["local"])
    finally:
        executor.shutdown()


def test_executor_names_are_checked():
    assert resolve_executor("local") == "local"
    with pytest.raises(ConfigError, match="auto, ray or local"):
        ExtractConfig(executor="dask")


def test_auto_is_ray_for_a_cluster_or_several_gpus_else_local(monkeypatch):
    pytest.importorskip("ray")
    import extract.executors as executors

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(executors, "visible_gpus", lambda: 1)
    assert resolve_executor("auto") == "local"  # one machine, one GPU (or none): no Ray start-up
    monkeypatch.setattr(executors, "visible_gpus", lambda: 2)
    assert resolve_executor("auto") == "ray"  # an actor per GPU, restarted when one dies
    monkeypatch.setattr(executors, "visible_gpus", lambda: 0)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what `ray job submit` sets
    assert resolve_executor("auto") == "ray"


def test_a_slide_whose_reading_kills_its_process_fails_alone(synthetic_slides, tmp_path, monkeypatch):
    """A reader process that dies (a decoder's segfault, the OOM killer) breaks the whole process pool;
    the executor replaces it and runs the lost reads again, so the other slides complete and only the
    slide that kills its reader every time fails, with an error that says so."""
    from tests.extract.faulty_stages import ReaderExitingOn

    faulty = Stages(read=ReaderExitingOn("syn2"))  # the last slide: its failure ends the run
    # The failed slide's writer removes its rows on the encoder's thread before the call raises, slowed here as under load, where the
    # run once returned first and closing the executor cancelled the queued removal: a half-written slide was left.
    real_abort, aborts = PinnedWriters.abort, {"called": [], "done": []}

    def slow_abort(writers: PinnedWriters, slide_id: str) -> None:
        aborts["called"].append(slide_id)
        time.sleep(1.5)
        real_abort(writers, slide_id)
        aborts["done"].append(slide_id)

    monkeypatch.setattr(PinnedWriters, "abort", slow_abort)
    cfg = ExtractConfig(**TINY, executor="local")
    entries = load_cohort(synthetic_slides)
    url = str(tmp_path / "store")
    with executor_session(cfg, faulty) as executor:
        summary = Extraction(entries, [(url, cfg)], log=lambda _: None, executor=executor).run()
        assert aborts["done"] == aborts["called"], aborts  # the run returns once its writers have cleaned up
        # checked before the executor closes (which once cancelled the removal); it verifies the store too
        assert_store_holds_each_slide_once(EmbeddingStore.open(url), [e for e in entries if e.slide_id != "syn2"], cfg)
    status = {o.slide_id: o.status for o in summary.outcomes}
    assert status == {"syn0": "done", "syn1": "done", "syn2": "failed"}, summary.table()
    failure = EmbeddingStore.open(url).failures()["syn2"]
    assert failure["error_class"] == "ReaderDied" and "died 3 times" in failure["message"]

    # The next job of this process runs the real reader: its readers (forked by the server the first job
    # started) must read syn2.
    with executor_session(cfg) as executor:
        again = Extraction([e for e in entries if e.slide_id == "syn2"], [(str(tmp_path / "next"), cfg)],
                           log=lambda _: None, executor=executor).run()
    assert [o.status for o in again.outcomes] == ["done"], again.table()
