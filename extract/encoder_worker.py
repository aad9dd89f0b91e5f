"""One device's encoders, one per store the run fills, and the writers of the slides pinned to them: what a Ray
encoder actor runs, and what the single-node executor runs on a thread of the driver. A plain class, so it needs
no Ray to import or run.

The driver sends one call per slide, `encode_slide`. The worker reads the slide's tiles where it runs (reader
tasks placed on its own node, or the local executor's reader processes: `reads`), a few chunks ahead of the
encoder, encodes each chunk once per store that lacks the slide and writes the rows behind it. Tile pixels
never pass through the driver and never leave the node; the driver only plans slides and reads the answers.
The first chunks of a slide are read on the driver's order as the call is sent (`SlideJob.first_reads`), so
the next slide's tiles are ready when the slide before it commits.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from extract.config import ExtractConfig
from extract.slide_prep import PreparedSlide
from slidecache.errors import SlideBusy


class ChunkReads(Protocol):
    """Where a worker has its tiles read: `submit` starts a read of tiles start:stop of a slide, `get` waits for
    one (its own or one the driver started) and returns the tiles and the node that read them."""

    def submit(self, prepared: PreparedSlide, start: int, stop: int) -> Any: ...
    def get(self, handle: Any) -> tuple[np.ndarray, str]: ...


@dataclass
class SlideJob:
    """One slide for some of the worker's stores (indices into its stores), under one lease token."""

    prepared: PreparedSlide
    stores: list[int]
    token: str
    own_tokens: list[str]  # earlier attempts' tokens: their leases are ours to take over at once
    read_chunk: int
    reads_ahead: int  # chunks being read while one is encoded: memory stays flat however large the slide
    first_reads: list[Any] = field(default_factory=list)  # handles of its first chunks, started by the driver


@dataclass
class StoreAnswer:
    """What became of the slide in one store: done, empty, skipped (complete already), owned (another live job
    writes it) or failed (`error`)."""

    status: str
    rows: int = 0
    error: BaseException | None = None


@dataclass
class SlideAnswer:
    stores: dict[int, StoreAnswer]
    node: str  # where it was encoded and written
    read_nodes: list[str]  # where each of its chunks was read, in order
    seconds: float


