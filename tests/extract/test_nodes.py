"""Two Ray nodes on this machine (a head and a second raylet with its own resources): reads and encodes
land on both, each slide's tiles read on the node of the encoder that writes it, and killing the second node while it holds an uncommitted slide loses nothing. Its slides
are written again at once (the driver names its writers' lease tokens, so it takes over its own leases
without waiting for them to expire: the lease here is an hour), and every slide is complete exactly once."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import numpy as np
import pytest

from demo.slides import synthetic_he, write_pyramid
from extract.config import ExtractConfig
from extract.job import Extraction
from slidecache.cohorts.slides import load_cohort
from store import EmbeddingStore
from store.schema import LEASE_ENV
from store.verify import verify_store

# many small chunks: a slide is held long enough for the kill to catch it
TINY = dict(encoder="virchow2-tiny", precision="fp32", batch_size=8, read_chunk=8, num_encoders=2)


@pytest.fixture
def two_nodes(monkeypatch):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ADDRESS", "")  # ray.init(address=...) sets it; undone after the test, for the next ones
    # its own temp dir: the default one would advertise this cluster to every ray.init() on the machine
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths have a length limit
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 1024**2,
                                                            "temp_dir": temp_dir})
    second = cluster.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    cluster.wait_for_nodes()  # both registered before the encoders are placed (SPREAD then uses both)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {LEASE_ENV: "3600"}})  # a takeover that waited would time out
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2:  # the scheduler sees the second node's resources
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
    try:
        yield ray, cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(420)
def test_a_node_killed_while_it_holds_a_slide_loses_nothing(two_nodes, tmp_path):
    ray, cluster, second = two_nodes
    (tmp_path / "slides").mkdir()
    for i in range(3):  # ~60 tiles each: a few chunks, so a slide is held long enough to be caught
        write_pyramid(tmp_path / f"syn{i}.tiff", synthetic_he(3000, 3000, seed=i), mpp=0.25)
    rows = []
    for copy in range(3):  # 9 slides from the 3, under their own ids
        for i in range(3):
            target = tmp_path / "slides" / f"syn{i}-{copy}.tiff"
            shutil.copy(tmp_path / f"syn{i}.tiff", target)
            rows.append(f"{target.stem},{target}")
    (tmp_path / "cohort.csv").write_text("slide_id,path\n" + "\n".join(rows) + "\n")
    url = str(tmp_path / "store.zarr")
    logs: list[str] = []
    extraction = Extraction(load_cohort(tmp_path / "cohort.csv"), [(url, ExtractConfig(**TINY))], log=logs.append)
    second_id = second.node_id
    killed: dict[str, str] = {}

    def kill_when_the_second_node_holds_a_slide() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            nodes = getattr(extraction, "actor_nodes", [])
            committed_there = [o for o in extraction.summary.outcomes if o.node == second_id]
            holding = [s for s in list(getattr(extraction, "active", []))
                       if nodes and nodes[s.actor] == second_id and s.call is not None]
            if committed_there and holding:
                killed["slide"] = holding[0].slide_id
                cluster.remove_node(second, allow_graceful=False)
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_when_the_second_node_holds_a_slide, daemon=True)
    watcher.start()
    started = time.monotonic()
    summary = extraction.run()
    watcher.join(timeout=5)
    assert killed, (f"the second node never held an uncommitted slide: the test tested nothing (encoders on "
                    f"{getattr(extraction, 'actor_nodes', None)}, second node {second_id})\n" + "\n".join(logs))
    assert time.monotonic() - started < 300  # no wait for the hour-long lease
    assert sorted(o.status for o in summary.outcomes) == ["done"] * 9, summary.table()
    writers = {o.node for o in summary.outcomes}
    assert second_id in writers and len(writers) == 2  # both nodes encoded and wrote slides
    for outcome in summary.outcomes:  # every tile was read on the node of the encoder that wrote it
        assert outcome.read_nodes == [outcome.node], (outcome.slide_id, outcome.read_nodes, outcome.node)
    assert any("writing it again from its first tile" in line for line in logs), "\n".join(logs)

    store = EmbeddingStore.open(url)
    assert store.slide_states() == {o.slide_id: True for o in summary.outcomes}  # each complete, none partial
    assert verify_store(store) == [] and store.failures() == {}
    for outcome in summary.outcomes:  # rows are the planned tiles, none lost, none zero, none twice
        slide = store.slide(outcome.slide_id)
        assert slide.attrs["nodes"] == {"encoded": outcome.node, "read": [outcome.node]}  # recorded in the store
        coords = slide.coords()
        assert slide.n_tiles == outcome.tiles == len({tuple(xy) for xy in coords.tolist()}) > 0
        assert (np.abs(slide.embeddings().astype(np.float32)).sum(axis=1) > 0).all()
    copies = [store.slide(f"syn0-{c}").embeddings().astype(np.float32) for c in range(3)]
    for other in copies[1:]:  # the same slide encoded on either node, before or after the kill: the same rows
        np.testing.assert_allclose(other, copies[0], atol=2e-3)
