"""The extraction's scheduling core: which slide is prepared next, which encoder it is pinned to and when its call
is sent, and whom an encoder's death is charged to. Plain state, no executor, no Ray, no store: the driver
(extract/job.py) tells it what happened (a plan came back, an encoder answered or died) and sends what it
decides (one `Call` per slide; the `Ended` and `Restarted` slides).

    waiting ──► preparing ──► prepared ──► sent: one call reads, encodes, writes and commits it ──► ended
                                              ▲                                              │
                                              └────────── Restarted (its encoder died) ◄─────┘

A store is any hashable key of the driver's, an encoder the index of one in the driver's list; every encoder
serves every store of the run, so a slide is read once, where its encoder runs, for all the stores that lack
it. A call's `ref` is the executor's handle, set by the driver when it sends the call; here it is only looked
up. An encoder runs its calls one at a time in the order sent, and holds at most CALLS_PER_ENCODER: the one it
encodes and the next, whose first tiles are read meanwhile. The driver's work is per slide, never per tile.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from extract.summary import SlideStatus
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import EncoderError, SlideBusy

MAX_DEATH_RETRIES = 2  # a slide runs at most 3 times on encoders that die under it, then fails
CALLS_PER_ENCODER = 2  # the slide being encoded, and the next one, read meanwhile


class Plan(Protocol):
    """What scheduling needs of a prepared slide (extract.slide_prep.PreparedSlide): which slide it is."""

    entry: SlideEntry


def unwrapped(error: BaseException) -> BaseException:
    """Ray's task error unwrapped to our own exception (what really went wrong)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


@dataclass(eq=False)  # identity: the executor's answer is found by it
class Call:
    """A slide sent to an encoder, numbered in the order sent."""

    slide: ActiveSlide
    actor: int
    sequence: int
    ref: Any = None  # the executor's handle, once sent


@dataclass(eq=False)  # identity: a slide in flight is one object
class ActiveSlide:
    """A slide in flight for the stores that lack it, pinned to one encoder, which reads, encodes and writes it
    under the lease `token`; `call` is None while it waits to be sent (again)."""

    prepared: Plan
    targets: list[Hashable]  # the stores that lack it
    actor: int
    started: float
    token: str = ""  # this attempt's lease token
    own_tokens: list[str] = field(default_factory=list)  # earlier attempts' tokens: ours to take over
    deaths: int = 0  # times its encoder died while encoding it
    call: Call | None = None

    @property
    def slide_id(self) -> str:
        return self.prepared.entry.slide_id


@dataclass
class Ended:
    """A slide left the run for every store it was sent for, failed or owned (`error`, Ray's wrapping removed);
    `abandon`: its writers died with their encoder, so the driver removes what they left, by lease token."""

    slide: ActiveSlide
    status: SlideStatus
    error: BaseException
    abandon: list[str] = field(default_factory=list)


@dataclass
class Restarted:
    """The slide is sent again, to be written from its first tile: its writers died with their encoder."""

    slide: ActiveSlide
    why: str


Decision = Ended | Restarted


