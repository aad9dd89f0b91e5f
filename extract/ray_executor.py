"""The stages as Ray tasks and actors, on one machine or a cluster (`ray job submit`): an encoder actor that dies
is restarted by Ray and the driver writes its slides again (extract/job.py). Each encoder actor has its slides'
tiles read by reader tasks placed on its own node, so tiles go reader → encoder through that node's object store
and never through the driver. Ray itself is joined or started by slidecache.ray_connect."""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from extract.config import ExtractConfig
from extract.encoder_worker import EncoderWorker
from extract.slide_prep import PreparedSlide
from extract.stages import READ_RETRIES, PrepareStage, ReadStage, Resources, Stages, prepare_in_reader, read_in_reader
from slidecache.cohorts.slides import SlideEntry
from slidecache.devices import visible_gpus
from slidecache.ray_connect import connect_ray, shutdown_ray


@contextmanager
def lazy_ray_session(cfg: ExtractConfig, stages: Stages = Stages()) -> Iterator[RayExecutor]:
    """A Ray executor that joins the cluster of RAY_ADDRESS, or starts a Ray of this process's own (its object
    store capped by `cfg`), only when it first has work, and stops a Ray it started when the block ends: a rerun
    over a complete store starts none."""
    executor = RayExecutor(cfg, **stages._asdict(),
                           connect=lambda: connect_ray(object_store_memory=cfg.object_store_memory))
    try:
        yield executor
    finally:
        if executor.started_ray:
            shutdown_ray()


def _apart(prepare: PrepareStage) -> Callable[..., tuple[PreparedSlide, Any]]:
    """`prepare` returning the slide's plan and its pictures (thumbnail, mask) as two task results, so that
    the driver gets the plan and hands the pictures' reference on to the writer without holding them."""
    def prepare_apart(entry: SlideEntry, cfg: ExtractConfig) -> tuple[PreparedSlide, Any]:
        p = prepare(entry, cfg)
        return dataclasses.replace(p, thumbnail=None, mask=None), (p.thumbnail, p.mask)

    return prepare_apart


def _where_read(read: ReadStage) -> Callable[..., tuple[np.ndarray, str]]:
    """`read` answering its tiles and the node that read them (recorded with each slide)."""
    def read_and_say_where(reader: str, path: str, plan: Any, coords: np.ndarray) -> tuple[np.ndarray, str]:
        import ray

        return read(reader, path, plan, coords), ray.get_runtime_context().get_node_id()

    return read_and_say_where


def _on_node(task: Any, node: str | None) -> Any:
    """The task placed on `node` (waiting for its CPUs there; anywhere only if the node is gone)."""
    if node is None:
        return task
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))


class NodeReads:
    """An encoder actor's reads: reader tasks on its own node, whose tiles it takes from that node's object
    store. Ray retries a task whose process died (READ_RETRIES)."""

    def __init__(self, read_task: Any, node: str) -> None:
        import ray

        self._ray = ray
        self._task = _on_node(read_task, node)

    def submit(self, prepared: PreparedSlide, start: int, stop: int) -> Any:
        return self._task.remote(prepared.reader, prepared.entry.path, prepared.plan, prepared.coords[start:stop])

    def get(self, handle: Any) -> tuple[np.ndarray, str]:
        return self._ray.get(handle)


class RayExecutor:
    """Ray initialised by the caller, or by this executor when it first has work (`connect`:
    lazy_ray_session), so that a rerun with nothing to encode starts no Ray. Tasks' tiles reach the actors
    through Ray's object store. The stages may be replaced (extract.stages.Stages)."""

    name = "ray"

    def __init__(self, cfg: ExtractConfig, worker: type[EncoderWorker] = EncoderWorker,
                 prepare: PrepareStage = prepare_in_reader, read: ReadStage = read_in_reader,
                 connect: Callable[[], bool] | None = None) -> None:
        import ray

        self._ray = ray
        self._connect = connect
        self.started_ray = False  # whether this executor started Ray (and its session should stop it)
        self._worker = worker
        self._prepare = ray.remote(num_cpus=cfg.reader_cpus, max_retries=READ_RETRIES, retry_exceptions=False,
                                   num_returns=2)(_apart(prepare))
        self._pictures: dict[Any, Any] = {}  # a prepare's plan ref → its pictures ref, until the plan is got
        self._read = ray.remote(num_cpus=cfg.reader_cpus, max_retries=READ_RETRIES,
                                retry_exceptions=False)(_where_read(read))
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

    def start_encoders(self, worker_args: tuple[Any, ...], count: int, gpus: int, nodes: list[str]) -> list[Any]:
        self._ensure_ray()
        ray = self._ray

        # No CPU reserved for the encoder even without a GPU: reserving one left a single reader task on a
        # 2-core node, and reading dominates small slides (bench/RESULTS.md).
        # Calls are not retried by Ray (a restarting actor's unreachable moments would use up the retries
        # of a lost node's calls): the driver counts deaths per call and writes the slides again.
        @ray.remote(num_gpus=1 if gpus else 0, num_cpus=0, max_restarts=-1, max_task_retries=0)
        class EncoderActor(self._worker):  # type: ignore[name-defined]
            def __init__(self, read_task: Any, *args: Any) -> None:
                node = ray.get_runtime_context().get_node_id()
                super().__init__(*args, node=node)
                self.reads = NodeReads(read_task, node)

        return [EncoderActor.options(**self._placement(i, gpus, nodes)).remote(self._read, *worker_args)
                for i in range(count)]

    @staticmethod
    def _placement(index: int, gpus: int, nodes: list[str]) -> dict[str, Any]:
        """GPU encoders go where Ray finds a free GPU (and restart on any node); CPU encoders (which reserve no
        resource, so Ray would stack them on one node) are pinned to the nodes in turn. Pinned hard: Ray placed
        zero-resource actors with soft affinity (or SPREAD) on the wrong node (seen with two nodes on one
        machine). An encoder whose node dies therefore stays dead; the driver moves its slides to the live ones
        (Extraction._pin_to_a_live_actor)."""
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
        """Read on node `near` (its encoder's: the tiles then stay on that node), else anywhere. One placed
        task per node, made once."""
        task = self._read
        if near is not None:
            if near not in self._node_readers:
                self._node_readers[near] = _on_node(self._read, near)
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
