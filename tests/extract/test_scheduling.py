"""The extraction's scheduling core on its own, without any executor: what it decides (reads, calls, ends,
restarts) from what it is told (plans back, answers, deaths). A call's ref here is the call itself."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from extract.scheduling import MAX_CHUNK_RETRIES, MAX_SLIDE_RESTARTS, Call, CallKind, Ended, Read, Restarted, Scheduler
from extract.summary import ExtractionSummary, SlideOutcome, SlideStatus
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import EncoderError, SlideBusy, SlideReadError, WriterRestarted

A, B = "store-a", "store-b"  # the driver's stores: any hashable key


@dataclass
class Plan:
    entry: SlideEntry
    tiles: int

    @property
    def n_tiles(self) -> int:
        return self.tiles


def plan(slide_id: str, tiles: int) -> Plan:
    return Plan(SlideEntry(slide_id, f"{slide_id}.svs", slide_id), tiles)


def scheduler(stores: dict[str, int], read_chunk: int = 4, writable: bool = True) -> Scheduler:
    """A scheduler for these stores (name → how many actors), their actors numbered in order."""
    s = Scheduler()
    first = 0
    for store, count in stores.items():
        s.add_store(store, list(range(first, first + count)))
        first += count
        if writable:
            s.writable.add(store)
    s.read_chunk = read_chunk
    return s


def admit(s: Scheduler, *plans: Plan, stores: tuple[str, ...] = (A,)) -> None:
    for p in plans:
        s.waiting.append((p.entry, list(stores)))
    s.max_prepare = len(plans)
    for entry, lacking in s.to_prepare():
        s.prepared_slide(next(p for p in plans if p.entry is entry), lacking)
    s.admit(now=0.0)


def sent(decided: list[Read | Call]) -> list[Read | Call]:
    """What a driver does: a read gets its tiles, a call its ref (here: itself)."""
    for item in decided:
        if isinstance(item, Read):
            item.tiles = f"tiles {item.start}-{item.stop}"
        else:
            item.ref = item
    return decided


def step(s: Scheduler) -> list[Read | Call]:
    return sent(s.open()) + sent(s.reads())


def calls(decided: list[Read | Call], kind: CallKind | None = None) -> list[Call]:
    return [c for c in decided if isinstance(c, Call) and (kind is None or c.kind is kind)]


def answer(s: Scheduler, *done: Call) -> list[Ended]:
    """Every answer the scheduler takes now among these calls, as a driver collects them."""
    ended, ready = [], set(done)
    for slide in list(s.active):
        while (call := s.next_answer(slide, ready)) is not None:
            reply = {CallKind.OPEN: "opened", CallKind.CHUNK: call.read.stop - call.read.start if call.read else 0,
                     CallKind.COMMIT: {"rows": slide.prepared.n_tiles, "node": "n0"}}[call.kind]
            if (result := s.answered(call, reply)) is not None:
                ended.append(result)
    return ended


def test_preparing_and_admitting_are_bounded():
    s = scheduler({A: 1})
    plans = [plan(f"s{i}", 40) for i in range(8)]
    s.waiting.extend((p.entry, [A]) for p in plans)
    assert len(s.to_prepare()) == s.max_prepare == 2 and s.to_prepare() == []  # two at a time
    s.prepared_slide(plans[0], [A])
    s.prepare_failed()
    assert len(s.to_prepare()) == 1  # one place freed by the failure (the prepared one still holds its own)
    s.max_prepare = 8
    for p in plans[1:]:
        s.prepared_slide(p, [A])
    s.preparing = 0
    assert len(s.admit(now=0.0)) == s.max_active == 2 * 1 + 1  # two per store, one more per actor


def test_reads_in_flight_never_exceed_the_limit_and_resume_as_chunks_are_answered():
    s = scheduler({A: 1})
    admit(s, plan("s0", 40), plan("s1", 40))
    decided = step(s)
    reads = [d for d in decided if isinstance(d, Read)]
    assert len(reads) == s.max_inflight == 4 * 1 + 2 * 1 and s.inflight == s.max_inflight
    assert [r.slide.slide_id for r in reads] == ["s0"] * 6  # the oldest slide first: it commits soonest
    assert sent(s.reads()) == []  # nothing more until an answer
    opens = calls(decided, CallKind.OPEN)
    first_chunk = calls(decided, CallKind.CHUNK)[0]
    answer(s, *opens, first_chunk)
    more = sent(s.reads())
    assert [(r.slide.slide_id, r.start) for r in more if isinstance(r, Read)] == [("s0", 24)] and s.inflight == 6


def test_a_slide_is_opened_first_and_its_chunks_follow_in_tile_order_then_its_commit():
    s = scheduler({A: 1}, read_chunk=4)
    admit(s, plan("s0", 10))
    decided = calls(step(s))
    assert [c.kind for c in decided] == [CallKind.OPEN] + [CallKind.CHUNK] * 3 + [CallKind.COMMIT]
    assert [c.label for c in decided] == ["its opening", "tiles 0-4", "tiles 4-8", "tiles 8-10", "its commit"]
    assert [c.sequence for c in decided] == sorted(c.sequence for c in decided)  # numbered in the order sent
    assert decided[0].slide.token  # its writer's lease token
    assert answer(s, *decided[2:]) == []  # nothing is read before the opening's answer
    (ended,) = answer(s, *decided)
    assert ended.status is SlideStatus.DONE and ended.answer["rows"] == 10 and not ended.abort and s.active == []
    assert s.inflight == 0


def test_one_read_feeds_every_store_and_a_store_not_yet_open_keeps_it():
    s = scheduler({A: 1, B: 1}, read_chunk=8)
    s.writable.discard(B)  # B's encoders are still loading
    admit(s, plan("s0", 8), stores=(A, B))
    decided = step(s)
    (read,) = [d for d in decided if isinstance(d, Read)]
    assert [(c.slide.target, c.kind) for c in calls(decided)] == [(A, CallKind.OPEN), (A, CallKind.CHUNK),
                                                                   (A, CallKind.COMMIT)]
    assert s.inflight == 2  # counted once per store
    s.writable.add(B)
    later = step(s)
    assert [d for d in later if isinstance(d, Read)] == []  # not read again
    chunk = calls(later, CallKind.CHUNK)[0]
    assert chunk.slide.target == B and chunk.read is read and [c.kind for c in calls(later)] == [
        CallKind.OPEN, CallKind.CHUNK, CallKind.COMMIT]


def test_a_death_is_charged_to_the_call_its_actor_was_running_not_to_the_others():
    s = scheduler({A: 1}, read_chunk=4)
    admit(s, plan("a", 8), plan("b", 8))
    decided = calls(step(s))
    # sent: a's opening, b's opening, a 0-4, a 4-8, a's commit, b 0-4, b 4-8, b's commit
    by_label = {(c.slide.slide_id, c.label): c for c in decided}
    done_before = {by_label["a", "its opening"], by_label["b", "its opening"], by_label["a", "tiles 0-4"],
                   by_label["a", "tiles 4-8"], by_label["a", "its commit"]}
    decisions = s.actor_died(0, RuntimeError("killed"), succeeded=lambda call: call in done_before)
    slide_a, slide_b = by_label["a", "its opening"].slide, by_label["b", "its opening"].slide
    assert slide_b.deaths == {"tiles 0-4": 1} and slide_a.deaths == {}  # b's first chunk was running
    assert [(type(d), d.slide.slide_id) for d in decisions] == [(Restarted, "a"), (Restarted, "b")]
    assert "its encoder process died (RuntimeError)" in str(decisions[0].why)
    assert s.suspect == {0} and s.inflight == 0
    assert all(not d.slide.token and d.slide.own_tokens and d.slide.restarts == 1 for d in decisions)
    assert calls(step(s)) == []  # nothing is sent to a restarting actor (the chunks are read meanwhile)
    s.actor_back(0)
    assert [c.slide.slide_id for c in calls(step(s), CallKind.OPEN)] == ["a", "b"]  # both written again


def test_a_poison_chunk_fails_its_slide_after_three_deaths():
    s = scheduler({A: 1}, read_chunk=4)
    admit(s, plan("poison", 8))
    tokens = []
    for death in range(1, MAX_CHUNK_RETRIES + 2):
        s.actor_back(0)
        decided = calls(step(s))
        opening, first_chunk = decided[0], decided[1]
        tokens.append(opening.slide.token)
        answer(s, opening)
        decisions = s.actor_died(0, ConnectionError("actor died"), succeeded=lambda call: call is opening)
        assert first_chunk.slide.deaths == {"tiles 0-4": death}
        if death <= MAX_CHUNK_RETRIES:
            assert [type(d) for d in decisions] == [Restarted]
    (ended,) = decisions
    assert isinstance(ended, Ended) and ended.status is SlideStatus.FAILED and isinstance(ended.error, EncoderError)
    assert f"died {1 + MAX_CHUNK_RETRIES} times while encoding tiles 0-4" in str(ended.error)
    assert "ConnectionError" in str(ended.error)
    assert not ended.abort and sorted(ended.abandon) == sorted(tokens)  # its writer died: its rows go by token
    assert s.active == [] and s.inflight == 0


def test_a_lost_actors_slides_are_pinned_again_to_a_live_one():
    s = scheduler({A: 2}, read_chunk=4)
    admit(s, plan("s0", 8), plan("s1", 8), plan("s2", 8))
    assert [slide.actor for slide in s.active] == [0, 1, 0]  # the actor with the fewest slides
    answer(s, *calls(step(s), CallKind.OPEN))
    decisions = s.actor_died(1, RuntimeError("node lost"), succeeded=lambda call: False)
    assert [d.slide.slide_id for d in decisions] == ["s1"]
    reopened = calls(step(s), CallKind.OPEN)
    assert [(c.slide.slide_id, c.slide.actor) for c in reopened] == [("s1", 0)]
    s.actor_died(0, RuntimeError("node lost"), succeeded=lambda call: False)
    assert calls(step(s)) == [] and s.active  # every actor restarting: the slides wait
    s.actor_back(1)
    assert {c.slide.actor for c in calls(step(s), CallKind.OPEN)} == {1}


def test_what_each_ending_is_called():
    s = scheduler({A: 1}, read_chunk=4)
    admit(s, plan("complete", 4), plan("empty", 0), plan("owned", 4))
    decided = calls(step(s))
    by_slide = {c.slide.slide_id: c for c in decided if c.kind is CallKind.OPEN}
    assert [c.kind for c in decided if c.slide.slide_id == "empty"] == [CallKind.OPEN, CallKind.COMMIT]
    skipped = s.answered(by_slide["complete"], "complete")
    assert skipped is not None and skipped.status is SlideStatus.SKIPPED
    (empty,) = answer(s, *[c for c in decided if c.slide.slide_id == "empty"])
    assert empty.status is SlideStatus.EMPTY
    (owned,) = s.slide_error(by_slide["owned"].slide, SlideBusy("another job's lease"))
    assert owned.status is SlideStatus.OWNED and owned.abort  # its live writer removes what it wrote
    assert s.active == [] and s.inflight == 0

    s = scheduler({A: 1})
    admit(s, plan("bad", 4))
    slide = calls(step(s))[0].slide
    (failed,) = s.slide_error(slide, SlideReadError("cannot decode"))
    assert failed.status is SlideStatus.FAILED and failed.abort and not failed.abandon


def test_a_restarted_writer_is_written_again_a_few_times_then_failed():
    s = scheduler({A: 1})
    admit(s, plan("s0", 4))
    for _ in range(MAX_SLIDE_RESTARTS):
        slide = calls(step(s))[0].slide
        assert [type(d) for d in s.slide_error(slide, WriterRestarted("its writer restarted"))] == [Restarted]
    slide = calls(step(s))[0].slide
    (ended,) = s.slide_error(slide, WriterRestarted("again"))
    assert ended.status is SlideStatus.FAILED and not ended.abort and len(ended.abandon) == 1 + MAX_SLIDE_RESTARTS


def test_a_chunk_that_comes_back_short_stops_its_slide():
    s = scheduler({A: 1})
    admit(s, plan("s0", 4))
    opening, chunk, _ = calls(step(s))
    s.answered(opening, "opened")
    with pytest.raises(RuntimeError, match="chunk 0-4 came back as 3 rows"):
        s.answered(chunk, 3)


def test_statuses_are_the_bare_words_everywhere():
    assert [str(status) for status in SlideStatus] == ["done", "empty", "skipped", "owned", "failed", "failed-before"]
    assert json.dumps({"status": SlideStatus.FAILED_BEFORE}) == '{"status": "failed-before"}'
    summary = ExtractionSummary([SlideOutcome("s0", SlideStatus.DONE, 3),
                                 SlideOutcome("s1", SlideStatus.FAILED_BEFORE)])
    assert "s0    done           3" in summary.table() and "s1    failed-before" in summary.table()
    assert summary.count(SlideStatus.DONE) == summary.count("done") == 1 and summary.failed[0].slide_id == "s1"
