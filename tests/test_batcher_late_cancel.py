"""Callers who leave between the dispatcher taking their batch and batch_fn starting."""

from __future__ import annotations

import trio
import trio.testing

import mcs


async def test_an_item_whose_caller_left_before_its_batch_started_is_never_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Batch 1 (item 0) ends at 1.0. In the next scheduler pass two tasks run in an order trio
    # picks at random: the dispatcher, which takes item 1 into a new batch, and the caller of
    # item 0, which cancels the caller of item 1. Either way item 1 must never reach batch_fn,
    # and a batch left empty must not be sent. Repeat to cover both orders.
    sent: list[list[int]] = []

    async def batch_fn(items: list[int]) -> list[int]:
        sent.append(items)
        await trio.sleep(1.0)
        return items

    async def first_caller(batcher: mcs.Batcher[int, int], second: trio.CancelScope) -> None:
        assert await batcher(0) == 0
        second.cancel()

    async def second_caller(batcher: mcs.Batcher[int, int], second: trio.CancelScope) -> None:
        with second:
            await batcher(1)
            raise AssertionError("the cancelled caller got a result")

    for _ in range(30):
        sent.clear()
        async with mcs.open_batcher(batch_fn) as batcher, trio.open_nursery() as nursery:
            second = trio.CancelScope()

            nursery.start_soon(first_caller, batcher, second)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second_caller, batcher, second)
        statistics = batcher.statistics()
        assert sent == [[0]]
        assert (statistics.batches, statistics.items) == (1, 1)
        assert (statistics.withdrawn, statistics.dropped) == (1, 0)
        assert (statistics.queued, statistics.in_flight) == (0, 0)
