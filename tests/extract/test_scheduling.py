"""The extraction's scheduling core on its own, without any executor: what it decides (calls, ends, restarts)
from what it is told (plans back, answers, deaths). A call's ref here is the call itself."""

from __future__ import annotations

import json
from dataclasses import dataclass

from extract.scheduling import CALLS_PER_ENCODER, MAX_DEATH_RETRIES, Call, Ended, Restarted, Scheduler
from extract.summary import ExtractionSummary, SlideOutcome, SlideStatus
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import EncoderError, SlideBusy, SlideReadError

A, B = "store-a", "store-b"  # the driver's stores: any hashable key


@dataclass
class Plan:
    entry: SlideEntry
    tiles: int

    @property
    def n_tiles(self) -> int:
        return self.tiles


def plan(slide_id: str, tiles: int = 8) -> Plan:
    return Plan(SlideEntry(slide_id, f"{slide_id}.svs", slide_id), tiles)


def scheduler(actors: int = 1, writable: bool = True) -> Scheduler:
    s = Scheduler()
    s.add_actors(range(actors))
    s.writable = writable
    return s


def prepared(s: Scheduler, *plans: Plan, stores: tuple[str, ...] = (A,)) -> None:
    for p in plans:
        s.waiting.append((p.entry, list(stores)))
    s.max_prepare = len(plans) + len(s.prepared)
    for entry, lacking in s.to_prepare():
        s.prepared_slide(next(p for p in plans if p.entry is entry), lacking)


def send(s: Scheduler) -> list[Call]:
    """What a driver does: each call gets its ref (here: itself)."""
    calls = s.send(now=0.0)
    for call in calls:
        call.ref = call
    return calls


class Died(Exception):
    pass


def never(_: Call) -> bool:
    return False


def test_preparing_is_bounded_and_each_encoder_holds_two_slides():
    s = scheduler(actors=2)
    plans = [plan(f"s{i}") for i in range(8)]
    s.waiting.extend((p.entry, [A]) for p in plans)
    s.max_prepare = 3
    assert len(s.to_prepare()) == 3 and s.to_prepare() == []  # bounded until plans come back
    for p in plans[:3]:
        s.prepared_slide(p, [A])
    assert [c.slide.slide_id for c in send(s)] == ["s0", "s1", "s2"]
    prepared(s, *plans[3:])
    calls = send(s)
    assert len(calls) == 1  # 2 encoders × CALLS_PER_ENCODER: the rest wait, planned
    assert CALLS_PER_ENCODER == 2 and sorted(c.actor for c in s.outstanding()) == [0, 0, 1, 1]
    s.answered(s.outstanding()[0])
    assert len(send(s)) == 1  # an answer makes room for one more


def test_nothing_is_sent_before_the_stores_open():
    s = scheduler(writable=False)
    prepared(s, plan("s0"))
    assert send(s) == []
    s.writable = True
    assert [c.slide.slide_id for c in send(s)] == ["s0"]


def test_one_call_per_slide_for_every_store_that_lacks_it():
    s = scheduler()
    prepared(s, plan("s0", 100_000), stores=(A, B))
    (call,) = send(s)
    assert call.slide.targets == [A, B] and call.slide.token  # one call, whatever the number of tiles or stores
    assert send(s) == []


def test_slides_go_to_the_encoder_with_the_fewest_calls():
    s = scheduler(actors=3)
    prepared(s, *(plan(f"s{i}") for i in range(4)))
    assert [c.actor for c in send(s)] == [0, 1, 2, 0]


def test_a_death_is_charged_to_the_slide_its_encoder_was_running_not_to_the_next():
    s = scheduler()
    prepared(s, plan("a"), plan("b"))
    first, second = send(s)
    decisions = s.actor_died(0, Died(), never)
    assert [(type(d), d.slide.slide_id) for d in decisions] == [(Restarted, "a"), (Restarted, "b")]
    assert first.slide.deaths == 1 and second.slide.deaths == 0
    assert s.outstanding() == [] and send(s) == []  # nothing goes to a restarting encoder
    s.actor_back(0)
    again = send(s)
    assert [c.slide.slide_id for c in again] == ["a", "b"]  # restarted slides first, oldest first
    assert again[0].slide.own_tokens == [first.slide.own_tokens[0]] and again[0].slide.token != ""


def test_a_call_that_succeeded_before_the_death_is_not_sent_again():
    s = scheduler()
    prepared(s, plan("a"), plan("b"))
    first, second = send(s)
    decisions = s.actor_died(0, Died(), lambda call: call is first)
    assert [d.slide.slide_id for d in decisions] == ["b"] and second.slide.deaths == 1
    assert first.slide.call is first  # its answer is still to be read


def test_a_slide_that_kills_its_encoder_three_times_fails_and_its_writers_leases_are_abandoned():
    s = scheduler()
    prepared(s, plan("poison"))
    tokens = []
    for death in range(1 + MAX_DEATH_RETRIES):
        (call,) = send(s)
        tokens.append(call.slide.token)
        decisions = s.actor_died(0, Died(), never)
        s.actor_back(0)
    (ended,) = decisions
    assert isinstance(ended, Ended) and ended.status is SlideStatus.FAILED and isinstance(ended.error, EncoderError)
    assert "died 3 times" in str(ended.error) and sorted(ended.abandon) == sorted(tokens)
    assert s.active == [] and not s.busy


def test_a_lost_encoders_slides_go_to_a_live_one():
    s = scheduler(actors=2)
    prepared(s, plan("s0"), plan("s1"), plan("s2"))
    s0, s1, s2 = send(s)
    assert [s0.actor, s1.actor, s2.actor] == [0, 1, 0]
    s.actor_died(1, Died(), never)  # its node is gone: it never comes back
    assert send(s) == []  # the live one is full
    s.answered(s0)
    (moved,) = send(s)
    assert (moved.slide.slide_id, moved.actor) == ("s1", 0) and moved.slide.own_tokens == [s1.slide.own_tokens[0]]


def test_a_read_error_ends_the_slide_in_every_store_and_another_jobs_slide_is_owned():
    s = scheduler()
    prepared(s, plan("bad"), plan("theirs"), stores=(A, B))
    bad, theirs = send(s)
    (ended,) = s.slide_error(bad.slide, SlideReadError("tile 3 of bad.svs cannot be decoded"))
    assert ended.status is SlideStatus.FAILED and ended.slide.targets == [A, B] and ended.abandon == []
    (owned,) = s.slide_error(theirs.slide, SlideBusy("another job writes it"))
    assert owned.status is SlideStatus.OWNED and not s.busy


def test_statuses_are_the_bare_words_everywhere():
    assert [str(status) for status in SlideStatus] == ["done", "empty", "skipped", "owned", "failed", "failed-before"]
    assert json.dumps({"status": SlideStatus.FAILED_BEFORE}) == '{"status": "failed-before"}'
    summary = ExtractionSummary([SlideOutcome("s0", SlideStatus.DONE, 3),
                                 SlideOutcome("s1", SlideStatus.FAILED_BEFORE)])
    table = summary.table().splitlines()  # the status column as wide as failed-before: tiles stay aligned
    assert table[1] == "s0    done                3                  -     0.0" and table[2].startswith("s1    failed-before       -")
    end = table[0].index("tiles") + len("tiles") - 1  # the tiles column's last character, right-aligned
    assert table[1][end] == "3" and table[2][end] == "-"
    assert summary.count(SlideStatus.DONE) == summary.count("done") == 1 and summary.failed[0].slide_id == "s1"
