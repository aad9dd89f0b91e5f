"""The extraction job on Ray: CPU tasks plan slides and read tiles, GPU (or CPU) actors encode them,
the driver streams results into the store slide by slide and commits each slide when it is whole.

    prepare_task(slide) ──► read_task(chunk) ──► EncoderActor.encode(tiles) ──► driver: writer.append
          (CPU)                 (CPU)                 (1 per GPU)                 (in tile order)

Tile pixels go from reader tasks to encoder actors through Ray's object store without visiting the
driver, which receives only embeddings. In-flight chunks and slides open for writing are bounded, so
memory stays flat however large a slide is. Encoder actors restart when killed and their in-flight
chunk runs again, at most MAX_CHUNK_RETRIES times: a chunk that kills its actor every time fails its slide
instead of retrying forever. The driver appends each chunk exactly once. One bad slide is recorded as a
failure in the store and never stops the cohort. Each slide's writer holds a lease on it (store/lease.py):
a slide another live job is writing is skipped here and reported as "owned", not as a failure.
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from extract.config import ExtractConfig
from extract.faults import pause_after_first_append
from extract.slide_prep import PreparedSlide, prepare_slide, read_tiles, tissue_params
from store.cohort import SlideEntry
from store.embedding_store import EmbeddingStore, SlideWriter
from store.errors import EncoderError, SlideBusy, SlidecacheError

PROGRESS_EVERY_S = 10.0
MAX_CHUNK_RETRIES = 2  # a chunk runs at most 3 times on encoder actors that die under it


@dataclass
class SlideOutcome:
    slide_id: str
    status: str  # done | empty | skipped | owned (another live job writes it) | failed | failed-before
    tiles: int = 0
    seconds: float = 0.0
    reader: str = ""
    mpp: float | None = None
    error: str = ""


@dataclass
class ExtractionSummary:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    seconds: float = 0.0  # the whole run
    pipeline_seconds: float = 0.0  # from the encoders being ready to the last commit (no model loading)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def tiles(self) -> int:
        return sum(o.tiles for o in self.outcomes if o.status == "done")

    @property
    def failed(self) -> list[SlideOutcome]:
        """Slides without embeddings because of an error: in this run, or earlier and not retried."""
        return [o for o in self.outcomes if o.status in ("failed", "failed-before")]

    def table(self) -> str:
        rows = [f"{'slide':<40} {'status':<8} {'tiles':>7} {'reader':<10} {'mpp':>7} {'s':>7}  error"]
        for o in self.outcomes:
            mpp = f"{o.mpp:.3f}" if o.mpp else "-"
            rows.append(f"{o.slide_id[:40]:<40} {o.status:<8} {o.tiles:>7} {o.reader:<10} {mpp:>7} {o.seconds:>7.1f}  {o.error[:120]}")
        rows.append(f"{self.count('done')} done, {self.count('empty')} without tiles, {self.count('skipped')} already "
                    f"complete, {self.count('owned')} being written by another job, {self.count('failed')} failed, "
                    f"{self.count('failed-before')} failed before and not retried; "
                    f"{self.tiles} tiles in "
                    f"{self.seconds:.1f} s ({self.tiles / max(self.seconds, 1e-9):.1f} tiles/s)")
        return "\n".join(rows)


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
    ray.init(object_store_memory=cfg.object_store_memory, include_dashboard=False, log_to_driver=True)
    return True


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


def _ray_remotes(cfg: ExtractConfig, encoder_gpus: float) -> tuple[Any, Any, Any]:
    """The remote functions and actor class, defined lazily so importing this module needs no Ray."""
    import ray

    @ray.remote(num_cpus=cfg.reader_cpus, max_retries=2, retry_exceptions=False)
    def prepare_task(entry: SlideEntry) -> PreparedSlide:
        return prepare_slide(entry, cfg)

    @ray.remote(num_cpus=cfg.reader_cpus, max_retries=2, retry_exceptions=False)
    def read_task(reader: str, path: str, plan: Any, coords: np.ndarray) -> np.ndarray:
        return read_tiles(reader, path, plan, coords)

    # No CPU reserved for the encoder even without a GPU: reserving one left a single reader task on a
    # 2-core node, and reading dominates small slides (the demo's 100 slides: 72 s → 43 s, measured).
    @ray.remote(num_gpus=encoder_gpus, num_cpus=0, max_restarts=-1,
                max_task_retries=MAX_CHUNK_RETRIES)
    class EncoderActor:
        def __init__(self, config: ExtractConfig) -> None:
            from extract.encode import BatchEncoder

            self.encoder = BatchEncoder(config)

        def describe(self) -> dict[str, Any]:
            return {"encoder": self.encoder.describe(), "token_shape": self.encoder.token_shape,
                    "device": str(self.encoder.device), "pid": os.getpid()}

        def encode(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            return self.encoder(tiles)

    return prepare_task, read_task, EncoderActor


def _error_text(error: BaseException) -> tuple[BaseException, str]:
    """Unwrap Ray's task error to our own exception, so the store records what really went wrong."""
    cause = getattr(error, "cause", None)
    original = cause if isinstance(cause, BaseException) else error
    return original, f"{type(original).__name__}: {original}"


