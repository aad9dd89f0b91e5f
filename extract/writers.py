"""The writers of the slides pinned to one encoder process: embeddings go from the encoder to the store
where they were computed, never through the coordinating driver.

The encoder worker calls, for each slide pinned to it, `open` → `append` × chunks → `commit`, all within the
slide's one call (extract/encoder_worker.py). Appends are written by one thread
behind the encoder, in order, so compressing and storing a chunk overlaps encoding the next (a GPU is
never kept waiting on zstd); an append's error surfaces at the slide's next call, and `commit` returns
once everything before it is written. The writers' leases are renewed by another thread, so a slide
waiting behind another slide's long chunks keeps its lease. When the process restarts
(killed, its node lost) its writers and the rows they buffered are gone: the driver sends the slide again,
to be written from its first tile, naming the dead writer's lease token as its own so that it is taken over
at once. A chunk that does not continue the rows of its slide's writer raises WriterRestarted.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Collection, Mapping

import numpy as np

from slidecache.errors import SlideBusy, WriterRestarted
from store.embedding_store import EmbeddingStore
from store.slide_writer import SlideWriter

HEARTBEAT_EVERY_S = 5.0  # cheap: a writer renews its lease only when a tenth of it has passed


class PinnedWriters:
    """Open slide writers of one process, keyed by slide id; every method is safe against the heartbeat thread."""

    def __init__(self, store_url: str, storage_options: Mapping[str, Any] | None,
                 token_shape: tuple[int, int] | None) -> None:
        self.store_url, self.storage_options, self.token_shape = store_url, dict(storage_options or {}), token_shape
        self._store: EmbeddingStore | None = None
        self._writers: dict[str, SlideWriter] = {}
        self._refused: set[str] = set()  # opened elsewhere or complete: their chunks need no encoding here
        self._lost: dict[str, SlideBusy] = {}  # taken over while their chunks waited
        self._rows: dict[str, int] = {}  # rows handed over per slide (written or queued)
        self._queued: dict[str, Future] = {}  # each slide's latest queued append
        self._failed: dict[str, BaseException] = {}  # a slide's first failed append: later ones are skipped
        self._lock = threading.Lock()
        self._writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-writer")  # one: in order
        threading.Thread(target=self._heartbeats, name="slide-leases", daemon=True).start()

    def _open_store(self) -> EmbeddingStore:
        if self._store is None:
            self._store = EmbeddingStore.open(self.store_url, mode="a", storage_options=self.storage_options)
        return self._store

    def open(self, slide_id: str, attrs: Mapping[str, Any], thumbnail: np.ndarray, mask: np.ndarray,
             downsample: float, token: str, own_tokens: Collection[str]) -> str:
        """Start the slide's writer under the driver's lease `token`: "open", or "complete" (another job
        committed it). SlideBusy when another live job owns it."""
        with self._lock:
            self._drop(slide_id)
            store = self._open_store()
            if store.is_complete(slide_id):
                self._refused.add(slide_id)
                return "complete"
            try:
                writer = store.write_slide(slide_id, attrs, token_shape=self.token_shape, lease_token=token,
                                           own_tokens=own_tokens)
            except BaseException:
                self._refused.add(slide_id)
                raise
            try:
                writer.set_thumbnail(thumbnail, mask, downsample)
            except BaseException:
                writer.abort()
                self._refused.add(slide_id)
                raise
            self._refused.discard(slide_id)
            self._writers[slide_id] = writer
            self._rows[slide_id] = 0
            return "open"

    def refused(self, slide_id: str) -> bool:
        """True when this process knows the slide's chunks are not wanted (skip encoding them)."""
        return slide_id in self._refused

    def expect(self, slide_id: str, start: int) -> None:
        """Raise WriterRestarted unless this process holds the slide's writer, its rows ending at `start`
        (and what an earlier append of the slide raised, if one did)."""
        with self._lock:
            self._check_queued(slide_id)
            self._writer(slide_id)
            if self._rows[slide_id] != start:  # a chunk sent to an earlier life of this process
                held = self._rows[slide_id]
                self._drop(slide_id)
                raise WriterRestarted(f"slide {slide_id!r}: chunk from row {start} reached a writer holding "
                                      f"{held} rows (its encoder process restarted)")

    def append(self, slide_id: str, start: int, coords: np.ndarray, tissue: np.ndarray, embeddings: np.ndarray,
               grid: np.ndarray | None) -> int:
        """Queue one chunk's rows, which must start where the slide's rows end. Returns the rows queued."""
        self.expect(slide_id, start)
        with self._lock:
            writer = self._writers[slide_id]
            self._rows[slide_id] += len(embeddings)
            self._queued[slide_id] = self._writing.submit(self._append_in_order, slide_id, writer, coords, tissue,
                                                          embeddings, grid)
        return len(embeddings)

    def _append_in_order(self, slide_id: str, writer: SlideWriter, *rows: Any) -> None:
        with self._lock:
            if slide_id in self._failed:
                return
            try:
                writer.append(*rows)
            except BaseException as e:  # noqa: BLE001 - raised at the slide's next call
                self._failed[slide_id] = e

    def commit(self, slide_id: str, extra_attrs: Mapping[str, Any], empty_reason: str | None) -> int:
        """Commit the slide (its marker last) once its queued rows are written. Returns its row count (0 for a
        slide whose opening was refused: the caller learnt why from the open, and this answer goes unread)."""
        with self._lock:
            if slide_id in self._refused:  # never also a writer: open and abort keep them apart
                return 0
            writer = self._writer(slide_id)
        try:
            rows = self._writing.submit(self._commit_in_order, slide_id, writer, extra_attrs, empty_reason).result()
        except BaseException:
            with self._lock:
                self._drop(slide_id)
            raise
        with self._lock:
            self._writers.pop(slide_id, None)
            self._queued.pop(slide_id, None)
            self._rows.pop(slide_id, None)
        return rows

    def _commit_in_order(self, slide_id: str, writer: SlideWriter, extra_attrs: Mapping[str, Any],
                         empty_reason: str | None) -> int:
        """On the writing thread, after every append queued before it: commit unless one of them failed."""
        with self._lock:
            if slide_id in self._failed:
                raise self._failed.pop(slide_id)
            writer.commit(extra_attrs=extra_attrs, empty_reason=empty_reason)
            return writer.rows_written

    def _locked(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return call(*args, **kwargs)

    def _check_queued(self, slide_id: str) -> None:
        """Raise what an append of the slide raised, dropping its writer (which removes its own rows)."""
        if slide_id in self._failed:
            error = self._failed.pop(slide_id)
            self._drop(slide_id)
            raise error

    def abort(self, slide_id: str) -> None:
        """Remove the slide's rows; returns once they are removed (after any append still queued)."""
        with self._lock:
            removing = self._drop(slide_id)
            self._refused.add(slide_id)
        if removing is not None:
            removing.result()

    def _writer(self, slide_id: str) -> SlideWriter:
        if slide_id in self._lost:
            raise self._lost.pop(slide_id)
        writer = self._writers.get(slide_id)
        if writer is None:
            raise WriterRestarted(f"slide {slide_id!r}: this encoder process holds no writer for it (it restarted "
                                  "after the slide was opened here)")
        return writer

    def _drop(self, slide_id: str) -> Future | None:
        """Forget the slide's writer, which removes its rows: at once, or (returned) on the writing thread after
        the appends still queued there."""
        removing = None
        writer = self._writers.pop(slide_id, None)
        queued = self._queued.pop(slide_id, None)
        self._rows.pop(slide_id, None)
        self._failed.pop(slide_id, None)
        if writer is not None:
            if queued is not None and not queued.done():  # abort after its queued rows, on the writing thread
                removing = self._writing.submit(self._locked, writer.abort)
            else:
                writer.abort()
        self._lost.pop(slide_id, None)
        return removing

    def _heartbeats(self) -> None:
        while True:
            time.sleep(HEARTBEAT_EVERY_S)
            with self._lock:
                for slide_id, writer in list(self._writers.items()):
                    try:
                        writer.heartbeat()
                    except SlideBusy as e:  # taken over: its next append or commit reports it
                        del self._writers[slide_id]
                        self._lost[slide_id] = e
                    except Exception:  # noqa: BLE001 - storage hiccup: the next append retries the renewal
                        pass
