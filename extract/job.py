"""The extraction job: CPU tasks plan slides and read tiles, GPU (or CPU) encoders encode them and write
each slide pinned to them; the driver only schedules, records outcomes and prints progress.

    prepare(slide) ──► read(chunk) ──► EncoderWorker: encode + append ──► store
        (CPU)            (CPU)          (1 per GPU; the slide's writer)

The stages run on an executor (extract/executors.py): Ray tasks and actors, or, on one machine without
Ray, a process pool and encoder threads. Tile pixels go from the readers to the encoders (with Ray,
through its object store) and embeddings from the encoders to the store (extract/writers.py): neither
passes through the driver, which sends each encoder, in order, open → chunk × n → commit for every slide
pinned to it and gets back row counts. In-flight chunks
and open slides are bounded, so memory stays flat however large a slide is. Reading starts before the
encoders have loaded their models (the store opens when they have: its fingerprint needs them). A rerun
with nothing left to encode starts no encoder: it checks the fingerprint from the config alone.

An encoder actor restarts when it dies (killed, out of memory, its node lost). Every slide it held is
written again from its first tile (its writer's buffered rows died with it), taking over its own lease
at once: the driver names each writer's lease token, so it knows them. The call the actor was running
is charged the death (an actor runs its calls in the order sent): a chunk that kills its actor
1 + MAX_CHUNK_RETRIES times fails its slide instead of retrying forever.
One bad slide is recorded as a failure and never stops the cohort. A slide another live job is writing
is skipped here and reported as "owned", not as a failure.

Several stores, one read (`Extraction.for_stores`): each store has its own encoder actors and writers (its
own fingerprint), and a slide is planned and read once for all the stores that lack it: each chunk's tiles
go, as one object, to every store's encoder. A store whose writer must start again reads its own chunks.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from extract.config import ExtractConfig, check_one_read
from extract.executors import Executor, RayExecutor
from extract.slide_prep import PreparedSlide, tissue_params
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import ConfigError, EncoderError, SlideBusy, SlidecacheError, StoreNotFound, WriterRestarted
from slidecache.labels import distinct_labels
from store.embedding_store import EmbeddingStore

PROGRESS_EVERY_S = 10.0
MAX_CHUNK_RETRIES = 2  # a chunk runs at most 3 times on encoder actors that die under it
MAX_SLIDE_RESTARTS = 5  # a slide written again this often (its writer's actor died each time) fails
PROBE_EVERY_S = 0.5  # how often a restarting encoder actor is pinged
ABORT_WAIT_S = 60.0  # how long the end of a run waits for writers to remove abandoned slides' rows


@dataclass
class SlideOutcome:
    slide_id: str
    status: str  # done | empty | skipped | owned (another live job writes it) | failed | failed-before
    tiles: int = 0
    seconds: float = 0.0
    reader: str = ""
    mpp: float | None = None
    error: str = ""
    node: str = ""  # the Ray node whose encoder wrote it
    store: str = ""  # which store, when the run fills several ("" for one)


@dataclass
class ExtractionSummary:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    seconds: float = 0.0  # the whole run
    pipeline_seconds: float = 0.0  # from the encoders being ready to the last commit (no model loading)
    chunk_reads: dict[str, int] = field(default_factory=dict)  # slide → reader tasks run for it (all stores)

    def for_store(self, label: str) -> ExtractionSummary:
        """The outcomes of one store of a several-store run."""
        return dataclasses.replace(self, outcomes=[o for o in self.outcomes if o.store == label])

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
        several = any(o.store for o in self.outcomes)
        # columns as wide as their longest entry: a TCGA slide id (60 characters) is never cut
        wide = max([len("slide"), *(len(o.slide_id) for o in self.outcomes)])
        store_wide = max([len("store"), *(len(o.store or "") for o in self.outcomes)])
        store = f"{'store':<{store_wide}} " if several else ""
        rows = [f"{'slide':<{wide}} {store}{'status':<8} {'tiles':>7} {'reader':<10} {'mpp':>7} {'s':>7}  error"]
        for o in self.outcomes:
            mpp = f"{o.mpp:.3f}" if o.mpp else "-"
            store = f"{o.store or '':<{store_wide}} " if several else ""
            rows.append(f"{o.slide_id:<{wide}} {store}{o.status:<8} {o.tiles:>7} {o.reader:<10} {mpp:>7} "
                        f"{o.seconds:>7.1f}  {o.error[:120]}")
        if several:
            reads = sum(self.chunk_reads.values())
            rows.append(f"{len(self.chunk_reads)} slides read once for every store that lacked them: {reads} reader "
                        "tasks")
        rows.append(f"{self.count('done')} done, {self.count('empty')} without tiles, {self.count('skipped')} already "
                    f"complete, {self.count('owned')} being written by another job, {self.count('failed')} failed, "
                    f"{self.count('failed-before')} failed before and not retried; "
                    f"{self.tiles} tiles in "
                    f"{self.seconds:.1f} s ({self.tiles / max(self.seconds, 1e-9):.1f} tiles/s; "
                    f"{self.tiles / max(self.pipeline_seconds, 1e-9):.1f} tiles/s once the encoders were loaded)")
        return "\n".join(rows)


def _error_text(error: BaseException) -> tuple[BaseException, str]:
    """Unwrap Ray's task error to our own exception, so the store records what really went wrong."""
    cause = getattr(error, "cause", None)
    original = cause if isinstance(cause, BaseException) else error
    return original, f"{type(original).__name__}: {original}"