class EncoderWorker:
    """Calls run one at a time in the order sent (a Ray actor's do; the local executor's encoder thread too), so
    whatever a death interrupts was the oldest call not yet answered."""

    reads: ChunkReads  # set by the executor once the worker is built (a Ray actor makes its own, on its node)

    def __init__(self, stores: Sequence[tuple[ExtractConfig, str]], storage_options: dict[str, Any], node: str,
                 device: str | None = None) -> None:
        from extract.writers import PinnedWriters

        self.encoders = [self._build_encoder(cfg, device) for cfg, _ in stores]
        self.writers = [PinnedWriters(url, storage_options, encoder.token_shape)
                        for (_, url), encoder in zip(stores, self.encoders)]
        self.node = node
        self.busy_s = 0.0  # time inside the encoders: the bench's busy fraction
        self.tiles = 0

    @staticmethod
    def _build_encoder(config: ExtractConfig, device: str | None) -> Any:
        import torch

        from extract.inference import BatchEncoder

        return BatchEncoder(config, torch.device(device) if device else None)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"encoders": [e.describe() for e in self.encoders], "token_shapes": [e.token_shape for e in self.encoders],
                "device": str(self.encoders[0].device), "pid": os.getpid(), "threads": torch.get_num_threads(),
                "node": self.node}

    def stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "tiles": self.tiles}

    # ---- one slide --------------------------------------------------------------------------------

    def encode_slide(self, job: SlideJob, pictures: tuple[np.ndarray, np.ndarray]) -> SlideAnswer:
        """Open the slide's writer in each of `job.stores`, read, encode and append its chunks in order, commit.
        An error of one store (its storage, another job taking it over) ends the slide there and nowhere else;
        an error reading the slide raises, after every writer this call opened has removed its rows."""
        began = time.perf_counter()
        p = job.prepared
        answers: dict[int, StoreAnswer] = {}
        live = [i for i in job.stores if self._open(i, job, pictures, answers)]
        read_nodes: list[str] = []
        try:
            if live:
                self._encode_chunks(job, live, answers, read_nodes)
            timings = {**p.attrs.get("timings", {}), "encode_write_s": round(time.perf_counter() - began, 3)}
            extra = {"timings": timings, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "nodes": {"encoded": self.node, "read": sorted(set(read_nodes))}}  # Ray node ids, or "local"
            for i in list(live):
                try:
                    rows = self.writers[i].commit(p.entry.slide_id, extra, p.empty_reason if p.n_tiles == 0 else None)
                    answers[i] = StoreAnswer("done" if p.n_tiles else "empty", rows)
                except Exception as e:  # noqa: BLE001 - this store's failure; the others stand
                    self._failed(i, p.entry.slide_id, e, answers, live)
        except BaseException:
            for i in live:
                self.writers[i].abort(p.entry.slide_id)
            raise
        return SlideAnswer(answers, self.node, read_nodes, time.perf_counter() - began)

    def _open(self, i: int, job: SlideJob, pictures: tuple[np.ndarray, np.ndarray],
              answers: dict[int, StoreAnswer]) -> bool:
        p = job.prepared
        thumbnail, mask = pictures
        try:
            opened = self.writers[i].open(p.entry.slide_id, p.attrs, thumbnail, mask, p.downsample, job.token,
                                          job.own_tokens)
        except Exception as e:  # noqa: BLE001 - this store's (owned by another live job, or failed); the others go on
            answers[i] = StoreAnswer("owned" if isinstance(e, SlideBusy) else "failed", error=e)
            return False
        if opened == "complete":
            answers[i] = StoreAnswer("skipped")
            return False
        return True

    def _encode_chunks(self, job: SlideJob, live: list[int], answers: dict[int, StoreAnswer],
                       read_nodes: list[str]) -> None:
        """Read ahead, encode each chunk once per live store, append it; stop early when no store is left."""
        p = job.prepared
        n = p.n_tiles
        spans = [(s, min(s + job.read_chunk, n)) for s in range(0, n, job.read_chunk)]
        reading: deque[Any] = deque(job.first_reads)  # the first chunks, started by the driver
        next_read = len(reading)
        for start, stop in spans:
            if not live:
                return
            while next_read < len(spans) and len(reading) < max(1, job.reads_ahead):
                reading.append(self.reads.submit(p, *spans[next_read]))
                next_read += 1
            tiles, node = self.reads.get(reading.popleft())
            read_nodes.append(node)
            for i in list(live):
                try:
                    self._encode_append(i, p.entry.slide_id, start, tiles, p.coords[start:stop], p.tissue[start:stop])
                except Exception as e:  # noqa: BLE001 - this store's (its storage; another job took it over)
                    self._failed(i, p.entry.slide_id, e, answers, live)

    def _failed(self, i: int, slide_id: str, error: BaseException, answers: dict[int, StoreAnswer],
                live: list[int]) -> None:
        """Store i is done with the slide (owned by another job now, or failed): its writer removes its rows."""
        answers[i] = StoreAnswer("owned" if isinstance(error, SlideBusy) else "failed", error=error)
        live.remove(i)
        self.writers[i].abort(slide_id)

    def _encode_append(self, i: int, slide_id: str, start: int, tiles: np.ndarray, coords: np.ndarray,
                       tissue: np.ndarray) -> int:
        """One chunk into store i: encode, then queue its rows (written behind the next chunk's encoding)."""
        began = time.perf_counter()
        emb, grid = self.encoders[i](tiles)
        self.busy_s += time.perf_counter() - began
        self.tiles += len(tiles)
        return self.writers[i].append(slide_id, start, coords, tissue, emb, grid)
