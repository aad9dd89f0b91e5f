"""The extraction's scheduling core: which slide is prepared, admitted, opened and read next, how much is in
flight, and whom an encoder actor's death is charged to. Plain state, no executor, no Ray, no store: the
driver (extract/job.py) tells it what happened (a plan came back, an actor answered, an actor died) and does
what it decides (the `Read`s and `Call`s it hands out, in their order; the `Ended` and `Restarted` slides).

    waiting ──► preparing ──► prepared ──► active: opened → chunks read, each once for its group → committed
                                              ▲                                     │
                                              └── Restarted (its writer died) ◄─────┘ actor_died / slide_error

A store is any hashable key of the driver's, an actor the index of one in the driver's list. A call's `ref`
is the executor's handle, set by the driver when it sends the call; here it is only looked up in what was
found ready. Each slide is pinned to one encoder actor of its store, which writes it; an actor runs its
calls in the order sent, so they are numbered here in that order.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Container, Hashable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from extract.summary import SlideStatus
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import EncoderError, SlideBusy, WriterRestarted

MAX_CHUNK_RETRIES = 2  # a chunk runs at most 3 times on encoder actors that die under it
MAX_SLIDE_RESTARTS = 5  # a slide written again this often (its writer's actor died each time) fails


class Plan(Protocol):
    """What scheduling needs of a prepared slide (extract.slide_prep.PreparedSlide)."""

    entry: SlideEntry

    @property
    def n_tiles(self) -> int: ...


def unwrapped(error: BaseException) -> BaseException:
    """Ray's task error unwrapped to our own exception (what really went wrong)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class CallKind(Enum):
    OPEN = "open_slide"
    CHUNK = "encode_append"
    COMMIT = "commit_slide"


@dataclass(eq=False)  # identity: a chunk read once is one object, whichever stores it feeds
class Read:
    """Tiles start:stop of a slide, read once for every store of its group; `tiles` is the executor's handle."""

    slide: ActiveSlide  # the one it is read for (where to read near)
    start: int
    stop: int
    tiles: Any = None


@dataclass(eq=False)  # identity: the executor's answer is found by it
class Call:
    """A call to the slide's encoder actor, numbered in the order sent."""

    kind: CallKind
    slide: ActiveSlide
    sequence: int
    read: Read | None = None  # a chunk's tiles
    ref: Any = None  # the executor's handle, once sent

    @property
    def label(self) -> str:
        """How a death is charged to it: the same chunk of the same slide keeps its label across restarts."""
        if self.kind is CallKind.CHUNK:
            assert self.read is not None
            return f"tiles {self.read.start}-{self.read.stop}"
        return "its opening" if self.kind is CallKind.OPEN else "its commit"


@dataclass(eq=False)  # identity: a slide in flight is one object
class ActiveSlide:
    """A slide in flight for one store, pinned to one encoder actor of that store, which writes it. The
    stores that lack a slide share its chunk queue (`group`): each chunk is read once and sent to all."""

    prepared: Plan
    target: Hashable  # the store
    actor: int
    started: float
    token: str = ""  # the lease token of this attempt's writer ("" until opened)
    own_tokens: list[str] = field(default_factory=list)  # earlier attempts' tokens: ours to take over
    restarts: int = 0
    chunks: deque[tuple[int, int]] = field(default_factory=deque)  # (start, stop) not yet read
    reads: deque[Read] = field(default_factory=deque)  # read before the slide was opened
    pending: deque[Call] = field(default_factory=deque)  # chunks sent to the actor, in tile order
    opened: Call | None = None  # until its answer is read
    committing: Call | None = None
    deaths: dict[str, int] = field(default_factory=dict)  # call label → times its actor died running it
    group: list[ActiveSlide] = field(default_factory=list)  # the slides sharing `chunks` (itself included)

    @property
    def slide_id(self) -> str:
        return self.prepared.entry.slide_id

    def calls(self) -> list[Call]:
        """The slide's outstanding actor calls, in the order they were sent."""
        out = [self.opened] if self.opened is not None else []
        out += self.pending
        return out + ([self.committing] if self.committing is not None else [])

    def reset_chunks(self, read_chunk: int) -> None:
        """Read the slide from its first tile, alone (a store that starts again does not hold up the others)."""
        n = self.prepared.n_tiles
        self.chunks = deque((s, min(s + read_chunk, n)) for s in range(0, n, read_chunk))
        self.leave_group()

    def leave_group(self) -> None:
        if self in self.group:
            self.group.remove(self)
        self.group = [self]


