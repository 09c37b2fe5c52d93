"""``on_batch_error="split"``: an item that breaks its whole batch fails alone.

On trio's virtual clock (``autojump_clock``), with exact times. The property test draws any set
of poison items in any batches, with any batch size, concurrency and rate limit.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import arrival_patterns, max_batch_sizes, max_in_flights, rate_limits

import mcs

RateOracle = Callable[[Sequence[tuple[float, int]], mcs.RateLimit], list[str]]


class Poison(Exception):
    """The error an item raises when it is alone in its batch."""


class BatchBroken(Exception):
    """What the downstream raises for a batch with a poison item in it."""


class Downstream:
    """A batch_fn that breaks on poison items, and records every call."""

    def __init__(self, poison: set[int], duration: float = 1.0) -> None:
        self.poison = poison
        self.duration = duration
        self.calls: list[tuple[float, list[int]]] = []
        self.running = self.peak = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append((trio.current_time(), list(items)))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await trio.sleep(self.duration)
        finally:
            self.running -= 1
        bad = sorted(self.poison.intersection(items))
        if len(items) == 1 and bad:
            raise Poison(f"item {bad[0]} is poison")
        if bad:
            raise BatchBroken(f"a batch of {len(items)} items broke")
        return [item * 10 for item in items]


async def outcome(batcher: mcs.Batcher[int, int], item: int, into: dict[int, Any]) -> None:
    try:
        into[item] = await batcher(item)
    except Exception as exc:
        into[item] = exc


async def test_one_poison_item_fails_alone_and_the_rest_get_their_results(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({5})
    async with mcs.open_batcher(
        downstream, max_batch_size=8, max_in_flight=2, on_batch_error="split"
    ) as batcher:
        outcomes = dict(enumerate(await batcher.many(range(8))))  # queued in this order
    # Bisection: 8 fail at 0; 0-3 and 4-7 at 1 (4-7 fails); 4-5 and 6-7 at 2 (4-5 fails);
    # 4 and 5 at 3: 5 fails alone.
    # (Batch tasks started together run in any order: compare sorted.)
    assert sorted(downstream.calls) == [
        (0.0, [0, 1, 2, 3, 4, 5, 6, 7]),
        (1.0, [0, 1, 2, 3]),
        (1.0, [4, 5, 6, 7]),
        (2.0, [4, 5]),
        (2.0, [6, 7]),
        (3.0, [4]),
        (3.0, [5]),
    ]
    assert {item: value for item, value in outcomes.items() if item != 5} == {
        i: i * 10 for i in range(8) if i != 5
    }
    error = outcomes[5]
    assert isinstance(error, Poison)
    assert str(error) == "item 5 is poison"
    frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert frames[-1] == "__call__"  # its own traceback, from its own call
    stats = batcher.statistics()
    assert (stats.batches, stats.failed_batches, stats.split_batches) == (7, 4, 3)
    assert stats.failed_alone == 1
    assert stats.callers_served == 8


async def test_the_default_still_fails_the_whole_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({2})
    outcomes: dict[int, Any] = {}
    async with mcs.open_batcher(downstream, max_batch_size=4) as batcher:
        async with trio.open_nursery() as nursery:
            for item in range(4):
                nursery.start_soon(outcome, batcher, item, outcomes)
    assert len(downstream.calls) == 1
    assert all(isinstance(error, BatchBroken) for error in outcomes.values())
    assert batcher.statistics().split_batches == 0


async def test_a_timed_out_part_is_not_split_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({0}, duration=1.0)
    outcomes: dict[int, Any] = {}
    async with mcs.open_batcher(
        downstream, max_batch_size=4, batch_timeout=0.5, on_batch_error="split"
    ) as batcher:
        async with trio.open_nursery() as nursery:
            for item in range(4):
                nursery.start_soon(outcome, batcher, item, outcomes)
    assert len(downstream.calls) == 1  # a timeout is no batch_fn error: nothing to bisect
    assert all(isinstance(error, trio.TooSlowError) for error in outcomes.values())
    assert batcher.statistics().split_batches == 0


async def test_callers_who_leave_during_a_split_are_not_sent_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({1})
    outcomes: dict[int, Any] = {}
    async with mcs.open_batcher(
        downstream, max_batch_size=4, max_in_flight=1, on_batch_error="split"
    ) as batcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outcome, batcher, 100, outcomes)  # holds the slot until 1.0
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as leavers:
                for item in range(4):  # queued in this order
                    (leavers if item >= 2 else nursery).start_soon(outcome, batcher, item, outcomes)
                    await trio.testing.wait_all_tasks_blocked()
                # 0-3 fail at 2.0; the part 0-1 runs from 2.0, the part 2-3 waits for the slot.
                await trio.sleep_until(2.5)
                leavers.cancel_scope.cancel()
    assert downstream.calls == [
        (0.0, [100]),
        (1.0, [0, 1, 2, 3]),
        (2.0, [0, 1]),
        (3.0, [0]),  # the part 2-3 was never sent: both its callers had left
        (4.0, [1]),
    ]
    assert sorted(outcomes) == [0, 1, 100]
    assert outcomes[0] == 0
    assert isinstance(outcomes[1], Poison)
    stats = batcher.statistics()
    assert (stats.dropped, stats.withdrawn) == (2, 0)
    assert stats.batches == 5


async def test_dedupe_shares_the_poison_error_between_the_callers_of_the_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({3})
    results: list[Any] = []

    async def call(item: int) -> None:
        try:
            results.append((item, await batcher(item)))
        except Poison as exc:
            results.append((item, exc))

    async with mcs.open_batcher(
        downstream, max_batch_size=4, dedupe=True, on_batch_error="split"
    ) as batcher:
        async with trio.open_nursery() as nursery:
            for item in (0, 3, 1, 3, 2):
                nursery.start_soon(call, item)
    poisoned = [value for item, value in results if item == 3]
    assert len(poisoned) == 2
    assert all(isinstance(value, Poison) for value in poisoned)
    assert sorted((i, v) for i, v in results if i != 3) == [(0, 0), (1, 10), (2, 20)]
    assert batcher.statistics().failed_alone == 1  # one item, shared by two callers


async def test_a_batch_split_as_the_block_closes_still_finishes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({0})
    outcomes: dict[int, Any] = {}
    async with trio.open_nursery() as nursery:
        async with mcs.open_batcher(
            downstream, max_batch_size=2, on_batch_error="split"
        ) as batcher:
            for item in range(2):
                nursery.start_soon(outcome, batcher, item, outcomes)
            await trio.testing.wait_all_tasks_blocked()
        # The block closed while the batch ran; it failed at 1.0 and its parts ran one at a
        # time (max_in_flight=1) until 3.0, before the block ended.
        assert trio.current_time() == 3.0
    assert isinstance(outcomes[0], Poison)
    assert outcomes[1] == 10


def test_a_bad_on_batch_error_is_refused_at_construction() -> None:
    async def batch_fn(items: list[int]) -> list[int]:
        return items

    with pytest.raises(
        ValueError, match=r"^on_batch_error must be 'fail' or 'split', got 'retry'$"
    ):
        mcs.Batcher(batch_fn, on_batch_error="retry")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the property


@st.composite
def split_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    times = draw(arrival_patterns(max_calls=24))
    poison = draw(st.sets(st.sampled_from(range(len(times))))) if times else set()
    return {
        "times": times,
        "poison": poison,
        "max_batch_size": draw(st.one_of(max_batch_sizes, st.integers(7, 16))),
        "max_in_flight": draw(max_in_flights),
        "rate": draw(st.one_of(st.none(), rate_limits())),
        "duration": draw(st.sampled_from([0.0, 0.125, 1.0])),
    }


@settings(max_examples=150, deadline=None)
@given(scenario=split_scenarios())
def test_split_isolates_any_poison_items_within_every_limit(
    scenario: dict[str, Any],
    rate_bound_violations: RateOracle,
    mcs_tasks: Callable[[], list[str]],
) -> None:
    times, poison = scenario["times"], scenario["poison"]
    cap, rate = scenario["max_batch_size"], scenario["rate"]
    downstream = Downstream(poison, scenario["duration"])
    outcomes: dict[int, Any] = {}

    async def main() -> None:
        async def arrive(item: int, at: float) -> None:
            await trio.sleep_until(at)
            await outcome(batcher, item, outcomes)

        with trio.fail_after(10_000):
            async with mcs.open_batcher(
                downstream,
                max_batch_size=cap,
                max_in_flight=scenario["max_in_flight"],
                rate=rate,
                on_batch_error="split",
            ) as batcher:
                async with trio.open_nursery() as nursery:
                    for item, at in enumerate(times):
                        nursery.start_soon(arrive, item, at)
        assert mcs_tasks() == []
        stats = batcher.statistics()
        assert stats.failed_alone == len(poison)
        assert stats.split_batches == sum(
            1 for _, items in downstream.calls if len(items) > 1 and poison.intersection(items)
        )

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Everyone gets exactly their own outcome.
    assert sorted(outcomes) == list(range(len(times)))
    for item, got in outcomes.items():
        if item in poison:
            assert isinstance(got, Poison)
            assert str(got) == f"item {item} is poison"
        else:
            assert got == item * 10
    # At most 2 ceil(log2 n) extra calls per poison item, n the largest batch.
    seen: set[int] = set()
    first_calls = 0
    for _, items in downstream.calls:
        if not seen.issuperset(items):
            first_calls += 1
        seen.update(items)
    extra = len(downstream.calls) - first_calls
    assert extra <= 2 * len(poison) * math.ceil(math.log2(cap)) if cap > 1 else extra == 0
    # Every limit held, parts included.
    assert downstream.peak <= scenario["max_in_flight"]
    if rate is not None:
        counted = [(at, len(items) if rate.unit == "item" else 1) for at, items in downstream.calls]
        assert rate_bound_violations(counted, rate) == []


async def test_parts_waiting_when_the_block_is_aborted_fail_their_callers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({0})
    outcomes: dict[int, Any] = {}
    aborted = []
    try:
        async with trio.open_nursery() as nursery:
            async with mcs.open_batcher(
                downstream, max_batch_size=4, on_batch_error="split"
            ) as batcher:
                for item in range(4):
                    nursery.start_soon(outcome, batcher, item, outcomes)
                await trio.sleep(1.5)  # failed at 1.0; part 0-1 runs, part 2-3 waits
                raise RuntimeError("abort")
    except* RuntimeError as group:
        aborted.append(group)
    assert len(aborted) == 1
    assert sorted(outcomes) == [0, 1, 2, 3]  # nobody hangs
    for item in range(4):
        assert isinstance(outcomes[item], trio.BrokenResourceError)
    assert (
        str(outcomes[2]) == f"batcher {batcher.name!r} was shut down while this item was in flight"
    )


async def test_cancel_abandoned_cancels_a_running_part_whose_callers_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream({0})
    outcomes: dict[int, Any] = {}
    async with mcs.open_batcher(
        downstream,
        max_batch_size=4,
        max_wait=0.5,  # the four calls leave together, as one full batch
        max_in_flight=2,
        cancel_abandoned=True,
        on_batch_error="split",
    ) as batcher:
        async with trio.open_nursery() as nursery:
            for item in (0, 1):
                nursery.start_soon(outcome, batcher, item, outcomes)
                await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as leavers:
                for item in (2, 3):
                    leavers.start_soon(outcome, batcher, item, outcomes)
                    await trio.testing.wait_all_tasks_blocked()
                await trio.sleep_until(1.5)  # [0..3] failed at 1.0; parts 0-1 and 2-3 run
                leavers.cancel_scope.cancel()
    assert sorted(downstream.calls) == [
        (0.0, [0, 1, 2, 3]),
        (1.0, [0, 1]),
        (1.0, [2, 3]),
        (2.0, [0]),
        (2.0, [1]),
    ]
    assert sorted(outcomes) == [0, 1]
    assert isinstance(outcomes[0], Poison)
    assert outcomes[1] == 10
    stats = batcher.statistics()
    assert stats.cancelled_batches == 1  # the part 2-3, at 1.5, when its callers left
    assert trio.current_time() == 3.0
