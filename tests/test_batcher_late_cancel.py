"""Callers who leave between the dispatcher taking their batch and batch_fn starting."""

from __future__ import annotations

import trio
import trio.abc
import trio.lowlevel
import trio.testing

import mcs


class CancelWhenBatchTaskSpawns(trio.abc.Instrument):
    """Cancels a scope at the exact moment the batcher spawns the task of its next batch: after
    the dispatcher took the batch, before batch_fn started. Reaches that state deterministically
    rather than by trio's scheduling order."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.fired = False

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if not self.fired and task.name.endswith("._run"):
            self.fired = True
            self.scope.cancel()


async def test_an_item_whose_caller_left_before_its_batch_started_is_never_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[list[int]] = []

    async def batch_fn(items: list[int]) -> list[int]:
        sent.append(items)
        await trio.sleep(1.0)
        return items

    leaving = trio.CancelScope()
    instrument = CancelWhenBatchTaskSpawns(leaving)

    async def leaving_caller(batcher: mcs.Batcher[int, int]) -> None:
        with leaving:
            await batcher(1)
            raise AssertionError("the cancelled caller got a result")

    trio.lowlevel.add_instrument(instrument)
    try:
        async with mcs.open_batcher(batch_fn) as batcher, trio.open_nursery() as nursery:
            nursery.start_soon(leaving_caller, batcher)
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert instrument.fired
    statistics = batcher.statistics()
    assert sent == []  # a batch left empty is not sent
    assert (statistics.batches, statistics.items) == (0, 0)
    assert (statistics.withdrawn, statistics.dropped) == (1, 0)
    assert (statistics.queued, statistics.in_flight) == (0, 0)


async def test_only_the_callers_who_left_are_kept_out_of_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[list[int]] = []

    async def batch_fn(items: list[int]) -> list[int]:
        sent.append(items)
        return items

    leaving = trio.CancelScope()
    instrument = CancelWhenBatchTaskSpawns(leaving)
    results: list[int] = []

    async def staying_caller(batcher: mcs.Batcher[int, int]) -> None:
        results.append(await batcher(0))

    async def leaving_caller(batcher: mcs.Batcher[int, int]) -> None:
        with leaving:
            await batcher(1)

    trio.lowlevel.add_instrument(instrument)
    try:
        async with mcs.open_batcher(batch_fn) as batcher, trio.open_nursery() as nursery:
            nursery.start_soon(staying_caller, batcher)
            nursery.start_soon(leaving_caller, batcher)
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert sent == [[0]]
    assert results == [0]
    statistics = batcher.statistics()
    assert (statistics.batches, statistics.items, statistics.callers_served) == (1, 1, 1)
    assert (statistics.withdrawn, statistics.dropped) == (1, 0)