@dataclass
class Ended:
    """A slide left the run with this status. What is left to the driver: tell its live writer to remove
    its rows (`abort`), or, its writer dead, remove them itself by lease token (`abandon`)."""

    slide: ActiveSlide
    status: SlideStatus
    error: BaseException | None = None  # failed or owned: why (Ray's wrapping removed)
    answer: Any = None  # done or empty: the commit's answer
    abort: bool = False
    abandon: list[str] = field(default_factory=list)


@dataclass
class Restarted:
    """The slide is written again from its first tile: its writer died with its actor."""

    slide: ActiveSlide
    why: BaseException | str


Decision = Ended | Restarted


class Scheduler:
    """The state of one run's slides in flight. Stores join with their actors (`add_store`) before slides
    are admitted; `read_chunk` and `max_prepare` are the driver's to set once it knows the device."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[SlideEntry, list[Hashable]]] = deque()  # with the stores lacking each
        self.preparing = 0
        self.prepared: deque[tuple[Plan, list[Hashable]]] = deque()
        self.max_prepare = 2  # prepared or preparing at once
        self.read_chunk = 0
        self.actors_of: dict[Hashable, list[int]] = {}
        self.writable: set[Hashable] = set()  # stores open for writing: their slides may open
        self.suspect: set[int] = set()  # actors restarting: nothing new is sent to them
        self.active: list[ActiveSlide] = []  # oldest first
        self.inflight = 0  # chunks read and not yet answered, counted once per store
        self._sequence = 0

    def add_store(self, target: Hashable, actors: list[int]) -> None:
        self.actors_of[target] = actors

    @property
    def n_actors(self) -> int:
        return sum(len(actors) for actors in self.actors_of.values())

    @property
    def max_active(self) -> int:
        """Slides in flight: enough that every actor has one while the next is being opened and read."""
        return 2 * len(self.actors_of) + self.n_actors

    @property
    def max_inflight(self) -> int:
        """Chunks read and not yet encoded: bounded, so memory stays flat however large a slide is."""
        return 4 * self.n_actors + 2 * len(self.actors_of)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.preparing or self.prepared or self.active)

    # ---- preparing ------------------------------------------------------------------------------

    def to_prepare(self) -> list[tuple[SlideEntry, list[Hashable]]]:
        """The next slides to plan (the driver reports each back: `prepared` or `prepare_failed`)."""
        out = []
        while self.waiting and self.preparing + len(self.prepared) < self.max_prepare:
            out.append(self.waiting.popleft())
            self.preparing += 1
        return out

    def prepared_slide(self, plan: Plan, lacking: list[Hashable]) -> None:
        self.preparing -= 1
        self.prepared.append((plan, lacking))

    def prepare_failed(self) -> None:
        self.preparing -= 1

    # ---- admitting, opening, reading ------------------------------------------------------------

    def admit(self, now: float) -> list[ActiveSlide]:
        """Pin each prepared slide, for each store that lacks it, to that store's actor with the fewest slides;
        they share one chunk queue (one read each), and the chunks may be read at once."""
        admitted = []
        while self.prepared and len(self.active) < self.max_active:
            plan, lacking = self.prepared.popleft()
            slides = [ActiveSlide(plan, target, self._least_loaded(self.actors_of[target]), now) for target in lacking]
            slides[0].reset_chunks(self.read_chunk)
            for slide in slides:
                slide.chunks, slide.group = slides[0].chunks, slides
            self.active += slides
            admitted += slides
        return admitted

    def open(self) -> list[Call]:
        """Open every slide whose store is writable, on a live actor: its writer first, then what was read
        while the encoders loaded (chunks and commit follow it there, in order)."""
        calls = []
        for slide in self.active:
            if slide.target in self.writable and not slide.token and self._pin_to_a_live_actor(slide):
                slide.token = uuid.uuid4().hex
                slide.opened = self._call(CallKind.OPEN, slide)
                calls.append(slide.opened)
                while slide.reads:
                    calls += self._send_chunk(slide, slide.reads.popleft())
                if slide.prepared.n_tiles == 0:
                    calls.append(self._commit(slide))
        return calls

    def reads(self) -> list[Read | Call]:
        """The next chunks to read, oldest slide first (it commits soonest), bounded in flight; each is read
        once and followed by its calls to every store of the group that is open (the others keep it)."""
        out: list[Read | Call] = []
        for slide in self.active:
            while slide.chunks and self.inflight < self.max_inflight:
                start, stop = slide.chunks.popleft()
                read = Read(slide, start, stop)
                out.append(read)
                for member in slide.group:
                    self.inflight += 1
                    if member.token:
                        out += self._send_chunk(member, read)
                    else:
                        member.reads.append(read)
        return out

    def outstanding(self) -> list[Call]:
        return [call for slide in self.active for call in slide.calls()]

    def _call(self, kind: CallKind, slide: ActiveSlide, read: Read | None = None) -> Call:
        self._sequence += 1
        return Call(kind, slide, self._sequence, read)

    def _send_chunk(self, slide: ActiveSlide, read: Read) -> list[Call]:
        call = self._call(CallKind.CHUNK, slide, read)
        slide.pending.append(call)
        if not slide.chunks and read.stop == slide.prepared.n_tiles:
            return [call, self._commit(slide)]
        return [call]

    def _commit(self, slide: ActiveSlide) -> Call:
        slide.committing = self._call(CallKind.COMMIT, slide)
        return slide.committing

    # ---- answers --------------------------------------------------------------------------------

    def next_answer(self, slide: ActiveSlide, ready: Container[Any]) -> Call | None:
        """The slide's call whose answer is to be read now, if ready: its opening, its chunks in order, its
        commit once every chunk has answered."""
        if slide.opened is not None:
            return slide.opened if slide.opened.ref in ready else None
        if slide.pending:
            return slide.pending[0] if slide.pending[0].ref in ready else None
        if slide.committing is not None and slide.committing.ref in ready:
            return slide.committing
        return None

    def answered(self, call: Call, answer: Any) -> Ended | None:
        """The actor's answer to a call (the head of its slide's queue). Raises for a chunk that came back
        short: the slide must not commit."""
        slide = call.slide
        if call.kind is CallKind.OPEN:
            slide.opened = None
            return self._end(slide, SlideStatus.SKIPPED) if answer == "complete" else None
        if call.kind is CallKind.CHUNK:
            assert call.read is not None
            start, stop = call.read.start, call.read.stop
            if answer != stop - start:
                raise RuntimeError(f"chunk {start}-{stop} came back as {answer} rows: refusing to commit the slide")
            slide.pending.popleft()
            self.inflight -= 1
            return None
        status = SlideStatus.DONE if slide.prepared.n_tiles else SlideStatus.EMPTY
        return self._end(slide, status, answer=answer)

    # ---- failures -------------------------------------------------------------------------------

    def actor_died(self, actor: int, error: BaseException, succeeded: Callable[[Call], bool]) -> list[Decision]:
        """An encoder actor died (killed, out of memory, its node lost) and restarts. Its calls run in the
        order sent, so the earliest that had not succeeded is the one it was running: that call is charged the
        death, and its slide fails once the same call has killed its actor 1 + MAX_CHUNK_RETRIES times.
        Every other slide the actor held is written again from its first tile (its writer's buffered rows
        are gone), on a live actor. Nothing is sent to the actor until it is back (`actor_back`)."""
        held = [slide for slide in self.active if slide.actor == actor and (slide.token or slide.calls())]
        outstanding = sorted((call for slide in held for call in slide.calls() if not succeeded(call)),
                             key=lambda call: call.sequence)
        self.suspect.add(actor)
        decisions: list[Decision] = []
        if outstanding:
            culprit, label = outstanding[0].slide, outstanding[0].label
            culprit.deaths[label] = culprit.deaths.get(label, 0) + 1
            if culprit.deaths[label] > MAX_CHUNK_RETRIES:
                held.remove(culprit)
                decisions += self.slide_error(culprit, EncoderError(
                    f"the encoder process died {culprit.deaths[label]} times while encoding {label} of this slide "
                    f"(killed, out of memory, or a crash inside the model: {type(error).__name__}); the slide is "
                    "failed, the cohort goes on"), writer_died=True)
        return decisions + [self._restart(slide, f"its encoder process died ({type(error).__name__})")
                            for slide in held]

    def actor_back(self, actor: int) -> None:
        self.suspect.discard(actor)

    def slide_error(self, slide: ActiveSlide, error: BaseException, writer_died: bool = False) -> list[Decision]:
        """The slide's call raised. A writer that restarted under it is started again (at most
        MAX_SLIDE_RESTARTS times); anything else ends the slide: owned by another job, or failed."""
        original = unwrapped(error)
        if isinstance(original, WriterRestarted):
            if slide.restarts < MAX_SLIDE_RESTARTS:
                return [self._restart(slide, original)]
            writer_died = True
        status = SlideStatus.OWNED if isinstance(original, SlideBusy) else SlideStatus.FAILED
        return [self._end(slide, status, error=original, abort=not writer_died, abandon=writer_died)]

    def _restart(self, slide: ActiveSlide, why: BaseException | str) -> Restarted:
        self._release(slide)
        slide.own_tokens.append(slide.token)
        slide.token = ""
        slide.restarts += 1
        slide.reset_chunks(self.read_chunk)
        return Restarted(slide, why)

    def _end(self, slide: ActiveSlide, status: SlideStatus, error: BaseException | None = None, answer: Any = None,
             abort: bool = False, abandon: bool = False) -> Ended:
        """The slide leaves the run; with abort its live writer is to remove what it wrote (its rows only)."""
        self._release(slide)
        slide.leave_group()  # the other stores' reads go on without it
        self.active.remove(slide)
        return Ended(slide, status, error, answer, abort=abort and bool(slide.token),
                     abandon=[slide.token, *slide.own_tokens] if abandon else [])

    def _release(self, slide: ActiveSlide) -> None:
        """Drop the slide's outstanding reads and calls (their answers are not needed)."""
        self.inflight -= len(slide.pending) + len(slide.reads)
        slide.pending.clear()
        slide.reads.clear()
        slide.opened = slide.committing = None

    # ---- pinning --------------------------------------------------------------------------------

    def _pin_to_a_live_actor(self, slide: ActiveSlide) -> bool:
        """Move a slide not yet opened off a restarting actor, to the live one with the fewest slides.
        False when every actor of its store is restarting (the slide waits)."""
        if slide.actor not in self.suspect:
            return True
        live = [i for i in self.actors_of[slide.target] if i not in self.suspect]
        if not live:
            return False
        slide.actor = self._least_loaded(live)
        return True

    def _least_loaded(self, actors: Iterable[int]) -> int:
        """Of these actors, the one with the fewest slides in flight (the first of equals)."""
        return min(actors, key=lambda i: sum(s.actor == i for s in self.active))
