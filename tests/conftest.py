"""Shared fixtures: the real test data folder, and a local S3-compatible server (moto) for s3:// stores."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

# Tests never reach a model hub: loading code paths must fail fast and clearly instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Two xdist workers (and the subprocesses and Ray workers they start) share the cores: OpenMP threads that
# spin-wait between torch ops would burn the core another process needs (two processes of small ops ran 25x
# slower than one; passive waiting: 1.7x). Set before anything imports torch; every child inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# And one thread per process by default (an encoder still sets its own count: extract.inference.cpu_threads): the
# suite runs two workers and their subprocesses on the cores, so torch's and OpenBLAS's pools of one thread per
# core oversubscribed them (tests ran 2.3x slower in the suite than alone, on 2 workers).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")



def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores, and at most one per 5 GiB of memory. Many test-seconds are
    waits (on Ray starting, on subprocesses, on a shared fixture: 2,238 test-s ran in 792 s on 2 cores), which
    a spare worker fills: the whole suite took 1,149 s with 2 workers, 792 s with 3 and 803 s with 4; its peak
    memory in use was 13.7 GiB with 3 workers and 17.7 GiB with 4 (a wider machine must not start 9)."""
    from slidecache.devices import usable_cores

    return max(1, min(usable_cores() + 1, _memory_bytes() // (5 * 2**30)))


def _memory_bytes() -> int:
    """This machine's memory, or its cgroup's limit (a container's) when lower."""
    import psutil

    limits = [psutil.virtual_memory().total]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = Path(path).read_text().strip() if Path(path).is_file() else ""
        limits += [int(text)] if text.isdigit() else []
    return min(limits)


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SLIDECACHE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real slides, tiles, clinical tables), or a skip saying why."""
    if not (SHARED_DATA / "PROVENANCE.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set SLIDECACHE_SHARED_DATA to its folder)")
    return SHARED_DATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, started for this test session and stopped after it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port} (exit code {proc.poll()})") from e
                time.sleep(0.1)
        _create_bucket(endpoint, "slidecache-test")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def empty_s3(s3_endpoint: str) -> str:
    """The session's moto server emptied (its reset API) for a test that writes fixed URLs such as the README's
    `s3://bucket/tcga.zarr`: two such tests on one xdist worker must not see each other's store."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    _create_bucket(s3_endpoint, "slidecache-test")
    return s3_endpoint


def _create_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                 region_name="us-east-1").create_bucket(Bucket=name)


def s3_options(endpoint: str) -> dict:
    return {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    """(url, storage_options) of an empty store location on each backend of the contract suite."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    if request.param == "memory":
        return f"memory://slidecache-{uuid.uuid4().hex}", {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://slidecache-test/{uuid.uuid4().hex}", s3_options(endpoint)


@pytest.hookimpl(trylast=True)  # after xdist has tagged each grouped test with its group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One test that needs the README demo first (its worker starts the run), the tests that need none next,
    the other demo tests last: the other worker is busy while the demo runs, instead of waiting on its lock.
    On an xdist worker under --dist loadgroup, stop if a grouped test was not tagged with its group (pytest
    9.2 with xdist 3.8: each worker would build the group's costly module fixture again)."""
    if config.getoption("loadgroup", default=False):
        untagged = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if untagged:
            raise pytest.UsageError(f"--dist loadgroup is not grouping {untagged[0]} and {len(untagged) - 1} more: "
                                    "this pytest and pytest-xdist do not work together (pin them in requirements/lock.txt)")
    needs = [item for item in items if "readme_demo" in getattr(item, "fixturenames", ())]
    if needs:
        chosen = {id(item) for item in needs}
        items[:] = needs[:1] + [item for item in items if id(item) not in chosen] + needs[1:]


@dataclass(frozen=True)
class DemoRun:
    """`python -m demo` as the README types it, run once per test session in a fresh working directory."""

    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def out(self) -> Path:
        return self.cwd / "demo_output"

    @property
    def store(self) -> str:
        return str(self.out / "store.zarr")

    def copy_store(self, dest: Path) -> str:
        """A private copy of the demo store, for commands that change it."""
        shutil.copytree(self.store, dest)
        return str(dest)


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> DemoRun:
    """The README's main command, `python -m demo`, with its defaults, in a fresh working directory (no
    --out): one run per test session, shared by every test that needs a demo store, and by every xdist
    worker through a file lock, so CI pays for it once. Tests read it; a test that changes files copies them."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    if os.environ.get("SLIDECACHE_TEST_DEMO_DIR"):  # developing the tests only: reuse a finished run (CI never sets it)
        shared = Path(os.environ["SLIDECACHE_TEST_DEMO_DIR"])
        shared.mkdir(parents=True, exist_ok=True)
    cwd, record = shared / "readme_demo", shared / "readme_demo.json"
    with FileLock(str(shared / "readme_demo.lock")):
        if not record.is_file():
            cwd.mkdir(exist_ok=True)
            started = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "demo"], cwd=cwd, capture_output=True, text=True, timeout=1800,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
            record.write_text(json.dumps({"returncode": run.returncode, "stdout": run.stdout, "stderr": run.stderr,
                                          "seconds": time.monotonic() - started}))
    data = json.loads(record.read_text())
    return DemoRun(cwd, data["returncode"], data["stdout"], data["stderr"], data["seconds"])


@pytest.fixture(scope="session")
def saved_tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tiny-qwen2 (random init, the real Qwen2 tokenizer) saved with save_pretrained: what a hub id becomes
    here, read through the same local-directory loading path (tests/readme.py, the substitution table)."""
    from train.llm import load_llm

    folder = tmp_path_factory.mktemp("tiny_qwen2_checkpoint")
    loaded = load_llm("tiny-qwen2", seed=0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)