@dataclass(eq=False)  # identity: one store of a run
class _Target:
    """A store the run fills: its config, its encoder actors and, once they are ready, the store itself."""

    url: str
    cfg: ExtractConfig
    label: str  # "" when the run fills one store
    actors: list[int] = field(default_factory=list)  # indices into Extraction.actors
    described: list[Any] = field(default_factory=list)  # refs of the actors' describe calls
    existing: EmbeddingStore | None = None  # the store as it was before the run, if it existed
    store: EmbeddingStore | None = None  # open for writing (once the encoders are ready)
    encoder_spec: dict[str, Any] = field(default_factory=dict)
    token_shape: Any = None


@dataclass(eq=False)  # identity: a slide in flight is one object
class _ActiveSlide:
    """A slide in flight for one store, pinned to one encoder actor of that store, which writes it. The
    stores that lack a slide share its chunk queue (`group`): each chunk is read once and sent to all."""

    prepared: PreparedSlide
    target: _Target
    actor: int  # index into Extraction.actors
    started: float
    token: str = ""  # the lease token of this attempt's writer ("" until opened)
    own_tokens: list[str] = field(default_factory=list)  # earlier attempts' tokens: ours to take over
    restarts: int = 0
    chunks: deque = field(default_factory=deque)  # (start, stop) not yet read
    reads: deque = field(default_factory=deque)  # (start, stop, tiles ref) read before the slide was opened
    pending: deque = field(default_factory=deque)  # (start, stop, rows ref) sent to the actor, in tile order
    opened: Any = None  # ref of open_slide, until its answer is read
    committing: Any = None  # ref of commit_slide
    deaths: dict[str, int] = field(default_factory=dict)  # call label → times its actor died running it
    group: list[_ActiveSlide] = field(default_factory=list)  # the slides sharing `chunks` (itself included)

    def calls(self) -> list[tuple[Any, str]]:
        """The slide's outstanding actor calls with their labels, in the order they were sent."""
        out = [(self.opened, "its opening")] if self.opened is not None else []
        out += [(ref, f"tiles {start}-{stop}") for start, stop, ref in self.pending]
        return out + ([(self.committing, "its commit")] if self.committing is not None else [])

    @property
    def slide_id(self) -> str:
        return self.prepared.entry.slide_id

    def reset_chunks(self, read_chunk: int) -> None:
        """Read the slide from its first tile, alone (a store that starts again does not hold up the others)."""
        n = self.prepared.n_tiles
        self.chunks = deque((s, min(s + read_chunk, n)) for s in range(0, n, read_chunk))
        self.leave_group()

    def leave_group(self) -> None:
        if self in self.group:
            self.group.remove(self)
        self.group = [self]


