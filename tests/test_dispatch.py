"""The batcher's pure parts, without a scheduler: the intake queues and the dispatch decision.

"Which batch leaves now, or what to wait for until when" is a plain function of state and time
(:func:`mcs._dispatch.next_step`); these tests walk it through each state.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from mcs import RateLimit
from mcs._dispatch import Step, next_step
from mcs._intake import _Intake
from mcs._rate import _Gcra
from mcs._requests import RequestState, _Request


class Record(_Request[int, int]):
    __slots__ = ("batch", "item", "state", "t0")

    def __init__(self, item: int, t0: float = 0.0) -> None:
        self.item = item
        self.t0 = t0
        self.state = RequestState.QUEUED
        self.batch = None


Intake = _Intake[Any, Any]


def intake_with(*t0s: float, queue_size: float = math.inf) -> tuple[Intake, list[Record]]:
    intake: _Intake[Any, Any] = _Intake(queue_size)
    intake.closed = False
    records = [Record(i, t0) for i, t0 in enumerate(t0s)]
    for record in records:
        intake.accept(record)
    return intake, records


def step(intake: _Intake[Any, Any], now: float = 0.0, **overrides: Any) -> tuple[Step, float]:
    state: dict[str, Any] = {
        "in_flight": 0,
        "max_in_flight": 1,
        "closed": intake.closed,
        "batch_cap": 100,
        "max_wait": 0.0,
        "gcra": None,
        "rate_counts_items": False,
        "now": now,
    }
    state.update(overrides)
    return next_step(intake, **state)


# ---------------------------------------------------------------- next_step


def test_nothing_queued_waits_for_items_or_stops_once_closed() -> None:
    intake, _ = intake_with()
    assert step(intake) == (Step.FOR_ITEMS, math.inf)
    intake.closed = True
    assert step(intake, now=3.0) == (Step.STOP, 3.0)


def test_a_queued_item_leaves_at_once_when_a_slot_is_free() -> None:
    intake, _ = intake_with(0.0)
    assert step(intake, now=0.5) == (Step.SEND, 0.5)


def test_every_slot_busy_waits_for_a_slot_whatever_is_queued() -> None:
    intake, _ = intake_with(0.0, 0.0)
    assert step(intake, in_flight=2, max_in_flight=2) == (Step.FOR_SLOT, math.inf)
    assert step(intake, in_flight=2, max_in_flight=3)[0] == Step.SEND


def test_max_wait_waits_for_the_batch_to_fill_from_the_oldest_item() -> None:
    intake, _ = intake_with(1.0, 1.5)
    assert step(intake, now=1.5, max_wait=2.0, batch_cap=3) == (Step.FOR_FILL, 3.0)
    assert step(intake, now=3.0, max_wait=2.0, batch_cap=3)[0] == Step.SEND
    # A full batch, or a closed batcher, does not wait.
    assert step(intake, now=1.5, max_wait=2.0, batch_cap=2)[0] == Step.SEND
    intake.closed = True
    assert step(intake, now=1.5, max_wait=2.0, batch_cap=3)[0] == Step.SEND


def test_max_wait_skips_withdrawn_items_to_find_the_oldest() -> None:
    intake, records = intake_with(1.0, 2.0)
    intake.withdraw(records[0])
    assert step(intake, now=2.0, max_wait=1.0, batch_cap=5) == (Step.FOR_FILL, 3.0)


def test_the_rate_limit_says_when_the_next_call_may_start() -> None:
    gcra = _Gcra(RateLimit(2, per=1.0))  # one call every 0.5 s, burst 1
    intake, _ = intake_with(0.0, 0.0)
    assert step(intake, gcra=gcra)[0] == Step.SEND
    gcra.take(1, 0.0)
    assert step(intake, now=0.25, gcra=gcra) == (Step.FOR_RATE, 0.5)
    assert step(intake, now=0.5, gcra=gcra)[0] == Step.SEND


def test_an_item_counted_rate_waits_until_the_whole_batch_fits() -> None:
    gcra = _Gcra(RateLimit(10, per=1.0, burst=3, unit="item"))  # 0.1 s per item
    gcra.take(3, 0.0)  # the burst is spent at 0.0
    intake, _ = intake_with(0.0, 0.0)
    # Two items need two units of room: the TAT is 0.3, so (2 - 3) * 0.1 + 0.3 = 0.2.
    assert step(intake, now=0.0, gcra=gcra, rate_counts_items=True, batch_cap=3) == (
        Step.FOR_RATE,
        0.2,
    )


# ---------------------------------------------------------------- the intake


def test_take_skips_withdrawn_records_and_keeps_order() -> None:
    intake, records = intake_with(0, 0, 0, 0)
    intake.withdraw(records[1])
    batch = intake.take(2)
    assert [r.item for r in batch] == [0, 2]
    assert all(r.state == RequestState.IN_FLIGHT for r in batch)
    assert records[1].state == RequestState.WITHDRAWN
    assert intake.queued == 1


def test_a_full_queue_sends_callers_to_the_room_queue_in_order() -> None:
    intake, _ = intake_with(0, 0, queue_size=2)
    late = [Record(10), Record(11)]
    assert [intake.accept(r) for r in late] == [False, False]
    assert intake.waiting_for_room == 2
    intake.take(1)  # frees one place: the oldest waiting caller gets it
    assert late[0].state == RequestState.QUEUED
    assert late[1].state == RequestState.ROOM


def test_nobody_overtakes_callers_waiting_for_room() -> None:
    intake, records = intake_with(0, queue_size=1)
    waiting = Record(10)
    assert not intake.accept(waiting)
    intake.withdraw(records[0])  # room frees up, but the handing out is upkeep work
    assert intake.needs_upkeep
    assert not intake.accept(Record(11))  # a newcomer queues behind the waiting caller
    intake.upkeep()
    assert waiting.state == RequestState.QUEUED
    assert not intake.needs_upkeep


def test_withdrawing_is_marking_and_compaction_waits_for_upkeep() -> None:
    intake, records = intake_with(*([0.0] * 200))
    for record in records[:150]:
        intake.withdraw(record)
    assert intake.queued == 50
    assert len(intake.queue) == 200  # only marked so far
    assert intake.needs_upkeep
    intake.upkeep()
    assert len(intake.queue) == 50
    assert [r.item for r in intake.take(100)] == list(range(150, 200))


def test_clear_returns_only_live_records() -> None:
    intake, records = intake_with(0, 0, 0, queue_size=2)
    intake.withdraw(records[0])
    assert [r.item for r in intake.clear()] == [1]
    assert [r.item for r in intake.clear_room()] == [2]
    assert (intake.queued, intake.waiting_for_room) == (0, 0)


def test_a_record_in_flight_cannot_be_withdrawn_by_the_intake() -> None:
    intake, _ = intake_with(0)
    (record,) = intake.take(1)
    with pytest.raises(AssertionError):
        intake.withdraw(record)


def test_a_split_part_leaves_first_within_slot_and_rate_limits() -> None:
    intake, _ = intake_with()  # nothing queued: the part alone is reason to send
    assert step(intake, split_units=3) == (Step.SEND, 0.0)
    intake.closed = True  # closed and drained, but a part is waiting: not STOP
    assert step(intake, split_units=3) == (Step.SEND, 0.0)
    intake, _ = intake_with(0.0)
    # max_wait would wait for the batch to fill; a part does not.
    assert step(intake, now=0.5, max_wait=2.0, batch_cap=5, split_units=2) == (Step.SEND, 0.5)
    assert step(intake, in_flight=1, max_in_flight=1, split_units=2) == (Step.FOR_SLOT, math.inf)
    gcra = _Gcra(RateLimit(10, per=1.0, burst=3, unit="item"))  # 0.1 s per item
    gcra.take(3, 0.0)
    # The rate counts the part's own items: (2 - 3) * 0.1 + 0.3 = 0.2.
    assert step(intake, gcra=gcra, rate_counts_items=True, split_units=2) == (Step.FOR_RATE, 0.2)
