"""The extraction job: CPU tasks plan slides, and each encoder (one per GPU, else one per node) reads, encodes
and writes the slides pinned to it; the driver here only does what the scheduling core decides
(extract/scheduling.py), records outcomes and prints progress.

    prepare(slide) ──► one call per slide ──► EncoderWorker: read on its node → encode → append → commit ──► store
        (CPU task)        (driver)              (1 per GPU; the slide's writer; reader tasks beside it)

The stages run on an executor (extract/executors.py): Ray tasks and actors, or, on one machine without Ray, a
process pool and encoder threads. The driver's work is per slide, never per tile: it sends each encoder one call
per slide (the plan, the lease token, and the first chunks' reads, started near the encoder so the next slide's
tiles are ready when the one before commits) and gets back what became of the slide in each store. Tile pixels
go from readers on the encoder's node to the encoder, and embeddings from the encoder to the store
(extract/writers.py). Planning starts before the encoders have loaded their models (the stores open when they
have: their fingerprints need them). A rerun with nothing left to encode starts no encoder: it checks the
fingerprint from the config alone.

An encoder restarts when it dies (killed, out of memory, its node lost); the scheduler says which slide is
charged the death and which slides are written again from their first tile, each taking over its own lease at
once (the driver names each writer's lease token, so it knows them). One bad slide is recorded as a failure and
never stops the cohort. A slide another live job is writing is skipped here and reported as "owned".

Several stores, one read (`Extraction(entries, [(url, cfg), ...])`): every encoder worker holds one encoder and
writer per store (its own fingerprint), and a slide is planned and read once for all the stores that lack it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from extract.config import ExtractConfig
from extract.encoder_worker import SlideAnswer, SlideJob
from extract.ray_executor import RayExecutor
from extract.scheduling import MAX_DEATH_RETRIES, Call, Decision, Ended, Restarted, Scheduler, unwrapped
from extract.slide_prep import PreparedSlide
from extract.stages import Executor
from extract.summary import FINISHED, ExtractionSummary, SlideOutcome, SlideStatus
from extract.targets import Target, existing_store, slides_to_extract, store_spec, targets_for
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import SlidecacheError
from store.embedding_store import EmbeddingStore

__all__ = ["Extraction", "ExtractionSummary", "MAX_DEATH_RETRIES", "SlideOutcome", "SlideStatus"]

PROGRESS_EVERY_S = 10.0
PROBE_EVERY_S = 0.5  # how often a restarting encoder actor is pinged
MIN_READS_AHEAD, MAX_READS_AHEAD = 4, 32  # chunks of a slide being read while its encoder encodes one


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
        self.working: list[Target] = []  # the stores with slides to encode: every encoder holds one encoder each
        self.actors: list[Any] = []  # the encoder workers (a slide names one by index)
        self.actor_nodes: list[str] = []  # where each runs, once it has answered
        self._described: list[Any] = []  # each worker's describe call
        self._unplaced: set[int] = set()  # workers whose node is not known yet
        self._opened = False  # the stores are open for writing
        self._preparing: dict[Any, tuple[SlideEntry, list[Target]]] = {}  # prepare ref → its slide
        self._probes: dict[int, tuple[Any, float]] = {}  # restarting actor → its ping, and when to ping again
        self._deferred_failures: list[tuple[SlideEntry, Target, BaseException, float]] = []  # store not open yet
        # progress: a slide counts once per store that lacks it (each is encoded and written once per store)
        self._total = self._done_tiles = self._planned_tiles = self._planned_slides = 0
        self._t0 = self._last_report = self._pipeline_started = 0.0
        self.reads_ahead = MIN_READS_AHEAD  # set once the cluster is known

    @property
    def store(self) -> EmbeddingStore | None:
        """The (first) store, open for writing once its encoders are ready."""
        return self.targets[0].store

    @property
    def active(self) -> list[Any]:
        """The slides in flight, oldest first."""
        return self.scheduler.active

    # ---- setup ---------------------------------------------------------------------------------

    def _start_encoders(self) -> None:
        """Start the encoder workers without waiting for their models: planning goes on meanwhile (see run).
        One per GPU, else one per node (or --num-encoders), each holding every working store's encoder."""
        res = self.ex.resources()
        device = "cuda" if res.gpus else "cpu"
        self.cfg = self.cfg.for_device(device)
        for target in self.working:
            target.cfg = target.cfg.for_device(device)
        count = max(t.cfg.num_encoders or res.gpus or max(1, len(res.nodes)) for t in self.working)
        stores = [(target.cfg, target.url) for target in self.working]
        self.actors = self.ex.start_encoders((stores, self.storage_options), count, res.gpus, res.nodes)
        self.actor_nodes = [""] * len(self.actors)
        self._described = [self.ex.call(actor, "describe") for actor in self.actors]
        self._unplaced = set(range(len(self.actors)))
        # enough planned slides that every encoder has its next one while it encodes one
        self.scheduler.max_prepare = max(2, res.cpus, 2 * len(self.actors))
        # a read per core beside each encoder: a GPU takes ~5 cores' reading (bench/RESULTS.md), and a chunk read
        # ahead waits in the node's object store, so this also bounds the memory a slide takes, however large
        self.reads_ahead = min(MAX_READS_AHEAD, max(MIN_READS_AHEAD, res.cpus // len(self.actors)))

    def _open_stores(self, info: dict[str, Any]) -> None:
        """Once the first encoder is ready: create or open each store (its fingerprint from that encoder), and
        record the failures seen before."""
        for i, target in enumerate(self.working):
            target.encoder_spec, target.token_shape = info["encoders"][i], info["token_shapes"][i]
            target.store = EmbeddingStore.create_or_open(
                target.url, kind="slides", spec=store_spec(target.cfg, target.encoder_spec),
                config=target.cfg.to_dict(), storage_options=self.storage_options)
            threads = f", {info['threads']} threads" if info["device"] == "cpu" else ""
            self.log(f"[extract] {target.named('')}{len(self.actors)} encoder worker(s) on {info['device']} "
                     f"({target.cfg.encoder}, {target.encoder_spec['compute_precision']}, batch "
                     f"{target.cfg.batch_size}, read chunk {self.cfg.read_chunk}{threads}); store embeddings "
                     f"{target.encoder_spec['dim']}-d")
        self._opened = self.scheduler.writable = True
        for entry, target, error, started in self._deferred_failures:
            self._fail(entry, [target], error, started)
        self._deferred_failures.clear()

    def _encoders_ready(self, ready: set[Any]) -> None:
        """Encoders that have loaded join the scheduler, with the node they run on (their slides are read
        there); the first one opens the stores. One that cannot start (no free GPU) is never sent a slide."""
        for i in sorted(i for i in self._unplaced if self._described[i] in ready):
            info = self.ex.get(self._described[i])  # raises what building the encoder raised
            self.actor_nodes[i] = info["node"]
            self._unplaced.discard(i)
            if not self._opened:
                self._open_stores(info)
                self._pipeline_started = time.perf_counter()
            self.scheduler.add_actors([i])

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
        self.working = [t for t in self.targets if any(t in lacking for _, lacking in todo)]
        for target in self.targets:
            if target not in self.working and target.existing is not None:
                self._nothing_to_encode(target)
        if not self.working:
            self._log_todo(todo, "; no encoder started")
            self.summary.seconds = time.perf_counter() - started
            return self.summary
        self.scheduler.waiting.extend(todo)
        # The first slides are masked while the encoders start (counting the GPUs imports torch), and the
        # reader processes start meanwhile: prepare needs no device setting.
        self._submit_prepares()
        self._start_encoders()
        self._log_todo(todo)
        self._total = sum(len(lacking) for _, lacking in todo)
        self._done_tiles, self._t0, self._last_report = 0, time.perf_counter(), 0.0
        self._pipeline_started = time.perf_counter()
        while self.scheduler.busy or not self._opened:
            self._submit_prepares()
            self._probe_suspects()
            for call in self.scheduler.send(time.perf_counter()):
                self._send(call)
            refs = list(self._preparing) + [self._described[i] for i in self._unplaced]
            refs += [ref for ref, _ in self._probes.values()]
            refs += [call.ref for call in self.scheduler.outstanding()]
            ready = set(self.ex.wait(refs, timeout=1.0))  # every one that is ready, at least one unless timed out
            for ref in [ref for ref in self._preparing if ref in ready]:
                self._prepared(ref)
            self._encoders_ready(ready)
            for call in [call for call in self.scheduler.outstanding() if call.ref in ready]:
                self._collect(call)
            self._report()
        self._report(force=True)
        self.summary.seconds = time.perf_counter() - started
        self.summary.pipeline_seconds = time.perf_counter() - self._pipeline_started
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

    def _send(self, call: Call) -> None:
        """Send the slide to its encoder, with its first chunks' reads started on the encoder's node: half as many
        as the encoder keeps ahead, enough to feed it across the switch from the slide before, few enough not to
        hold up that slide's own reads, which queue behind them on the node's cores."""
        slide = call.slide
        p: PreparedSlide = slide.prepared  # type: ignore[assignment]  # the scheduler holds our plans
        near = self.actor_nodes[call.actor] or None
        chunk = self.cfg.read_chunk
        first = [self.ex.read(p, start, min(start + chunk, p.n_tiles), near)
                 for start in range(0, min(p.n_tiles, max(1, self.reads_ahead // 2) * chunk), chunk)]
        job = SlideJob(dataclasses.replace(p, pictures=None), [self.working.index(t) for t in slide.targets],
                       slide.token, list(slide.own_tokens), chunk, self.reads_ahead, first)
        call.ref = self.ex.call(self.actors[call.actor], "encode_slide", job, p.writer_pictures())

    def _collect(self, call: Call) -> None:
        """What the slide's encoder answered: the slide in each store, or an error (its encoder died, or reading
        the slide failed)."""
        try:
            answer: SlideAnswer = self.ex.get(call.ref)  # raises what the worker raised
        except Exception as e:  # noqa: BLE001 - per-slide: recorded, the cohort goes on
            if self.ex.actor_died(e):
                self._probes.pop(call.actor, None)  # pinged again from now
                self._apply(self.scheduler.actor_died(call.actor, e, self._succeeded))
            else:
                self._apply(self.scheduler.slide_error(call.slide, e))
            return
        self.scheduler.answered(call)
        slide = call.slide
        self.summary.chunk_reads[slide.slide_id] = self.summary.chunk_reads.get(slide.slide_id, 0) + len(
            answer.read_nodes)
        for i, store_answer in answer.stores.items():
            target = self.working[i]
            status = SlideStatus(store_answer.status)
            if status in (SlideStatus.DONE, SlideStatus.EMPTY):
                self._done_tiles += store_answer.rows
                self._committed(slide.prepared, slide.started, target, status, store_answer.rows, answer)
            elif status is SlideStatus.SKIPPED:
                self.summary.outcomes.append(SlideOutcome(slide.slide_id, status, error="complete", store=target.label))
            elif status is SlideStatus.OWNED:
                self._owned(slide.slide_id, slide.started, target, store_answer.error)
            else:
                assert store_answer.error is not None
                self._fail(slide.prepared.entry, [target], store_answer.error, slide.started)

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
            if isinstance(decision, Restarted):
                self.log(f"[extract] {slide.slide_id}: writing it again from its first tile ({decision.why})")
                continue
            self._ended(decision)

    def _ended(self, ended: Ended) -> None:
        slide = ended.slide
        targets: list[Target] = slide.targets  # type: ignore[assignment]  # the scheduler holds our stores
        for target in targets:
            if ended.abandon:  # its writers died and cannot clean up: remove what they left, by our lease tokens
                assert target.store is not None
                target.store.abandon_slide(slide.slide_id, ended.abandon)
            if ended.status is SlideStatus.OWNED:
                self._owned(slide.slide_id, slide.started, target, ended.error)
        if ended.status is SlideStatus.FAILED:
            self._fail(slide.prepared.entry, targets, ended.error, slide.started)

    def _owned(self, slide_id: str, started: float, target: Target, error: BaseException | None) -> None:
        """Another live job owns the slide in this store and will commit it."""
        self.summary.outcomes.append(SlideOutcome(slide_id, SlideStatus.OWNED, seconds=time.perf_counter() - started,
                                                  error=str(error), store=target.label))
        self.log(f"[extract] {target.named('skipped')}: {slide_id}: {error}")

    def _committed(self, plan: Any, started: float, target: Target, status: SlideStatus, rows: int,
                   answer: SlideAnswer) -> None:
        p: PreparedSlide = plan
        self.summary.outcomes.append(SlideOutcome(p.entry.slide_id, status, rows,
                                                  time.perf_counter() - started + p.attrs["timings"]["prepare_s"],
                                                  p.reader, p.mpp.value, p.empty_reason or "", node=answer.node,
                                                  store=target.label, read_nodes=sorted(set(answer.read_nodes))))
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