class Extraction:
    """One run over a cohort. `run()` returns the summary; the caller decides the exit code."""

    def __init__(self, entries: list[SlideEntry], store_url: str, cfg: ExtractConfig,
                 storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                 executor: Executor | None = None) -> None:
        self._init(entries, [(store_url, cfg, "")], storage_options, log, executor)

    @classmethod
    def for_stores(cls, entries: list[SlideEntry], stores: list[tuple[str, ExtractConfig]],
                   storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                   executor: Executor | None = None) -> Extraction:
        """One run that fills several stores (one encoder each) from one read of each slide. Their configs
        must agree on everything but the encoder (extract.config.check_one_read). Stores are labelled by
        their encoder's name (#2, #3 ... for repeats)."""
        if len(stores) == 1:
            return cls(entries, stores[0][0], stores[0][1], storage_options, log, executor)
        labels = distinct_labels([cfg.encoder for _, cfg in stores])
        urls = [url for url, _ in stores]
        if len(set(urls)) < len(urls):
            raise ConfigError(f"the stores of one run must differ; given {urls}")
        check_one_read(dict(zip(labels, (cfg for _, cfg in stores))))
        extraction = cls.__new__(cls)
        extraction._init(entries, [(url, cfg, label) for (url, cfg), label in zip(stores, labels)],
                         storage_options, log, executor)
        return extraction

    def _init(self, entries: list[SlideEntry], stores: list[tuple[str, ExtractConfig, str]],
              storage_options: dict[str, Any] | None, log: Callable[[str], None], executor: Executor | None) -> None:
        for url, _, _ in stores:
            if url.startswith("memory://"):
                raise ConfigError(f"{url}: a memory:// store lives in one process, and extraction writes from its "
                                  "encoder processes; use a folder or an s3:// URL")
        self.entries = entries
        self.ex: Executor = executor or RayExecutor(stores[0][1])  # None: Ray, initialised by the caller
        # The stores record what ran, not "auto".
        self.targets = [_Target(url, dataclasses.replace(cfg, executor=self.ex.name), label) for url, cfg, label in stores]
        self.cfg = self.targets[0].cfg  # the reading (tiling, tissue, readers, read chunk) is the same for all
        self.store_url = self.targets[0].url
        self.storage_options = storage_options or {}
        self.log = log
        self.summary = ExtractionSummary()
        self.actors: list[Any] = []

    @property
    def store(self) -> EmbeddingStore | None:
        """The (first) store, open for writing once its encoders are ready."""
        return self.targets[0].store

    def _named(self, target: _Target, text: str) -> str:
        return f"{target.label}: {text}" if target.label else text

    # ---- setup ---------------------------------------------------------------------------------

    def _start_encoders(self, targets: list[_Target]) -> None:
        """Start the encoders without waiting for their models: reading starts meanwhile (see run). Stores
        sharing a machine share its GPUs (each encoder a 1/N share) and its cores (by turns on one process,
        else CPU threads split N ways)."""
        res = self.ex.resources()
        device = "cuda" if res.gpus else "cpu"
        self.cfg = self.cfg.for_device(device)
        share = len(targets)
        cores_per_node = max(1, res.cpus // max(1, len(res.nodes)))
        for target in targets:
            cfg = target.cfg.for_device(device)
            if share > 1 and device == "cpu" and cfg.encoder_threads is None and not self.ex.encoders_take_turns:
                cfg = dataclasses.replace(cfg, encoder_threads=max(1, cores_per_node // share))
            target.cfg = cfg
            count = cfg.num_encoders or res.gpus or max(1, len(res.nodes))  # one per GPU, else one per node
            started = self.ex.start_encoders(cfg, target.url, self.storage_options, count, res.gpus, res.nodes,
                                             share=share)
            target.actors = list(range(len(self.actors), len(self.actors) + len(started)))
            self.actors += started
            target.described = [self.ex.call(actor, "describe") for actor in started]  # spec, and where to read
        self.actor_target = [t for t in targets for _ in t.actors]
        self.actor_nodes: list[str] = [""] * len(self.actors)
        self._max_prepare = max(2, res.cpus)

    def _await_encoders(self, target: _Target) -> None:
        described = [self.ex.get(ref) for ref in target.described]
        info = described[0]
        target.encoder_spec, target.token_shape = info["encoder"], info["token_shape"]
        for actor, d in zip(target.actors, described):
            self.actor_nodes[actor] = d["node"]
        threads = f", {info['threads']} threads" if info["device"] == "cpu" else ""
        cfg = target.cfg
        self.log(f"[extract] {self._named(target, '')}{len(target.actors)} encoder actor(s) on {info['device']} "
                 f"({cfg.encoder}, {target.encoder_spec['compute_precision']}, batch {cfg.batch_size}, read chunk "
                 f"{self.cfg.read_chunk}{threads}); store embeddings {target.encoder_spec['dim']}-d")

    def _open_store_for_writing(self, target: _Target) -> None:
        """Once the store's encoders are ready: create or open it, record the failures seen before."""
        self._await_encoders(target)
        target.store = EmbeddingStore.create_or_open(
            target.url, kind="slides", spec=self._store_spec(target.cfg, target.encoder_spec),
            config=target.cfg.to_dict(), storage_options=self.storage_options)
        deferred = [item for item in self._deferred_failures if item[1] is target]
        for entry, _, error, started in deferred:
            self._fail(entry, [target], error, started)
            self._deferred_failures.remove((entry, target, error, started))

    def _existing_store(self, target: _Target) -> EmbeddingStore | None:
        try:
            return EmbeddingStore.open(target.url, storage_options=self.storage_options)
        except StoreNotFound:
            return None

    def _store_spec(self, cfg: ExtractConfig, encoder_spec: dict[str, Any]) -> dict[str, Any]:
        return {"encoder": encoder_spec, "tiling": cfg.tiling_spec(tissue_params(cfg).describe())}

    def _todo(self) -> list[tuple[SlideEntry, list[_Target]]]:
        """Each slide some store lacks, with the stores that lack it (complete elsewhere: skipped there)."""
        books = []
        for target in self.targets:
            store = target.existing
            books.append((target, *((set(store.slide_ids()), store.failures()) if store is not None else (set(), {}))))
        todo = []
        for entry in self.entries:
            lacking = []
            for target, complete, failed in books:
                if entry.slide_id in complete:
                    self.summary.outcomes.append(SlideOutcome(entry.slide_id, "skipped", error="complete",
                                                              store=target.label))
                elif entry.slide_id in failed and not target.cfg.retry_failed:
                    record = failed[entry.slide_id]
                    self.summary.outcomes.append(SlideOutcome(
                        entry.slide_id, "failed-before", store=target.label,
                        error=f"{record.get('error_class')}: {record.get('message')} (retry with --retry-failed)"))
                else:
                    lacking.append(target)
            if lacking:
                todo.append((entry, lacking))
        if self.cfg.limit is not None:
            todo = todo[: self.cfg.limit]
        return todo

    # ---- the loop ------------------------------------------------------------------------------

    def _nothing_to_encode(self, target: _Target) -> None:
        """A store with every slide complete or failed before: no encoder starts for it (10-30 s of process
        start and model build saved on a rerun), but its fingerprint is still checked, from the config, so a
        complete store of another encoder or tiling is refused as a run that had work would be."""
        from extract.inference import expected_encoder

        assert target.existing is not None
        device = "cuda" if self.ex.gpus() else "cpu"
        target.existing.check_fingerprint(self._store_spec(target.cfg, expected_encoder(target.cfg, device)[0]))

    def _log_todo(self, todo: list[tuple[SlideEntry, list[_Target]]], note: str = "") -> None:
        per_store = ""
        if len(self.targets) > 1:
            per_store = " (" + ", ".join(f"{t.label} {sum(t in lacking for _, lacking in todo)}"
                                         for t in self.targets) + ")"
        self.log(f"[extract] {len(todo)} slides to extract{per_store}; {self.summary.count('skipped')} already complete "
                 f"(nothing re-encoded), {self.summary.count('failed-before')} failed before (retry with "
                 f"--retry-failed){note}")

    def run(self) -> ExtractionSummary:
        started = time.perf_counter()
        for target in self.targets:
            target.existing = self._existing_store(target)
        todo = self._todo()
        working = [t for t in self.targets if any(t in lacking for _, lacking in todo)]
        for target in self.targets:
            if target not in working and target.existing is not None:
                self._nothing_to_encode(target)
        if not working:
            self._log_todo(todo, "; no encoder started")
            self.summary.seconds = time.perf_counter() - started
            return self.summary
        waiting = deque(todo)
        preparing: dict[Any, tuple[SlideEntry, list[_Target]]] = {}
        prepared: deque[tuple[PreparedSlide, list[_Target]]] = deque()
        # The first two slides are masked while the encoders start: counting the GPUs imports torch (1.4 s
        # here), and the reader processes start meanwhile (prepare needs no device setting).
        self._max_prepare = 2
        self._submit_prepares(waiting, preparing, prepared)
        self._start_encoders(working)
        self._log_todo(todo)
        max_active = 2 * len(working) + len(self.actors)
        self._max_inflight = 4 * len(self.actors) + 2 * len(working)
        self.active: list[_ActiveSlide] = []
        self._deferred_failures: list[tuple[SlideEntry, _Target, BaseException, float]] = []
        self._inflight = 0
        self._ready: set[Any] = set()  # what the loop's last wait found ready
        self._sequence, self._order = 0, {}
        self._suspect: dict[int, Any] = {}  # actor index → its probe, while it restarts: nothing new is sent to it
        self._aborts: list[Any] = []  # writers told to remove an abandoned slide's rows
        # Progress counts a slide once per store that lacks it (each is encoded and written once per store).
        self._total = sum(len(lacking) for _, lacking in todo)
        self._done_tiles, self._t0, self._last_report = 0, time.perf_counter(), 0.0
        self._planned_tiles = self._planned_slides = 0
        pipeline_started = time.perf_counter()
        unopened = list(working)
        while waiting or preparing or prepared or self.active or unopened:
            self._submit_prepares(waiting, preparing, prepared)
            for target in [t for t in unopened if self.ex.done(t.described[0])]:
                self._open_store_for_writing(target)
                unopened.remove(target)
                if not unopened:
                    pipeline_started = time.perf_counter()
            while prepared and len(self.active) < max_active:
                self.active += self._schedule(*prepared.popleft())
            self._probe_suspects()
            for slide in list(self.active):
                if slide.target.store is not None and not slide.token and self._pin_to_a_live_actor(slide):
                    self._open(slide)
            for slide in self.active:  # oldest slide first (it commits soonest), bounded in flight
                self._submit_chunks(slide)
            refs = list(preparing) + [t.described[0] for t in unopened]
            refs += [probe[0] for probe in self._suspect.values() if probe is not None]
            for slide in self.active:
                refs += [r for r in (slide.opened, slide.committing) if r is not None]
                refs += [ref for _, _, ref in slide.pending]
            if not refs:
                continue
            ready = self.ex.wait(refs, timeout=1.0)  # every one that is ready, at least one unless timed out
            self._ready = set(ready)
            for ref in ready:
                if ref in preparing:
                    entry, lacking = preparing.pop(ref)
                    try:
                        prepared.append((self.ex.get(ref), lacking))
                        self._planned_tiles += prepared[-1][0].n_tiles * len(lacking)
                    except Exception as e:  # noqa: BLE001 - any per-slide error is recorded, the cohort goes on
                        self._fail(entry, lacking, e, time.perf_counter())
                    self._planned_slides += len(lacking)
            for slide in list(self.active):
                self._collect(slide)
            self._report()
        self._await_aborts()
        self._report(force=True)
        self.summary.seconds = time.perf_counter() - started
        self.summary.pipeline_seconds = time.perf_counter() - pipeline_started
        return self.summary

    def _submit_prepares(self, waiting: deque[tuple[SlideEntry, list[_Target]]],
                         preparing: dict[Any, tuple[SlideEntry, list[_Target]]],
                         prepared: deque[tuple[PreparedSlide, list[_Target]]]) -> None:
        """Mask and plan the next slides, at most _max_prepare prepared or preparing at once."""
        while waiting and len(preparing) + len(prepared) < self._max_prepare:
            entry, lacking = waiting.popleft()
            preparing[self.ex.prepare(entry, self.cfg)] = (entry, lacking)

    # ---- one slide -----------------------------------------------------------------------------

    def _schedule(self, prepared: PreparedSlide, lacking: list[_Target]) -> list[_ActiveSlide]:
        """Pin a prepared slide, for each store that lacks it, to that store's actor with the fewest slides;
        they share one chunk queue (one read each), and the chunks may be read at once."""
        now = time.perf_counter()
        slides = [_ActiveSlide(prepared, target, self._least_loaded(target.actors), now) for target in lacking]
        slides[0].reset_chunks(self.cfg.read_chunk)
        for slide in slides:
            slide.chunks, slide.group = slides[0].chunks, slides
        return slides

    def _open(self, slide: _ActiveSlide) -> None:
        """Send the slide's writer to its actor (chunks and commit follow it there, in order)."""
        p, actor = slide.prepared, self.actors[slide.actor]
        slide.token = uuid.uuid4().hex
        slide.opened = self._sent(self.ex.call(actor, "open_slide", slide.slide_id, p.attrs, p.writer_pictures(),
                                               p.downsample, slide.token, slide.own_tokens))
        while slide.reads:  # what was read while the encoders loaded
            start, stop, tiles = slide.reads.popleft()
            self._send_chunk(slide, start, stop, tiles)
        if p.n_tiles == 0:
            self._send_commit(slide)

    def _submit_chunks(self, slide: _ActiveSlide) -> None:
        """Read the slide's next chunks (bounded in flight), each once for every store sharing its queue."""
        p = slide.prepared
        while slide.chunks and self._inflight < self._max_inflight:
            start, stop = slide.chunks.popleft()
            tiles = self.ex.read(p, start, stop, self._read_near(slide))
            self.summary.chunk_reads[slide.slide_id] = self.summary.chunk_reads.get(slide.slide_id, 0) + 1
            for member in slide.group:
                self._inflight += 1
                if member.token:
                    self._send_chunk(member, start, stop, tiles)
                else:
                    member.reads.append((start, stop, tiles))

    def _read_near(self, slide: _ActiveSlide) -> str | None:
        """The node of the slide's encoder, when known and there are several (its tiles then stay there)."""
        if slide.target.store is None or len(set(self.actor_nodes)) < 2:
            return None
        return self.actor_nodes[slide.actor]

    def _send_chunk(self, slide: _ActiveSlide, start: int, stop: int, tiles: Any) -> None:
        p = slide.prepared
        rows = self._sent(self.ex.call(self.actors[slide.actor], "encode_append", slide.slide_id, start, tiles,
                                       p.coords[start:stop], p.tissue[start:stop]))
        slide.pending.append((start, stop, rows))
        if not slide.chunks and stop == p.n_tiles:
            self._send_commit(slide)

    def _send_commit(self, slide: _ActiveSlide) -> None:
        p = slide.prepared
        timings = {**p.attrs.get("timings", {}), "encode_write_s": round(time.perf_counter() - slide.started, 3)}
        extra = {"timings": timings, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        slide.committing = self._sent(self.ex.call(self.actors[slide.actor], "commit_slide", slide.slide_id, extra,
                                                   p.empty_reason if p.n_tiles == 0 else None))

    def _sent(self, ref: Any) -> Any:
        """Number an actor call: an actor runs its calls in the order sent, so when it dies, the earliest
        call that failed with it is the one it was running."""
        self._sequence += 1
        self._order[ref] = self._sequence
        return ref

    def _collect(self, slide: _ActiveSlide) -> None:
        """Read what the slide's actor answered so far: its open, its chunks in order, its commit (those the
        loop's last wait found ready: one wait for all, not one per call)."""
        ex = self.ex
        try:
            if slide.opened is not None:
                if slide.opened not in self._ready:
                    return
                status = ex.get(slide.opened)
                self._order.pop(slide.opened, None)
                slide.opened = None
                if status == "complete":
                    self._finish(slide)
                    self.summary.outcomes.append(SlideOutcome(slide.slide_id, "skipped", error="complete",
                                                              store=slide.target.label))
                    return
            while slide.pending and slide.pending[0][2] in self._ready:
                start, stop, ref = slide.pending[0]
                rows = ex.get(ref)  # raises what the actor raised; the chunk stays named at the head
                if rows != stop - start:
                    raise RuntimeError(f"chunk {start}-{stop} came back as {rows} rows: refusing to commit the slide")
                slide.pending.popleft()
                self._order.pop(ref, None)
                self._inflight -= 1
                self._done_tiles += rows
            if slide.committing is not None and not slide.pending and slide.committing in self._ready:
                result = ex.get(slide.committing)
                self._finish(slide)
                self._committed(slide, result)
        except Exception as e:  # noqa: BLE001 - per-slide: recorded, the cohort goes on
            if ex.actor_died(e):
                self._on_actor_death(slide.actor, e)
            else:
                self._slide_error(slide, e)

    def _on_actor_death(self, actor: int, error: BaseException) -> None:
        """An encoder actor died (killed, out of memory, its node lost) and Ray restarts it. Its calls run in
        the order sent, so the earliest that had not succeeded is the one it was running: that call is charged
        the death, and its slide fails once the same call has killed its actor 1 + MAX_CHUNK_RETRIES times.
        Every other slide the actor held is written again from its first tile (its writer's buffered rows
        are gone), on a live actor. Nothing is sent to the actor until a probe finds it back."""
        held = [slide for slide in self.active if slide.actor == actor and (slide.token or slide.calls())]
        outstanding = sorted((self._order.get(ref, 0), i, slide, label) for i, slide in enumerate(held)
                             for ref, label in slide.calls() if not (self.ex.done(ref) and self.ex.succeeded(ref)))
        self._suspect[actor] = None
        if outstanding:
            _, _, culprit, label = outstanding[0]
            culprit.deaths[label] = culprit.deaths.get(label, 0) + 1
            if culprit.deaths[label] > MAX_CHUNK_RETRIES:
                held.remove(culprit)
                self._slide_error(culprit, EncoderError(
                    f"the encoder process died {culprit.deaths[label]} times while encoding {label} of this slide "
                    f"(killed, out of memory, or a crash inside the model: {type(error).__name__}); the slide is "
                    "failed, the cohort goes on"), writer_died=True)
        for slide in held:
            self._restart(slide, f"its encoder process died ({type(error).__name__})")

    def _probe_suspects(self) -> None:
        """Ping each restarting actor (at most every PROBE_EVERY_S); one that answers is live again."""
        ex = self.ex
        for actor, probe in list(self._suspect.items()):
            if probe is not None and ex.done(probe[0]) and ex.succeeded(probe[0]):
                self.actor_nodes[actor] = ex.get(probe[0])["node"]  # it may have restarted on another node
                del self._suspect[actor]
            elif probe is None or (ex.done(probe[0]) and time.perf_counter() > probe[1]):
                self._suspect[actor] = (ex.call(self.actors[actor], "describe"), time.perf_counter() + PROBE_EVERY_S)

    def _pin_to_a_live_actor(self, slide: _ActiveSlide) -> bool:
        """Move a slide not yet opened off a restarting actor, to the live one with the fewest slides.
        False when every actor is restarting (the slide waits)."""
        if slide.actor not in self._suspect:
            return True
        live = [i for i in slide.target.actors if i not in self._suspect]
        if not live:
            return False
        slide.actor = self._least_loaded(live)
        return True

    def _least_loaded(self, actors: Iterable[int]) -> int:
        """Of these actor indices, the one with the fewest slides in flight (the first of equals)."""
        return min(actors, key=lambda i: sum(s.actor == i for s in self.active))

    def _slide_error(self, slide: _ActiveSlide, error: BaseException, writer_died: bool = False) -> None:
        original, _ = _error_text(error)
        if isinstance(original, WriterRestarted):
            if slide.restarts < MAX_SLIDE_RESTARTS:
                self._restart(slide, original)
                return
            writer_died = True
        self._finish(slide, abort=not writer_died)
        if writer_died:  # its writer cannot clean up: remove what it left, by our own lease tokens
            slide.target.store.abandon_slide(slide.slide_id, [slide.token, *slide.own_tokens])
        if isinstance(original, SlideBusy):
            self._owned(slide, original)
        else:
            self._fail(slide.prepared.entry, [slide.target], original, slide.started)

    def _restart(self, slide: _ActiveSlide, why: BaseException | str) -> None:
        """Write the slide again from its first tile: its writer died with its actor."""
        self._release(slide)
        slide.own_tokens.append(slide.token)
        slide.token, slide.opened, slide.committing = "", None, None
        slide.restarts += 1
        slide.reset_chunks(self.cfg.read_chunk)
        self.log(f"[extract] {self._named(slide.target, slide.slide_id)}: writing it again from its first tile ({why})")

    def _finish(self, slide: _ActiveSlide, abort: bool = False) -> None:
        """The slide leaves the run; with abort its writer removes what it wrote (its rows only)."""
        self._release(slide)
        if abort and slide.token:
            self._aborts.append(self.ex.call(self.actors[slide.actor], "abort_slide", slide.slide_id))
        slide.leave_group()  # the other stores' reads go on without it
        self.active.remove(slide)

    def _await_aborts(self) -> None:
        """Wait until the writers of abandoned slides have removed their rows, so that nothing half written
        outlives the run (a slide failing last ended the loop while its abort was still queued). An actor that
        died meanwhile removes nothing: its lease lapses and the next extraction replaces what it left."""
        pending, deadline = list(self._aborts), time.perf_counter() + ABORT_WAIT_S
        while pending and time.perf_counter() < deadline:
            ready = set(self.ex.wait(pending, timeout=1.0))
            pending = [ref for ref in pending if ref not in ready]
        if pending:
            self.log(f"[extract] {len(pending)} abandoned slides' writers did not answer within {ABORT_WAIT_S:.0f} s; "
                     "their rows stay invisible and are replaced by the next extraction")

    def _release(self, slide: _ActiveSlide) -> None:
        """Drop the slide's outstanding reads and calls from the books (their answers are not needed)."""
        for ref, _ in slide.calls():
            self._order.pop(ref, None)
        self._inflight -= len(slide.pending) + len(slide.reads)
        slide.pending.clear()
        slide.reads.clear()

    def _committed(self, slide: _ActiveSlide, result: dict[str, Any]) -> None:
        p = slide.prepared
        status = "done" if p.n_tiles else "empty"
        self.summary.outcomes.append(SlideOutcome(p.entry.slide_id, status, result["rows"],
                                                  time.perf_counter() - slide.started + p.attrs["timings"]["prepare_s"],
                                                  p.reader, p.mpp.value, p.empty_reason or "", node=result["node"],
                                                  store=slide.target.label))
        self.log(f"[extract] {self._named(slide.target, status)}: {p.entry.slide_id} ({p.n_tiles} tiles, {p.reader}, "
                 f"{p.mpp.value:.3f} µm/px)" + (f": {p.empty_reason}" if p.empty_reason else ""))

    def _owned(self, slide: _ActiveSlide, error: BaseException) -> None:
        """Another live job owns the slide and will commit it: not a failure of this run."""
        self.summary.outcomes.append(SlideOutcome(slide.slide_id, "owned", seconds=time.perf_counter() - slide.started,
                                                  error=str(error), store=slide.target.label))
        self.log(f"[extract] {self._named(slide.target, 'skipped')}: {slide.slide_id}: {error}")

    def _fail(self, entry: SlideEntry, targets: list[_Target], error: BaseException, started: float) -> None:
        """Record the slide as failed in these stores (a store not open yet records it when it opens)."""
        original, text = _error_text(error)
        kind = "" if isinstance(original, SlidecacheError) else " (unexpected: please report)"
        for target in targets:
            if target.store is None:  # the store opens once its encoders are ready; recorded then
                self._deferred_failures.append((entry, target, error, started))
                continue
            target.store.record_failure(entry.slide_id, original)
            self.summary.outcomes.append(SlideOutcome(entry.slide_id, "failed", seconds=time.perf_counter() - started,
                                                      error=text, store=target.label))
            self.log(f"[extract] {self._named(target, 'FAILED')}: {entry.slide_id}: {text}{kind}")

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
        unit = "slides" if len(self.targets) == 1 else "slide-stores"
        self.log(f"[extract] progress: {finished}/{self._total} {unit} ({self.summary.count('failed')} failed), "
                 f"{self._done_tiles} tiles, {rate:.1f} tiles/s, ETA {eta_text}")

