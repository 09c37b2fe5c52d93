"""dedupe across the queue and in-flight batches, key=, and ``Batcher.many``.

The batcher-side DataLoader behaviours: an item equal to one already queued or in flight is
not sent again (its caller joins it), ``max_batch_size`` counts distinct items, a caller that
leaves withdraws only itself, and ``many`` gives errors as values.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

import mcs
from mcs.testing import RecordingBatchFn


def sent(batch_fn: RecordingBatchFn[Any, Any]) -> list[list[Any]]:
    return [sorted(batch.items) for batch in batch_fn.batches]


async def test_an_item_in_flight_is_joined_not_sent_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(lambda x: x * 10, delay=1.0)
    results: dict[str, int] = {}

    async def call(name: str, item: int, at: float) -> None:
        await trio.sleep(at)
        results[name] = await batcher(item)

    async with mcs.open_batcher(batch_fn, dedupe=True) as batcher, trio.open_nursery() as n:
        n.start_soon(call, "a", 1, 0.0)
        n.start_soon(call, "b", 2, 0.0)
        n.start_soon(call, "c", 1, 0.5)  # 1 is in flight: joins it
        n.start_soon(call, "d", 3, 0.5)
    assert sent(batch_fn) == [[1, 2], [3]]  # without cross-batch dedupe: [[1, 2], [1, 3]]
    assert results == {"a": 10, "b": 20, "c": 10, "d": 30}
    statistics = batcher.statistics()
    assert (statistics.items, statistics.callers_served) == (3, 4)


async def test_max_batch_size_counts_distinct_items() -> None:
    batch_fn: RecordingBatchFn[str, str] = RecordingBatchFn(str.upper)
    async with mcs.open_batcher(batch_fn, dedupe=True, max_batch_size=3) as batcher:
        async with trio.open_nursery() as nursery:
            for item in "ababc":
                nursery.start_soon(batcher, item)
    assert sent(batch_fn) == [["a", "b", "c"]]


async def test_a_caller_leaving_a_shared_item_leaves_the_others_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(lambda x: x * 10, delay=1.0)
    got: list[int] = []
    async with mcs.open_batcher(batch_fn, dedupe=True) as batcher:
        async with trio.open_nursery() as nursery:
            leaving = trio.CancelScope()

            async def leaver() -> None:
                with leaving:
                    await batcher(7)

            async def stayer() -> None:
                got.append(await batcher(7))

            nursery.start_soon(leaver)
            nursery.start_soon(stayer)
            await trio.sleep(0.5)  # both joined the item in flight
            leaving.cancel()
    assert got == [70]
    assert sent(batch_fn) == [[7]]
    statistics = batcher.statistics()
    assert (statistics.dropped, statistics.callers_served) == (1, 1)


async def test_a_shared_item_is_withdrawn_only_when_all_its_callers_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(lambda x: x, delay=1.0)
    async with mcs.open_batcher(batch_fn, dedupe=True) as batcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher, 0)  # occupies the only slot until 1.0
            await trio.testing.wait_all_tasks_blocked()
            scopes = [trio.CancelScope() for _ in range(2)]

            async def caller(scope: trio.CancelScope) -> None:
                with scope:
                    await batcher(5)

            for scope in scopes:
                nursery.start_soon(caller, scope)
            await trio.sleep(0.25)
            scopes[0].cancel()
            await trio.sleep(0.25)
            assert batcher.statistics().queued == 1  # the other caller still wants it
            scopes[1].cancel()
            await trio.sleep(0.25)
            assert batcher.statistics().queued == 0
    assert sent(batch_fn) == [[0]]  # 5 never reached the downstream
    assert batcher.statistics().withdrawn == 2


async def test_cancel_abandoned_cancels_a_shared_item_once_all_its_callers_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled_at: list[float] = []

    async def slow(items: list[int]) -> list[int]:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            raise
        return items

    async with mcs.open_batcher(slow, dedupe=True, cancel_abandoned=True) as batcher:
        with trio.move_on_after(1):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(batcher, 3)
                nursery.start_soon(batcher, 3)
    assert cancelled_at == [1.0]
    assert batcher.statistics().cancelled_batches == 1


async def test_key_decides_equality_and_looks_up_mapping_results() -> None:
    calls: list[list[dict[str, int]]] = []

    async def by_id(items: list[dict[str, int]]) -> dict[int, str]:
        calls.append(items)
        return {item["id"]: f"user {item['id']}" for item in items}

    def user_id(item: dict[str, int]) -> int:
        return item["id"]

    # A mapping result keyed by key(item), not by the (unhashable) item: BatchFn cannot say so.
    fn = cast(mcs.BatchFn[dict[str, int], str], by_id)
    async with mcs.open_batcher(fn, dedupe=True, key=user_id) as batcher:
        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def call(item: dict[str, int]) -> None:
                results.append(await batcher(item))

            for item in ({"id": 1}, {"id": 2}, {"id": 1, "extra": 9}):
                nursery.start_soon(call, item)
    assert sorted(results) == ["user 1", "user 1", "user 2"]
    assert len(calls) == 1
    assert sorted(item["id"] for item in calls[0]) == [1, 2]


def test_key_needs_dedupe_and_a_function() -> None:
    async def fn(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match=r"^key needs dedupe=True, got dedupe=False$"):
        mcs.Batcher(fn, key=str)
    with pytest.raises(TypeError, match=r"^key must be a function or None, got 3$"):
        mcs.Batcher(fn, dedupe=True, key=3)  # type: ignore[arg-type]


async def test_many_returns_results_in_order_with_errors_as_values() -> None:
    async def lookup(items: list[int]) -> list[int | BaseException]:
        return [LookupError(item) if item < 0 else item * 10 for item in items]

    async with mcs.open_batcher(lookup, dedupe=True) as batcher:
        results = await batcher.many([1, -2, 3, 1])
        assert await batcher.many([]) == []
    assert results[0] == 10
    assert isinstance(results[1], LookupError)
    assert results[1].args == (-2,)
    assert results[2:] == [30, 10]
    statistics = batcher.statistics()
    assert (statistics.batches, statistics.items, statistics.callers_served) == (1, 3, 4)


async def test_many_is_a_checkpoint_and_cancelling_it_withdraws_every_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(lambda x: x, delay=1.0)
    async with mcs.open_batcher(batch_fn) as batcher:
        with trio.testing.assert_checkpoints():
            await batcher.many([])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher, 0)  # holds the only slot until 1.0
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.5):
                await batcher.many([1, 2, 3])
    assert sent(batch_fn) == [[0]]
    assert batcher.statistics().withdrawn == 3


async def test_many_under_reject_gives_overloaded_entries() -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(lambda x: x, delay=1.0)
    async with (
        mcs.open_batcher(batch_fn, queue_size=2, overload="reject", name="db") as batcher,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(batcher, 0)  # in flight
        await trio.testing.wait_all_tasks_blocked()
        results = await batcher.many([1, 2, 3])
    assert results[:2] == [1, 2]
    assert isinstance(results[2], mcs.Overloaded)
    assert str(results[2]) == "batcher 'db' is full (2 items queued)"
    assert batcher.statistics().rejected == 1


async def test_graph_calls_share_items_with_other_callers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(lambda x: x + 1, delay=1.0)
    async with mcs.open_batcher(batch_fn, dedupe=True) as batcher:

        async def request() -> int:
            async with mcs.open_graph() as g:
                node = g.call(batcher, 41)
            return node.result

        results: list[int] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lambda: _append(results, request))
    assert results == [42, 42, 42]
    assert sent(batch_fn) == [[41]]


async def _append(results: list[int], request: Any) -> None:
    results.append(await request())