class Scheduler:
    """The state of one run's slides. Encoders join (`add_actors`) before slides are sent, and slides are sent
    once the stores are open (`writable`); `max_prepare` is the driver's to set once it knows the cluster."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[SlideEntry, list[Hashable]]] = deque()  # with the stores lacking each
        self.preparing = 0
        self.prepared: deque[tuple[Plan, list[Hashable]]] = deque()
        self.max_prepare = 2  # prepared or preparing at once
        self.actors: list[int] = []
        self.writable = False  # the stores are open for writing: slides may be sent
        self.suspect: set[int] = set()  # encoders restarting: nothing is sent to them
        self.active: list[ActiveSlide] = []  # oldest first
        self._calls: dict[int, int] = {}  # encoder → its calls not yet answered
        self._sequence = 0

    def add_actors(self, actors: Iterable[int]) -> None:
        for actor in actors:
            self.actors.append(actor)
            self._calls[actor] = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.preparing or self.prepared or self.active)

    # ---- preparing ------------------------------------------------------------------------------

    def to_prepare(self) -> list[tuple[SlideEntry, list[Hashable]]]:
        """The next slides to plan (the driver reports each back: `prepared_slide` or `prepare_failed`)."""
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

    # ---- sending --------------------------------------------------------------------------------

    def send(self, now: float) -> list[Call]:
        """Calls to send, each to the live encoder with the fewest calls while one has room: slides to be
        written again first (oldest first), then prepared ones."""
        if not self.writable:
            return []
        calls = []
        for slide in self.active:
            if slide.call is None and (actor := self._free_actor()) is not None:
                calls.append(self._call(slide, actor))
        while self.prepared and (actor := self._free_actor()) is not None:
            plan, lacking = self.prepared.popleft()
            slide = ActiveSlide(plan, lacking, actor, now)
            self.active.append(slide)
            calls.append(self._call(slide, actor))
        return calls

    def outstanding(self) -> list[Call]:
        return [slide.call for slide in self.active if slide.call is not None]

    def _call(self, slide: ActiveSlide, actor: int) -> Call:
        self._sequence += 1
        self._calls[actor] += 1
        slide.actor, slide.token = actor, uuid.uuid4().hex
        slide.call = Call(slide, actor, self._sequence)
        return slide.call

    def _settled(self, slide: ActiveSlide) -> None:
        """The slide's call is answered or lost: its encoder has room again."""
        if slide.call is not None:
            self._calls[slide.call.actor] -= 1
            slide.call = None

    def _free_actor(self) -> int | None:
        """The live encoder with the fewest calls (the first of equals), if one has room for another."""
        best = None
        for actor in self.actors:
            calls = self._calls[actor]
            if calls < CALLS_PER_ENCODER and actor not in self.suspect and (best is None or calls < self._calls[best]):
                best = actor
                if calls == 0:
                    break
        return best

    # ---- answers --------------------------------------------------------------------------------

    def answered(self, call: Call) -> None:
        """The encoder answered the slide's call (what became of it in each store is the driver's to record)."""
        self._settled(call.slide)
        self.active.remove(call.slide)

    def slide_error(self, slide: ActiveSlide, error: BaseException) -> list[Decision]:
        """The slide's call raised (reading it failed): it ends in every store, owned by another job or failed.
        The encoder removed what it wrote before raising."""
        original = unwrapped(error)
        status = SlideStatus.OWNED if isinstance(original, SlideBusy) else SlideStatus.FAILED
        self._settled(slide)
        self.active.remove(slide)
        return [Ended(slide, status, original)]

    def actor_died(self, actor: int, error: BaseException, succeeded: Callable[[Call], bool]) -> list[Decision]:
        """An encoder died (killed, out of memory, its node lost) and restarts. It runs its calls one at a time
        in the order sent, so the earliest that had not succeeded is the one it was running: that slide is
        charged the death, and fails once it has killed its encoder 1 + MAX_DEATH_RETRIES times. Every other
        slide it held is sent again (its writers' rows are gone), to a live encoder. Nothing is sent to the
        encoder until it is back (`actor_back`)."""
        held = sorted((slide.call for slide in self.active
                       if slide.call is not None and slide.call.actor == actor and not succeeded(slide.call)),
                      key=lambda call: call.sequence)
        self.suspect.add(actor)
        decisions: list[Decision] = []
        if held:
            culprit = held[0].slide
            culprit.deaths += 1
            if culprit.deaths > MAX_DEATH_RETRIES:
                held.pop(0)
                self._settled(culprit)
                self.active.remove(culprit)
                decisions.append(Ended(culprit, SlideStatus.FAILED, EncoderError(
                    f"the encoder process died {culprit.deaths} times while encoding this slide (killed, out of "
                    f"memory, or a crash inside the model: {type(error).__name__}); the slide is failed, the "
                    "cohort goes on"), abandon=[culprit.token, *culprit.own_tokens]))
        for call in held:
            slide = call.slide
            slide.own_tokens.append(slide.token)
            slide.token = ""
            self._settled(slide)
            decisions.append(Restarted(slide, f"its encoder process died ({type(error).__name__})"))
        return decisions

    def actor_back(self, actor: int) -> None:
        self.suspect.discard(actor)
