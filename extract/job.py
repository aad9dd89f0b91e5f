"""The extraction job: CPU tasks plan slides and read tiles, GPU (or CPU) encoders encode them and write
each slide pinned to them; the driver here only does what the scheduling core decides (extract/scheduling.py),
records outcomes and prints progress.

    prepare(slide) ──► read(chunk) ──► EncoderWorker: encode + append ──► store
        (CPU)            (CPU)          (1 per GPU; the slide's writer)

The stages run on an executor (extract/executors.py): Ray tasks and actors, or, on one machine without
Ray, a process pool and encoder threads. Tile pixels go from the readers to the encoders (with Ray,
through its object store) and embeddings from the encoders to the store (extract/writers.py): neither
passes through the driver, which sends each encoder, in order, open → chunk × n → commit for every slide
pinned to it and gets back row counts. Reading starts before the encoders have loaded their models (the
store opens when they have: its fingerprint needs them). A rerun with nothing left to encode starts no
encoder: it checks the fingerprint from the config alone.

An encoder actor restarts when it dies (killed, out of memory, its node lost); the scheduler says which
slide's call is charged the death and which slides are written again from their first tile, each taking
over its own lease at once (the driver names each writer's lease token, so it knows them). One bad slide is
recorded as a failure and never stops the cohort. A slide another live job is writing is skipped here and
reported as "owned", not as a failure.

Several stores, one read (`Extraction(entries, [(url, cfg), ...])`): each store has its own encoder actors
and writers (its own fingerprint), and a slide is planned and read once for all the stores that lack it:
each chunk's tiles go, as one object, to every store's encoder. A store whose writer must start again reads
its own chunks.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from extract.config import ExtractConfig
from extract.ray_executor import RayExecutor
from extract.scheduling import (
    MAX_CHUNK_RETRIES,
    ActiveSlide,
    Call,
    CallKind,
    Decision,
    Ended,
    Read,
    Restarted,
    Scheduler,
    unwrapped,
)
from extract.slide_prep import PreparedSlide
from extract.stages import Executor
from extract.summary import FINISHED, ExtractionSummary, SlideOutcome, SlideStatus
from extract.targets import Target, existing_store, slides_to_extract, store_spec, targets_for
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import SlidecacheError
from store.embedding_store import EmbeddingStore

__all__ = ["Extraction", "ExtractionSummary", "MAX_CHUNK_RETRIES", "SlideOutcome", "SlideStatus"]

PROGRESS_EVERY_S = 10.0
PROBE_EVERY_S = 0.5  # how often a restarting encoder actor is pinged
ABORT_WAIT_S = 60.0  # how long the end of a run waits for writers to remove abandoned slides' rows


def _error_text(error: BaseException) -> tuple[BaseException, str]:
    """Ray's task error unwrapped to our own exception, so the store records what really went wrong."""
    original = unwrapped(error)
    return original, f"{type(original).__name__}: {original}"


