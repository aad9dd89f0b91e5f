"""The stages on one machine without Ray: readers in a pool of processes, each encoder on a thread of the driver.
No Ray start-up and nothing to install beyond the core packages, which suits a one-GPU workstation and the GPU
bench machine (no Ray there). A crash of the encoder ends the run; slides already committed stay committed and a
rerun resumes."""

from __future__ import annotations

import multiprocessing
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

import numpy as np

from extract.config import ExtractConfig
from extract.encoder_worker import EncoderWorker
from extract.slide_prep import PreparedSlide
from extract.stages import READ_RETRIES, PrepareStage, ReadStage, Resources, prepare_in_reader, read_in_reader
from slidecache.cohorts.slides import SlideEntry
from slidecache.devices import usable_cores, visible_gpus
from slidecache.errors import ConfigError, ReaderDied


class LocalReads:
    """A local encoder's reads: the executor's reader processes (the driver's machine is its node)."""

    def __init__(self, executor: LocalExecutor) -> None:
        self._executor = executor

    def submit(self, prepared: PreparedSlide, start: int, stop: int) -> Future:
        return self._executor.read(prepared, start, stop, None)

    def get(self, handle: Future) -> tuple[np.ndarray, str]:
        return handle.result(), "local"


class _LocalEncoder:
    """An encoder worker built and run on a thread of its own: calls run one at a time, in the order sent, as a
    Ray actor's do; futures among a call's arguments are waited for on that thread. One worker per device holds
    the encoders of every store of the run, so they take turns, each with every core (encoding at once on
    threads of their own, splitting the cores, they ran slower than by turns, and each thread's malloc arena
    kept its own activations: bench/RESULTS.md)."""

    def __init__(self, executor: LocalExecutor, worker: type[Any], worker_args: tuple[Any, ...],
                 device: str | None) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._worker = self._thread.submit(self._build, executor, worker, worker_args, device)

    @staticmethod
    def _build(executor: LocalExecutor, worker: type[Any], worker_args: tuple[Any, ...], device: str | None) -> Any:
        built = worker(*worker_args, node="local", device=device)
        if isinstance(built, EncoderWorker):
            built.reads = LocalReads(executor)
        return built

    def submit(self, method: str, args: tuple[Any, ...]) -> Future:
        return self._thread.submit(self._run, method, args)

    def _run(self, method: str, args: tuple[Any, ...]) -> Any:
        worker = self._worker.result()  # raises what building the encoder raised
        args = tuple(a.result() if isinstance(a, Future) else a for a in args)
        return getattr(worker, method)(*args)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def _start_reader() -> None:
    """A reader process: Ctrl-C reaches the whole process group, and the driver alone answers it (it stops the
    pool and says how to resume), so readers ignore SIGINT instead of each printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalExecutor:
    """Readers: a pool of worker processes, one per core, started by a fork server (the driver holds torch
    and threads, which a plain fork would copy mid-state). Encoders: one per GPU (cuda:i), else one on CPU,
    each holding every store's encoder (they take turns, each with every core). The stages may be replaced
    (extract.stages.Stages): `prepare` and `read` are pickled into the reader processes."""

    name = "local"

    def __init__(self, cfg: ExtractConfig, worker: type[EncoderWorker] = EncoderWorker,
                 prepare: PrepareStage = prepare_in_reader, read: ReadStage = read_in_reader) -> None:
        self._stage_worker, self._stage_prepare, self._stage_read = worker, prepare, read
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["extract.slide_prep"])  # each reader starts with its imports done
        self.cores = usable_cores()
        self._pool = self._new_pool(self.cores)
        self._pool_lock = threading.Lock()
        self._encoders: list[_LocalEncoder] = []

    def resources(self) -> Resources:
        return Resources(visible_gpus(), self.cores, ["local"])

    def gpus(self) -> int:
        return visible_gpus()

    def start_encoders(self, worker_args: tuple[Any, ...], count: int, gpus: int, nodes: list[str]) -> list[Any]:
        """`count` workers: one per GPU (cuda:i), else one on the CPU."""
        if gpus and count > gpus:
            raise ConfigError(f"--num-encoders {count}: the local executor runs one encoder per GPU and this machine "
                              f"has {gpus}; use Ray (--executor ray) to share GPUs")
        if not gpus:
            count = 1
        started = [_LocalEncoder(self, self._stage_worker, worker_args, f"cuda:{i}" if gpus else None)
                   for i in range(count)]
        self._encoders += started
        return started

    def prepare(self, entry: SlideEntry, cfg: ExtractConfig) -> Future:
        return self._submit("prepare", self._stage_prepare, entry, cfg)

    def read(self, prepared: PreparedSlide, start: int, stop: int, near: str | None) -> Future:
        return self._submit("read", self._stage_read, prepared.reader, prepared.entry.path, prepared.plan,
                            prepared.coords[start:stop])

    def _submit(self, stage: str, fn: Callable[..., Any], *args: Any) -> Future:
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
                                   f"{stage} (a crash in the slide's decoder, or out of memory)")
            if error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(inner.result())

        run(self._pool, READ_RETRIES, alone=False)
        return outer

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=self._context, initializer=_start_reader)

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