def _actor_died(error: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)


@dataclass
class _ActiveSlide:
    prepared: PreparedSlide
    writer: SlideWriter
    chunks: deque  # (start, stop) not yet submitted
    pending: deque  # ObjectRefs of submitted chunks, in tile order
    started: float


class Extraction:
    """One run over a cohort. `run()` returns the summary; the caller decides the exit code."""

    def __init__(self, entries: list[SlideEntry], store_url: str, cfg: ExtractConfig,
                 storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> None:
        self.entries, self.store_url, self.cfg = entries, store_url, cfg
        self.storage_options = storage_options or {}
        self.log = log
        self.summary = ExtractionSummary()

    # ---- setup ---------------------------------------------------------------------------------

    def _start_encoders(self) -> None:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = self.cfg.num_encoders or max(1, gpus)
        prepare_task, read_task, encoder_cls = _ray_remotes(self.cfg, 1 if gpus else 0)
        self.prepare_task, self.read_task = prepare_task, read_task
        self.actors = [encoder_cls.remote(self.cfg) for _ in range(count)]
        info = ray.get(self.actors[0].describe.remote())
        self.encoder_spec, self.token_shape = info["encoder"], info["token_shape"]
        self.log(f"[extract] {count} encoder actor(s) on {info['device']} ({self.cfg.encoder}, "
                 f"{self.encoder_spec['compute_precision']}); store embeddings {self.encoder_spec['dim']}-d")

    def _open_store(self) -> EmbeddingStore:
        spec = {"encoder": self.encoder_spec, "tiling": self.cfg.tiling_spec(tissue_params(self.cfg).describe())}
        return EmbeddingStore.create_or_open(self.store_url, kind="slides", spec=spec, config=self.cfg.to_dict(),
                                             storage_options=self.storage_options)

    def _todo(self, store: EmbeddingStore) -> list[SlideEntry]:
        complete, failed = set(store.slide_ids()), store.failures()
        todo = []
        for entry in self.entries:
            if entry.slide_id in complete or (entry.slide_id in failed and not self.cfg.retry_failed):
                if entry.slide_id in complete:
                    self.summary.outcomes.append(SlideOutcome(entry.slide_id, "skipped", error="complete"))
                else:
                    record = failed[entry.slide_id]
                    self.summary.outcomes.append(SlideOutcome(
                        entry.slide_id, "failed-before",
                        error=f"{record.get('error_class')}: {record.get('message')} (retry with --retry-failed)"))
                continue
            todo.append(entry)
        if self.cfg.limit is not None:
            todo = todo[: self.cfg.limit]
        return todo

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> ExtractionSummary:
        import ray

        started = time.perf_counter()
        self._start_encoders()
        store = self._open_store()
        self.store = store
        todo = self._todo(store)
        self.log(f"[extract] {len(todo)} slides to extract; {self.summary.count('skipped')} already complete (nothing "
                 f"re-encoded), {self.summary.count('failed-before')} failed before (retry with --retry-failed)")
        self._total, self._done_tiles, self._t0, self._last_report = len(todo), 0, time.perf_counter(), 0.0
        self._planned_tiles = self._planned_slides = 0
        self._paused = False
        pipeline_started = time.perf_counter()

        max_prepare = max(2, int(ray.cluster_resources().get("CPU", 2)))
        max_active = 2 + len(self.actors)
        max_inflight = 4 * len(self.actors) + 2
        waiting = deque(todo)
        preparing: dict[Any, SlideEntry] = {}
        prepared: deque[PreparedSlide] = deque()
        active: list[_ActiveSlide] = []
        inflight = 0
        rr = 0
        while waiting or preparing or prepared or active:
            while waiting and len(preparing) + len(prepared) < max_prepare:
                entry = waiting.popleft()
                preparing[self.prepare_task.remote(entry)] = entry
            while prepared and len(active) < max_active:
                slide = self._activate(prepared.popleft())
                if slide is not None:
                    active.append(slide)
            for slide in active:  # submit chunks, oldest slide first (it commits soonest), bounded in flight
                while slide.chunks and inflight < max_inflight:
                    start, stop = slide.chunks.popleft()
                    p = slide.prepared
                    tiles = self.read_task.remote(p.reader, p.entry.path, p.plan, p.coords[start:stop])
                    slide.pending.append((start, stop, self.actors[rr % len(self.actors)].encode.remote(tiles)))
                    rr += 1
                    inflight += 1
            refs = list(preparing) + [s.pending[0][2] for s in active if s.pending]
            if not refs:
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for slide in list(active):  # keep our leases alive while chunks are encoded
                try:
                    slide.writer.heartbeat()
                except SlideBusy as e:
                    inflight -= len(slide.pending)
                    self._drop(slide, active, e)
            for ref in ready:
                if ref in preparing:
                    entry = preparing.pop(ref)
                    try:
                        prepared.append(ray.get(ref))
                        self._planned_tiles += prepared[-1].n_tiles
                    except Exception as e:  # noqa: BLE001 - any per-slide error is recorded, the cohort goes on
                        self._fail(entry, e, time.perf_counter())
                    self._planned_slides += 1
            for slide in list(active):  # append every finished head chunk, in order
                while slide.pending and _done(slide.pending[0][2]):
                    chunk = slide.pending.popleft()
                    ref = chunk[2]
                    inflight -= 1
                    try:
                        emb, grid = ray.get(ref)
                        start, stop = slide.writer.rows_written, slide.writer.rows_written + len(emb)
                        if (start, stop) != chunk[:2]:
                            raise RuntimeError(f"chunk {chunk[:2]} came back as rows {start}-{stop}: refusing to write it")
                        slide.writer.append(slide.prepared.coords[start:stop], slide.prepared.tissue[start:stop], emb, grid)
                    except Exception as e:  # noqa: BLE001
                        inflight -= len(slide.pending)
                        if _actor_died(e):
                            e = EncoderError(
                                f"the encoder process died {1 + MAX_CHUNK_RETRIES} times while encoding tiles "
                                f"{chunk[0]}-{chunk[1]} of this slide (killed, out of memory, or a crash inside the "
                                f"model: {e.__class__.__name__}); the slide is failed, the cohort goes on")
                        self._drop(slide, active, e)
                        break
                    self._done_tiles += len(emb)
                    if not self._paused:
                        self._paused = True
                        pause_after_first_append(self.log)
                if slide in active and not slide.pending and not slide.chunks:
                    active.remove(slide)
                    self._commit_or_fail(slide)
            self._report()
        self._report(force=True)
        self.summary.seconds = time.perf_counter() - started
        self.summary.pipeline_seconds = time.perf_counter() - pipeline_started
        return self.summary

    def _drop(self, slide: _ActiveSlide, active: list[_ActiveSlide], error: BaseException) -> None:
        """Stop a slide: abort its writer (which removes only its own rows) and record why."""
        slide.pending.clear()
        slide.writer.abort()
        active.remove(slide)
        if isinstance(error, SlideBusy):
            self._owned(slide.prepared.entry.slide_id, error, slide.started)
        else:
            self._fail(slide.prepared.entry, error, slide.started)

    def _owned(self, slide_id: str, error: BaseException, started: float) -> None:
        """Another live job owns the slide and will commit it: not a failure of this run."""
        self.summary.outcomes.append(SlideOutcome(slide_id, "owned", seconds=time.perf_counter() - started,
                                                  error=str(error)))
        self.log(f"[extract] skipped: {slide_id}: {error}")

    def _activate(self, prepared: PreparedSlide) -> _ActiveSlide | None:
        """Open the slide's writer; None when it needs no encoding (committed empty), is another job's, or failed."""
        started = time.perf_counter()
        if self.store.is_complete(prepared.entry.slide_id):  # another job finished it meanwhile: never overwrite
            self.summary.outcomes.append(SlideOutcome(prepared.entry.slide_id, "skipped", error="complete"))
            return None
        try:
            writer = self.store.write_slide(prepared.entry.slide_id, prepared.attrs, token_shape=self.token_shape)
        except SlideBusy as e:
            self._owned(prepared.entry.slide_id, e, started)
            return None
        except Exception as e:  # noqa: BLE001 - e.g. object storage unreachable for this slide
            self._fail(prepared.entry, e, started)
            return None
        try:
            writer.set_thumbnail(prepared.thumbnail, prepared.mask, prepared.downsample)
        except Exception as e:  # noqa: BLE001
            writer.abort()
            self._fail(prepared.entry, e, started)
            return None
        slide = _ActiveSlide(prepared, writer, deque(), deque(), started)
        step = self.cfg.read_chunk
        slide.chunks.extend((s, min(s + step, prepared.n_tiles)) for s in range(0, prepared.n_tiles, step))
        if not slide.chunks:
            self._commit_or_fail(slide)
            return None
        return slide

    def _commit_or_fail(self, slide: _ActiveSlide) -> None:
        try:
            self._commit(slide)
        except SlideBusy as e:  # taken over while we wrote: the other writer commits it
            slide.writer.abort()
            self._owned(slide.prepared.entry.slide_id, e, slide.started)
        except Exception as e:  # noqa: BLE001
            slide.writer.abort()
            self._fail(slide.prepared.entry, e, slide.started)

    def _commit(self, slide: _ActiveSlide) -> None:
        p = slide.prepared
        seconds = time.perf_counter() - slide.started
        timings = {**p.attrs.get("timings", {}), "encode_write_s": round(seconds, 3)}
        slide.writer.commit(extra_attrs={"timings": timings, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                            empty_reason=p.empty_reason if p.n_tiles == 0 else None)
        status = "done" if p.n_tiles else "empty"
        self.summary.outcomes.append(SlideOutcome(p.entry.slide_id, status, p.n_tiles, seconds + p.attrs["timings"]["prepare_s"],
                                                  p.reader, p.mpp.value, p.empty_reason or ""))
        self.log(f"[extract] {status}: {p.entry.slide_id} ({p.n_tiles} tiles, {p.reader}, {p.mpp.value:.3f} µm/px)"
                 + (f": {p.empty_reason}" if p.empty_reason else ""))

    def _fail(self, entry: SlideEntry, error: BaseException, started: float) -> None:
        original, text = _error_text(error)
        self.store.record_failure(entry.slide_id, original)
        self.summary.outcomes.append(SlideOutcome(entry.slide_id, "failed", seconds=time.perf_counter() - started, error=text))
        kind = "" if isinstance(original, SlidecacheError) else " (unexpected: please report)"
        self.log(f"[extract] FAILED: {entry.slide_id}: {text}{kind}")

    def _report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_report < PROGRESS_EVERY_S:
            return
        self._last_report = now
        finished = sum(o.status in ("done", "empty", "failed") for o in self.summary.outcomes)
        elapsed = now - self._t0
        rate = self._done_tiles / max(elapsed, 1e-9)
        # Tiles still to encode: known for planned slides, the planned mean for the rest.
        planned = self._planned_tiles
        mean_tiles = planned / self._planned_slides if self._planned_slides else float("nan")
        remaining = planned - self._done_tiles + mean_tiles * (self._total - self._planned_slides)
        eta = remaining / rate if rate > 0 and remaining == remaining else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        self.log(f"[extract] progress: {finished}/{self._total} slides ({self.summary.count('failed')} failed), "
                 f"{self._done_tiles} tiles, {rate:.1f} tiles/s, ETA {eta_text}")


def _done(ref: Any) -> bool:
    import ray

    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)