class Extraction:
    """One run over a cohort into one or several stores ([(url, config), ...]). `run()` returns the summary;
    the caller decides the exit code."""

    def __init__(self, entries: list[SlideEntry], stores: list[tuple[str, ExtractConfig]],
                 storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                 executor: Executor | None = None) -> None:
        self.targets = targets_for(stores)
        self.entries = entries
        self.ex: Executor = executor or RayExecutor(stores[0][1])  # None: Ray, initialised by the caller
        for target in self.targets:  # the stores record what ran, not "auto"
            target.cfg = dataclasses.replace(target.cfg, executor=self.ex.name)
        self.cfg = self.targets[0].cfg  # the reading (tiling, tissue, readers, read chunk) is the same for all
        self.storage_options = storage_options or {}
        self.log = log
        self.summary = ExtractionSummary()
        self.scheduler = Scheduler()
        self.actors: list[Any] = []  # the encoder actors of every store (a slide names one by index)
        self.actor_nodes: list[str] = []  # where each runs, once it has answered
        self._preparing: dict[Any, tuple[SlideEntry, list[Target]]] = {}  # prepare ref → its slide
        self._unopened: list[Target] = []  # stores whose encoders are still loading
        self._ready: set[Any] = set()  # what the loop's last wait found ready
        self._probes: dict[int, tuple[Any, float]] = {}  # restarting actor → its ping, and when to ping again
        self._aborts: list[Any] = []  # writers told to remove an abandoned slide's rows
        self._deferred_failures: list[tuple[SlideEntry, Target, BaseException, float]] = []  # store not open yet
        # progress: a slide counts once per store that lacks it (each is encoded and written once per store)
        self._total = self._done_tiles = self._planned_tiles = self._planned_slides = 0
        self._t0 = self._last_report = 0.0

    @property
    def store(self) -> EmbeddingStore | None:
        """The (first) store, open for writing once its encoders are ready."""
        return self.targets[0].store

    @property
    def active(self) -> list[ActiveSlide]:
        """The slides in flight, oldest first."""
        return self.scheduler.active

    # ---- setup ---------------------------------------------------------------------------------

    def _start_encoders(self, targets: list[Target]) -> None:
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
            self.scheduler.add_store(target, target.actors)
        self.actor_nodes = [""] * len(self.actors)
        self.scheduler.read_chunk = self.cfg.read_chunk
        self.scheduler.max_prepare = max(2, res.cpus)

    def _await_encoders(self, target: Target) -> None:
        described = [self.ex.get(ref) for ref in target.described]
        info = described[0]
        target.encoder_spec, target.token_shape = info["encoder"], info["token_shape"]
        for actor, d in zip(target.actors, described):
            self.actor_nodes[actor] = d["node"]
        threads = f", {info['threads']} threads" if info["device"] == "cpu" else ""
        cfg = target.cfg
        self.log(f"[extract] {target.named('')}{len(target.actors)} encoder actor(s) on {info['device']} "
                 f"({cfg.encoder}, {target.encoder_spec['compute_precision']}, batch {cfg.batch_size}, read chunk "
                 f"{self.cfg.read_chunk}{threads}); store embeddings {target.encoder_spec['dim']}-d")

    def _open_store_for_writing(self, target: Target) -> None:
        """Once the store's encoders are ready: create or open it, record the failures seen before."""
        self._await_encoders(target)
        target.store = EmbeddingStore.create_or_open(
            target.url, kind="slides", spec=store_spec(target.cfg, target.encoder_spec),
            config=target.cfg.to_dict(), storage_options=self.storage_options)
        self.scheduler.writable.add(target)
        deferred = [item for item in self._deferred_failures if item[1] is target]
        for entry, _, error, started in deferred:
            self._fail(entry, [target], error, started)
            self._deferred_failures.remove((entry, target, error, started))

    def _nothing_to_encode(self, target: Target) -> None:
        """A store with every slide complete or failed before: no encoder starts for it, but its fingerprint is
        still checked, from the config, so a complete store of another encoder or tiling is refused as a run
        that had work would be."""
        from extract.inference import expected_encoder

        assert target.existing is not None
        device = "cuda" if self.ex.gpus() else "cpu"
        target.existing.check_fingerprint(store_spec(target.cfg, expected_encoder(target.cfg, device)[0]))

    def _log_todo(self, todo: list[tuple[SlideEntry, list[Target]]], note: str = "") -> None:
        per_store = ""
        if len(self.targets) > 1:
            per_store = " (" + ", ".join(f"{t.label} {sum(t in lacking for _, lacking in todo)}"
                                         for t in self.targets) + ")"
        self.log(f"[extract] {len(todo)} slides to extract{per_store}; {self.summary.count(SlideStatus.SKIPPED)} "
                 f"already complete (nothing re-encoded), {self.summary.count(SlideStatus.FAILED_BEFORE)} failed "
                 f"before (retry with --retry-failed){note}")

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> ExtractionSummary:
        started = time.perf_counter()
        for target in self.targets:
            target.existing = existing_store(target, self.storage_options)
        todo, known = slides_to_extract(self.entries, self.targets, self.cfg.limit)
        self.summary.outcomes += known
        working = [t for t in self.targets if any(t in lacking for _, lacking in todo)]
        for target in self.targets:
            if target not in working and target.existing is not None:
                self._nothing_to_encode(target)
        if not working:
            self._log_todo(todo, "; no encoder started")
            self.summary.seconds = time.perf_counter() - started
            return self.summary
        self.scheduler.waiting.extend(todo)
        # The first slides are masked while the encoders start (counting the GPUs imports torch), and the
        # reader processes start meanwhile: prepare needs no device setting.
        self._submit_prepares()
        self._start_encoders(working)
        self._log_todo(todo)
        self._total = sum(len(lacking) for _, lacking in todo)
        self._done_tiles, self._t0, self._last_report = 0, time.perf_counter(), 0.0
        pipeline_started = time.perf_counter()
        self._unopened = list(working)
        while self.scheduler.busy or self._unopened:
            self._submit_prepares()
            for target in [t for t in self._unopened if self.ex.done(t.described[0])]:
                self._open_store_for_writing(target)
                self._unopened.remove(target)
                if not self._unopened:
                    pipeline_started = time.perf_counter()
            self.scheduler.admit(time.perf_counter())
            self._probe_suspects()
            self._send(self.scheduler.open())
            self._send(self.scheduler.reads())
            refs = list(self._preparing) + [t.described[0] for t in self._unopened]
            refs += [ref for ref, _ in self._probes.values()]
            refs += [call.ref for call in self.scheduler.outstanding()]
            if not refs:
                continue
            ready = self.ex.wait(refs, timeout=1.0)  # every one that is ready, at least one unless timed out
            self._ready = set(ready)
            for ref in ready:
                if ref in self._preparing:
                    self._prepared(ref)
            for slide in list(self.scheduler.active):
                self._collect(slide)
            self._report()
        self._await_aborts()
        self._report(force=True)
        self.summary.seconds = time.perf_counter() - started
        self.summary.pipeline_seconds = time.perf_counter() - pipeline_started
        return self.summary

    def _submit_prepares(self) -> None:
        """Mask and plan the slides the scheduler lets through."""
        for entry, lacking in self.scheduler.to_prepare():
            self._preparing[self.ex.prepare(entry, self.cfg)] = (entry, lacking)

    def _prepared(self, ref: Any) -> None:
        entry, lacking = self._preparing.pop(ref)
        try:
            plan = self.ex.get(ref)
        except Exception as e:  # noqa: BLE001 - any per-slide error is recorded, the cohort goes on
            self.scheduler.prepare_failed()
            self._fail(entry, lacking, e, time.perf_counter())
        else:
            self.scheduler.prepared_slide(plan, lacking)
            self._planned_tiles += plan.n_tiles * len(lacking)
        self._planned_slides += len(lacking)

    # ---- sending and collecting ----------------------------------------------------------------

    def _send(self, decided: list[Read | Call]) -> None:
        """Run the reads and send the actor calls the scheduler decided, in its order."""
        for item in decided:
            if isinstance(item, Read):
                item.tiles = self.ex.read(item.slide.prepared, item.start, item.stop, self._read_near(item.slide))
                self.summary.chunk_reads[item.slide.slide_id] = self.summary.chunk_reads.get(item.slide.slide_id, 0) + 1
            else:
                item.ref = self._call(item)

    def _call(self, call: Call) -> Any:
        slide = call.slide
        p: PreparedSlide = slide.prepared  # type: ignore[assignment]  # the scheduler holds our plans
        actor = self.actors[slide.actor]
        if call.kind is CallKind.OPEN:
            return self.ex.call(actor, call.kind.value, slide.slide_id, p.attrs, p.writer_pictures(), p.downsample,
                                slide.token, slide.own_tokens)
        if call.kind is CallKind.CHUNK:
            assert call.read is not None
            start, stop = call.read.start, call.read.stop
            return self.ex.call(actor, call.kind.value, slide.slide_id, start, call.read.tiles, p.coords[start:stop],
                                p.tissue[start:stop])
        timings = {**p.attrs.get("timings", {}), "encode_write_s": round(time.perf_counter() - slide.started, 3)}
        extra = {"timings": timings, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return self.ex.call(actor, call.kind.value, slide.slide_id, extra, p.empty_reason if p.n_tiles == 0 else None)

    def _read_near(self, slide: ActiveSlide) -> str | None:
        """The node of the slide's encoder, when known and there are several (its tiles then stay there)."""
        if slide.target not in self.scheduler.writable or len(set(self.actor_nodes)) < 2:
            return None
        return self.actor_nodes[slide.actor]

    def _collect(self, slide: ActiveSlide) -> None:
        """Read what the slide's actor answered so far, in the order the scheduler wants the answers (those
        the loop's last wait found ready: one wait for all, not one per call)."""
        try:
            while (call := self.scheduler.next_answer(slide, self._ready)) is not None:
                answer = self.ex.get(call.ref)  # raises what the actor raised
                ended = self.scheduler.answered(call, answer)
                if call.kind is CallKind.CHUNK:
                    self._done_tiles += answer
                if ended is not None:
                    self._apply([ended])
        except Exception as e:  # noqa: BLE001 - per-slide: recorded, the cohort goes on
            if self.ex.actor_died(e):
                self._probes.pop(slide.actor, None)  # pinged again from now
                self._apply(self.scheduler.actor_died(slide.actor, e, self._succeeded))
            else:
                self._apply(self.scheduler.slide_error(slide, e))

    def _succeeded(self, call: Call) -> bool:
        return self.ex.done(call.ref) and self.ex.succeeded(call.ref)

    def _probe_suspects(self) -> None:
        """Ping each restarting actor (at most every PROBE_EVERY_S); one that answers is live again."""
        ex = self.ex
        for actor in sorted(self.scheduler.suspect):
            probe = self._probes.get(actor)
            if probe is not None and ex.done(probe[0]) and ex.succeeded(probe[0]):
                self.actor_nodes[actor] = ex.get(probe[0])["node"]  # it may have restarted on another node
                self.scheduler.actor_back(actor)
                del self._probes[actor]
            elif probe is None or (ex.done(probe[0]) and time.perf_counter() > probe[1]):
                self._probes[actor] = (ex.call(self.actors[actor], "describe"), time.perf_counter() + PROBE_EVERY_S)

    # ---- outcomes ------------------------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        """Do what the scheduler decided for slides that ended or start again, and record it."""
        for decision in decisions:
            slide = decision.slide
            target: Target = slide.target  # type: ignore[assignment]  # the scheduler holds our stores
            if isinstance(decision, Restarted):
                self.log(f"[extract] {target.named(slide.slide_id)}: writing it again from its first tile "
                         f"({decision.why})")
                continue
            self._ended(decision, target)

    def _ended(self, ended: Ended, target: Target) -> None:
        slide = ended.slide
        if ended.abort:  # its live writer removes what it wrote (its rows only)
            self._aborts.append(self.ex.call(self.actors[slide.actor], "abort_slide", slide.slide_id))
        if ended.abandon:  # its writer died and cannot clean up: remove what it left, by our own lease tokens
            assert target.store is not None
            target.store.abandon_slide(slide.slide_id, ended.abandon)
        if ended.status in (SlideStatus.DONE, SlideStatus.EMPTY):
            self._committed(slide, target, ended.status, ended.answer)
        elif ended.status is SlideStatus.SKIPPED:
            self.summary.outcomes.append(SlideOutcome(slide.slide_id, SlideStatus.SKIPPED, error="complete",
                                                      store=target.label))
        elif ended.status is SlideStatus.OWNED:  # another live job owns the slide and will commit it
            self.summary.outcomes.append(SlideOutcome(slide.slide_id, SlideStatus.OWNED,
                                                      seconds=time.perf_counter() - slide.started,
                                                      error=str(ended.error), store=target.label))
            self.log(f"[extract] {target.named('skipped')}: {slide.slide_id}: {ended.error}")
        else:
            assert ended.error is not None
            self._fail(slide.prepared.entry, [target], ended.error, slide.started)

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

    def _committed(self, slide: ActiveSlide, target: Target, status: SlideStatus, result: dict[str, Any]) -> None:
        p: PreparedSlide = slide.prepared  # type: ignore[assignment]
        self.summary.outcomes.append(SlideOutcome(p.entry.slide_id, status, result["rows"],
                                                  time.perf_counter() - slide.started + p.attrs["timings"]["prepare_s"],
                                                  p.reader, p.mpp.value, p.empty_reason or "", node=result["node"],
                                                  store=target.label))
        self.log(f"[extract] {target.named(status)}: {p.entry.slide_id} ({p.n_tiles} tiles, {p.reader}, "
                 f"{p.mpp.value:.3f} µm/px)" + (f": {p.empty_reason}" if p.empty_reason else ""))

    def _fail(self, entry: SlideEntry, targets: list[Target], error: BaseException, started: float) -> None:
        """Record the slide as failed in these stores (a store not open yet records it when it opens)."""
        original, text = _error_text(error)
        kind = "" if isinstance(original, SlidecacheError) else " (unexpected: please report)"
        for target in targets:
            if target.store is None:  # the store opens once its encoders are ready; recorded then
                self._deferred_failures.append((entry, target, error, started))
                continue
            target.store.record_failure(entry.slide_id, original)
            self.summary.outcomes.append(SlideOutcome(entry.slide_id, SlideStatus.FAILED,
                                                      seconds=time.perf_counter() - started, error=text,
                                                      store=target.label))
            self.log(f"[extract] {target.named('FAILED')}: {entry.slide_id}: {text}{kind}")

    def _report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_report < PROGRESS_EVERY_S:
            return
        self._last_report = now
        finished = sum(o.status in FINISHED for o in self.summary.outcomes)
        elapsed = now - self._t0
        rate = self._done_tiles / max(elapsed, 1e-9)
        # Tiles still to encode: known for planned slides, the planned mean for the rest.
        planned = self._planned_tiles
        mean_tiles = planned / self._planned_slides if self._planned_slides else float("nan")
        remaining = planned - self._done_tiles + mean_tiles * (self._total - self._planned_slides)
        eta = remaining / rate if rate > 0 and remaining == remaining else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        unit = "slides" if len(self.targets) == 1 else "slide-stores"
        self.log(f"[extract] progress: {finished}/{self._total} {unit} ({self.summary.count(SlideStatus.FAILED)} "
                 f"failed), {self._done_tiles} tiles, {rate:.1f} tiles/s, ETA {eta_text}")
