"""The seam between the extraction and where it runs: the stages an executor runs, and what an executor offers.

The stages are plain functions and one plain class: `prepare_in_reader` and `read_in_reader` run in reader
processes, an `EncoderWorker` in an encoder's process (Ray) or thread (local), where it has its tiles read on its
own node (`ChunkReads`, made by the executor). Each executor takes stand-ins for them (`Stages`): a bench's that
leave only the coordination to measure, a test's that crash their process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from extract.config import ExtractConfig
from extract.encoder_worker import EncoderWorker
from extract.slide_prep import PreparedSlide, prepare_slide, read_tiles
from slidecache.cohorts.slides import SlideEntry

READER_NICENESS = 10
READ_RETRIES = 2  # as Ray's max_retries for the reader tasks


def yield_to_encoders() -> None:
    """Readers run at a lower CPU priority than the encoder, once per worker process: where they share
    cores (a CPU node, or a GPU's feeding thread), the encoder's threads run whenever they can and the
    readers take what the encoder leaves idle, instead of stalling its parallel regions."""
    if os.getpriority(os.PRIO_PROCESS, 0) < READER_NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, READER_NICENESS)


def prepare_in_reader(entry: SlideEntry, cfg: ExtractConfig) -> PreparedSlide:
    yield_to_encoders()
    return prepare_slide(entry, cfg)


def read_in_reader(reader: str, path: str, plan: Any, coords: np.ndarray) -> np.ndarray:
    yield_to_encoders()
    return read_tiles(reader, path, plan, coords)


PrepareStage = Callable[[SlideEntry, ExtractConfig], PreparedSlide]
ReadStage = Callable[[str, str, Any, np.ndarray], np.ndarray]  # reader name, slide path, plan, coords → tiles


class Stages(NamedTuple):
    """What an executor runs, the real stages unless given others. The local executor pickles `prepare` and
    `read` into its reader processes (a module-level function or a picklable callable); Ray runs them as tasks
    (`read` a plain function)."""

    worker: type[EncoderWorker] = EncoderWorker
    prepare: PrepareStage = prepare_in_reader
    read: ReadStage = read_in_reader


@dataclass(frozen=True)
class Resources:
    gpus: int
    cpus: int
    nodes: list[str]  # live nodes with CPUs, sorted


class Executor(Protocol):
    name: str

    def resources(self) -> Resources: ...

    def gpus(self) -> int: ...  # what resources() would say, without starting anything
    def start_encoders(self, worker_args: tuple[Any, ...], count: int, gpus: int, nodes: list[str]) -> list[Any]:
        """`count` workers, each built as worker(*worker_args, node=..., device=...), one per GPU when there are
        GPUs; a slide encoder worker is given `reads` on its own node."""
    def prepare(self, entry: SlideEntry, cfg: ExtractConfig) -> Any: ...
    def read(self, prepared: PreparedSlide, start: int, stop: int, near: str | None) -> Any:
        """Start reading tiles start:stop on node `near` (where its encoder runs) if given; a worker's
        `reads.get` takes the handle."""
    def call(self, actor: Any, method: str, *args: Any) -> Any: ...
    def wait(self, refs: Sequence[Any], timeout: float) -> list[Any]:
        """Every ref of `refs` that is ready, waiting up to `timeout` for the first."""
    def get(self, ref: Any) -> Any: ...
    def done(self, ref: Any) -> bool: ...
    def succeeded(self, ref: Any) -> bool: ...
    def actor_died(self, error: BaseException) -> bool: ...
