"""Crashes and concurrency with real processes: a writer SIGKILLed mid-slide, two writers at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from store import EmbeddingStore
from store.verify import verify_store
from tests.conftest import REPO_ROOT, s3_options
from tests.store.helpers import spec, write_slide

WRITER = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    from store import EmbeddingStore
    from tests.store.helpers import slide_rows, spec
    url, options, slide_ids, die_after = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), storage_options=options)
    for i, slide_id in enumerate(slide_ids):
        coords, tissue, emb = slide_rows(2000, seed=i)
        w = store.write_slide(slide_id, {{"patient_id": slide_id}}, block_rows=256)
        for start in range(0, 2000, 250):
            w.append(coords[start:start + 250], tissue[start:start + 250], emb[start:start + 250])
            if die_after and start >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real crash
        w.commit()
    print("done", flush=True)
""").format(root=str(REPO_ROOT))


def run_writer(url: str, options: dict, slide_ids: list[str], die_after: int = 0) -> subprocess.Popen:
    import json

    return subprocess.Popen([sys.executable, "-c", WRITER, url, json.dumps(options), ",".join(slide_ids), str(die_after)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://slidecache-test/proc-{tmp_path.name}", s3_options(endpoint)


def test_killed_writer_leaves_no_visible_slide(location):
    url, options = location
    EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), storage_options=options)
    proc = run_writer(url, options, ["victim"], die_after=1000)
    proc.wait(timeout=120)
    assert proc.returncode == -9, proc.stderr.read()
    store = EmbeddingStore.open(url, mode="a", storage_options=options)
    assert store.slide_states() == {"victim": False}  # debris on storage, several shards deep
    assert store.slide_ids() == []
    view, *_ = write_slide(store, "victim", 123)
    assert view.n_tiles == 123 and store.slide_ids() == ["victim"]
    assert verify_store(store) == []


def test_two_processes_write_one_store(location):
    url, options = location
    EmbeddingStore.create_or_open(url, kind="slides", spec=spec(), storage_options=options)
    a = run_writer(url, options, ["a1", "a2", "a3"])
    b = run_writer(url, options, ["b1", "b2", "b3"])
    for proc in (a, b):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and "done" in out, err
    store = EmbeddingStore.open(url, storage_options=options)
    assert store.slide_ids() == ["a1", "a2", "a3", "b1", "b2", "b3"]
    assert all(store.slide(s).n_tiles == 2000 for s in store.slide_ids())
    assert verify_store(store) == []
