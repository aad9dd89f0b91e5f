"""Where the extraction's stages run. The stages are plain functions and one plain class
(`prepare_slide`, `read_tiles`, `EncoderWorker`); an executor runs them and hands back futures:

- `RayExecutor`: Ray tasks and actors, on one machine or a cluster (`ray job submit`); an encoder actor that
  dies is restarted by Ray and the driver writes its slides again (extract/job.py).
- `LocalExecutor`: one machine without Ray: readers in a pool of processes, each encoder on a thread of the
  driver. No Ray start-up (~6 s), nothing to install beyond the core packages, which suits a one-GPU
  workstation and the GPU bench machine (no Ray there). A crash of the encoder ends the run; slides already
  committed stay committed and a rerun resumes.

`executor_session(cfg)` picks one (`cfg.executor`; auto: Ray under `ray job submit` or with several GPUs,
else local; see resolve_executor).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from extract.config import ExtractConfig
from extract.encoder_worker import EncoderWorker
from extract.faults import forwarded_faults, set_faults
from extract.slide_prep import PreparedSlide, prepare_slide, read_tiles
from slidecache.cohorts.slides import SlideEntry
from slidecache.devices import usable_cores, visible_gpus
from slidecache.errors import ConfigError, ReaderDied

READER_NICENESS = 10
READ_RETRIES = 2  # as Ray's max_retries for the reader tasks


def yield_to_encoders() -> None:
    """Readers run at a lower CPU priority than the encoder, once per worker process: where they share
    cores (a CPU node, or a GPU's feeding thread), the encoder's threads run whenever they can and the
    readers take what the encoder leaves idle, instead of stalling its parallel regions."""
    if os.getpriority(os.PRIO_PROCESS, 0) < READER_NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, READER_NICENESS)


def _prepare(entry: SlideEntry, cfg: ExtractConfig) -> PreparedSlide:
    yield_to_encoders()
    return prepare_slide(entry, cfg)


def _apart(prepare: Callable[..., PreparedSlide]) -> Callable[..., tuple[PreparedSlide, Any]]:
    """`prepare` returning the slide's plan and its pictures (thumbnail, mask) as two task results, so that
    the driver gets the plan and hands the pictures' reference on to the writer without holding them."""
    def prepare_apart(entry: SlideEntry, cfg: ExtractConfig) -> tuple[PreparedSlide, Any]:
        p = prepare(entry, cfg)
        return dataclasses.replace(p, thumbnail=None, mask=None), (p.thumbnail, p.mask)

    return prepare_apart


def _read(reader: str, path: str, plan: Any, coords: np.ndarray) -> np.ndarray:
    yield_to_encoders()
    return read_tiles(reader, path, plan, coords)


@dataclass(frozen=True)
class Resources:
    gpus: int
    cpus: int
    nodes: list[str]  # live nodes with CPUs, sorted


class Executor(Protocol):
    name: str

    def resources(self) -> Resources: ...
    encoders_take_turns: bool  # several stores' encoders on one device: by turns (else they split its cores)

    def gpus(self) -> int: ...  # what resources() would say, without starting anything
    def start_encoders(self, cfg: ExtractConfig, store_url: str, storage_options: dict[str, Any],
                       count: int, gpus: int, nodes: list[str], share: int = 1) -> list[Any]: ...
    def prepare(self, entry: SlideEntry, cfg: ExtractConfig) -> Any: ...
    def read(self, prepared: PreparedSlide, start: int, stop: int, near: str | None) -> Any: ...
    def call(self, actor: Any, method: str, *args: Any) -> Any: ...
    def wait(self, refs: Sequence[Any], timeout: float) -> list[Any]:
        """Every ref of `refs` that is ready, waiting up to `timeout` for the first."""
    def get(self, ref: Any) -> Any: ...
    def done(self, ref: Any) -> bool: ...
    def succeeded(self, ref: Any) -> bool: ...
    def actor_died(self, error: BaseException) -> bool: ...


# ---- Ray ---------------------------------------------------------------------------------------


def connect_ray(cfg: ExtractConfig) -> bool:
    """Join the cluster given by RAY_ADDRESS (set by `ray job submit`), else start a capped local Ray.

    Returns True when this process started Ray (and so should shut it down).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return True
    # "local": a new Ray of our own, never one that a `ray start` left running on this machine (which
    # ray.init() with no address would join, refusing our object-store cap)
    ray.init(address="local", object_store_memory=cfg.object_store_memory, include_dashboard=False,
             log_to_driver=True)
    return True


@contextmanager
def lazy_ray_session(cfg: ExtractConfig) -> Iterator[RayExecutor]:
    """A Ray executor that joins or starts Ray (connect_ray) only when it first has work, and stops a Ray
    it started when the block ends: a rerun over a complete store starts none (5-6 s on 2 cores)."""
    executor = RayExecutor(cfg, connect=lambda: connect_ray(cfg))
    try:
        yield executor
    finally:
        if executor.started_ray:
            import ray

            ray.shutdown()


@contextmanager
def ray_session(cfg: ExtractConfig) -> Iterator[None]:
    """Ray for the length of a `with` block: the cluster joined or the local Ray started by connect_ray,
    shut down afterwards only if this process started it."""
    started = connect_ray(cfg)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


class RayExecutor:
    """Ray initialised by the caller (ray_session), or by this executor when it first has work (`connect`:
    lazy_ray_session), so that a rerun with nothing to encode starts no Ray. Tasks' tiles reach the actors
    through Ray's object store. The stages may be replaced (bench/scale_bench.py runs stand-ins to measure
    the coordination alone)."""

    name = "ray"
    encoders_take_turns = False  # actors are processes: several stores' CPU encoders split the cores instead

    def __init__(self, cfg: ExtractConfig, worker: type[EncoderWorker] = EncoderWorker,
                 prepare: Callable[..., PreparedSlide] = _prepare, read: Callable[..., np.ndarray] = _read,
                 connect: Callable[[], bool] | None = None) -> None:
        import ray

        self._ray = ray
        self._connect = connect
        self.started_ray = False  # whether this executor started Ray (and its session should stop it)
        self._worker = worker
        self._prepare = ray.remote(num_cpus=cfg.reader_cpus, max_retries=READ_RETRIES, retry_exceptions=False,
                                   num_returns=2)(_apart(prepare))
        self._pictures: dict[Any, Any] = {}  # a prepare's plan ref → its pictures ref, until the plan is got
        self._read = ray.remote(num_cpus=cfg.reader_cpus, max_retries=READ_RETRIES, retry_exceptions=False)(read)
        self._node_readers: dict[str, Any] = {}

    def _ensure_ray(self) -> None:
        if self._connect is not None and not self._ray.is_initialized():
            self.started_ray = self._connect()

    def gpus(self) -> int:
        """GPUs the encoders would run on; a local Ray not started yet would be this machine's (not started
        for the answer: a rerun with nothing to encode checks its fingerprint's precision with it)."""
        if self._connect is not None and not self._ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            return visible_gpus()
        return self.resources().gpus

    def resources(self) -> Resources:
        self._ensure_ray()
        ray = self._ray
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU"))
        res = ray.cluster_resources()
        return Resources(int(res.get("GPU", 0)), int(res.get("CPU", 1)), nodes)

    def start_encoders(self, cfg: ExtractConfig, store_url: str, storage_options: dict[str, Any],
                       count: int, gpus: int, nodes: list[str], share: int = 1) -> list[Any]:
        self._ensure_ray()
        ray = self._ray

        # No CPU reserved for the encoder even without a GPU: reserving one left a single reader task on a
        # 2-core node, and reading dominates small slides (the demo's 100 slides: 72 s → 43 s, measured).
        # Calls are not retried by Ray (a restarting actor's unreachable moments would use up the retries
        # of a lost node's calls): the driver counts deaths per call and writes the slides again.
        # `share` stores' encoders share each GPU (one read feeding several encoders): 1/share of it each.
        @ray.remote(num_gpus=1 / share if gpus else 0, num_cpus=0, max_restarts=-1, max_task_retries=0)
        class EncoderActor(self._worker):  # type: ignore[name-defined]
            def __init__(self, config: ExtractConfig, store_url: str, storage_options: dict[str, Any]) -> None:
                super().__init__(config, store_url, storage_options, ray.get_runtime_context().get_node_id())

        faults = forwarded_faults()  # test hooks set for this job reach its actors, wherever they run
        options: dict[str, Any] = {"runtime_env": {"env_vars": faults}} if faults else {}
        return [EncoderActor.options(**options, **self._placement(i, gpus, nodes))
                .remote(cfg, store_url, storage_options) for i in range(count)]

    @staticmethod
    def _placement(index: int, gpus: int, nodes: list[str]) -> dict[str, Any]:
        """GPU encoders go where Ray finds a free GPU (and restart on any node); CPU encoders (which reserve no
        resource, so Ray would stack them on one node) are pinned to the nodes in turn. Pinned hard: Ray 2.60
        placed zero-resource actors with soft affinity (or SPREAD) on the wrong node about half the time
        (seen with two nodes on one machine). An encoder whose node dies therefore stays dead; the driver
        moves its slides to the live ones (Extraction._pin_to_a_live_actor)."""
        if gpus or len(nodes) < 2:
            return {}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=False)}

    def prepare(self, entry: SlideEntry, cfg: ExtractConfig) -> Any:
        self._ensure_ray()
        plan, pictures = self._prepare.remote(entry, cfg)
        self._pictures[plan] = pictures
        return plan

    def read(self, prepared: PreparedSlide, start: int, stop: int, near: str | None) -> Any:
        """Read on node `near` when it has a free CPU (the tiles then stay on that node), else anywhere.
        One placed task per node, made once."""
        task = self._read
        if near is not None:
            if near not in self._node_readers:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                self._node_readers[near] = self._read.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(near, soft=True))
            task = self._node_readers[near]
        return task.remote(prepared.reader, prepared.entry.path, prepared.plan, prepared.coords[start:stop])

    def call(self, actor: Any, method: str, *args: Any) -> Any:
        return getattr(actor, method).remote(*args)

    def wait(self, refs: Sequence[Any], timeout: float) -> list[Any]:
        """Every ref of `refs` that is ready, waiting up to `timeout` for the first."""
        ready, rest = self._ray.wait(list(refs), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def get(self, ref: Any) -> Any:
        pictures = self._pictures.pop(ref, None)
        value = self._ray.get(ref)
        if pictures is not None:
            value.pictures = pictures
        return value

    def done(self, ref: Any) -> bool:
        ready, _ = self._ray.wait([ref], timeout=0)
        return bool(ready)

    def succeeded(self, ref: Any) -> bool:
        """A finished call that returned (did not raise)."""
        try:
            self._ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - only whether it raised matters here
            return False
        return True

    def actor_died(self, error: BaseException) -> bool:
        from ray.exceptions import RayActorError

        return isinstance(error, RayActorError)


# ---- one machine, no Ray -----------------------------------------------------------------------


class _LocalEncoder:
    """An EncoderWorker built and run on its device's thread: calls run one at a time, in the order sent, as a
    Ray actor's do; futures among a call's arguments (tiles being read) are waited for on that thread. The
    encoders of several stores on one device share its thread, so they take turns, each with every core
    (three on their own threads at once, split 1 thread each, ran 1.9x the sum of their separate encode
    times on 2 cores, and each thread's malloc arena kept its own activations)."""

    def __init__(self, cfg: ExtractConfig, store_url: str, storage_options: dict[str, Any], device: str | None,
                 thread: ThreadPoolExecutor) -> None:
        self._thread = thread
        self._worker = self._thread.submit(EncoderWorker, cfg, store_url, storage_options, "local", device)

    def submit(self, method: str, args: tuple[Any, ...]) -> Future:
        return self._thread.submit(self._run, method, args)

    def _run(self, method: str, args: tuple[Any, ...]) -> Any:
        worker = self._worker.result()  # raises what building the encoder raised
        args = tuple(a.result() if isinstance(a, Future) else a for a in args)
        return getattr(worker, method)(*args)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def _start_reader(faults: dict[str, str]) -> None:
    """A reader process: Ctrl-C reaches the whole process group, and the driver alone answers it (it stops the
    pool and says how to resume), so readers ignore SIGINT instead of each printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_faults(faults)


class LocalExecutor:
    """Readers: a pool of worker processes, one per core, started by a fork server (the driver holds torch
    and threads, which a plain fork would copy mid-state). Encoders: one per GPU (cuda:i), else one on CPU;
    several stores' encoders on one device take turns (each with every core)."""

    name = "local"
    encoders_take_turns = True

    def __init__(self, cfg: ExtractConfig) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["extract.slide_prep"])  # each reader starts with its imports done
        self.cores = usable_cores()
        self._pool = self._new_pool(self.cores)
        self._pool_lock = threading.Lock()
        self._encoders: list[_LocalEncoder] = []
        self._threads: dict[str | None, ThreadPoolExecutor] = {}  # device → the thread its encoders run on

    def resources(self) -> Resources:
        return Resources(visible_gpus(), self.cores, ["local"])

    def gpus(self) -> int:
        return visible_gpus()

    def start_encoders(self, cfg: ExtractConfig, store_url: str, storage_options: dict[str, Any],
                       count: int, gpus: int, nodes: list[str], share: int = 1) -> list[Any]:
        """`count` encoders of one store (called once per store: several stores' encoders share the GPUs)."""
        if gpus and count > gpus:
            raise ConfigError(f"--num-encoders {count}: the local executor runs one encoder per GPU and this machine "
                              f"has {gpus}; use Ray (--executor ray) to share GPUs")
        devices = [f"cuda:{i}" if gpus else None for i in range(count)]
        for device in devices:
            if device not in self._threads:
                self._threads[device] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        started = [_LocalEncoder(cfg, store_url, storage_options, device, self._threads[device]) for device in devices]
        self._encoders += started
        return started

    def prepare(self, entry: SlideEntry, cfg: ExtractConfig) -> Future:
        return self._submit(_prepare, entry, cfg)

    def read(self, prepared: PreparedSlide, start: int, stop: int, near: str | None) -> Future:
        return self._submit(_read, prepared.reader, prepared.entry.path, prepared.plan, prepared.coords[start:stop])

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn in a reader process; when a reader process dies (a decoder's crash, the OOM killer), run
        again what it took with it, as Ray retries a task. A dead process breaks the whole pool and fails
        every task in it, so the pool is replaced and each of those tasks is retried alone, in a process of
        its own, where a death is its own: a task that kills its process 1 + READ_RETRIES times fails with
        ReaderDied (its slide's error; the cohort goes on), the others complete."""
        outer: Future = Future()

        def run(pool: ProcessPoolExecutor, retries_left: int, alone: bool) -> None:
            try:
                inner = pool.submit(fn, *args)
            except BrokenProcessPool:  # broken by another task since it was chosen: retry alone
                self._replace_pool(pool)
                run(self._solo_pool(), retries_left, alone=True)
                return
            inner.add_done_callback(lambda f: settle(f, pool, retries_left, alone))

        def settle(inner: Future, pool: ProcessPoolExecutor, retries_left: int, alone: bool) -> None:
            error = inner.exception()
            if alone:
                pool.shutdown(wait=False)
            elif isinstance(error, BrokenProcessPool):
                self._replace_pool(pool)
            if isinstance(error, BrokenProcessPool):
                if retries_left:
                    run(self._solo_pool(), retries_left - 1, alone=True)
                    return
                error = ReaderDied(f"a reader process died {READ_RETRIES + 1} times running this slide's "
                                   f"{fn.__name__.strip('_')} (a crash in the slide's decoder, or out of memory)")
            if error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(inner.result())

        run(self._pool, READ_RETRIES, alone=False)
        return outer

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        # The fork server keeps the environment it started with (one per process, perhaps an earlier job's):
        # this job's fault hooks, exactly, reach its readers through the initializer, as Ray's runtime_env
        # hands them to its workers (a test's poisoned slide once failed in the next test of the process).
        return ProcessPoolExecutor(max_workers=workers, mp_context=self._context, initializer=_start_reader,
                                   initargs=(forwarded_faults(),))

    def _solo_pool(self) -> ProcessPoolExecutor:
        return self._new_pool(1)

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        with self._pool_lock:
            if self._pool is broken:  # once per break, whichever task saw it first
                self._pool = self._new_pool(self.cores)
        broken.shutdown(wait=False, cancel_futures=True)

    def call(self, actor: _LocalEncoder, method: str, *args: Any) -> Future:
        return actor.submit(method, args)

    def wait(self, refs: Sequence[Any], timeout: float) -> list[Any]:
        done, _ = wait_futures(set(refs), timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def get(self, ref: Future) -> Any:
        return ref.result()

    def done(self, ref: Future) -> bool:
        return ref.done()

    def succeeded(self, ref: Future) -> bool:
        return ref.done() and not ref.cancelled() and ref.exception() is None

    def actor_died(self, error: BaseException) -> bool:
        return False  # an encoder thread does not die apart from the run: its errors are the slide's

    def reader_cpu_seconds(self) -> float:
        """CPU time the reader processes used so far (user + system), for the pipeline bench."""
        import psutil

        total = 0.0
        for pid in list(getattr(self._pool, "_processes", {}) or {}):
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def shutdown(self) -> None:
        for encoder in self._encoders:
            encoder.shutdown()
        self._pool.shutdown(wait=True, cancel_futures=True)


def resolve_executor(name: str) -> str:
    """auto: Ray for a cluster (RAY_ADDRESS, as `ray job submit` sets) and for several GPUs (an actor per GPU,
    restarted if it dies); otherwise, on one machine with at most one GPU, or where Ray is not installed,
    the local executor (no Ray start-up: a single slide on 2 cores 20.4 → 10.7 s, bench/RESULTS.md)."""
    has_ray = importlib.util.find_spec("ray") is not None
    if name == "auto":
        if os.environ.get("RAY_ADDRESS"):
            name = "ray"
        else:
            return "ray" if has_ray and visible_gpus() > 1 else "local"
    if name == "ray" and not has_ray:
        raise ConfigError("Ray is not installed here (asked for by --executor ray or RAY_ADDRESS); install the "
                          "project (make install) or use --executor local (one machine, no Ray)")
    return name


@contextmanager
def executor_session(cfg: ExtractConfig) -> Iterator[Executor]:
    """The executor `cfg.executor` names, started for a `with` block and stopped after it."""
    if resolve_executor(cfg.executor) == "ray":
        with lazy_ray_session(cfg) as ray_executor:
            yield ray_executor
        return
    executor = LocalExecutor(cfg)
    try:
        yield executor
    finally:
        executor.shutdown()
