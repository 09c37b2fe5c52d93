"""Failure paths of a batcher: whatever batch_fn or a caller does, each caller gets exactly its
own outcome, nothing hangs, no traceback carries another caller's frames, nothing leaks.

Each test is bounded by ``trio.fail_after`` (virtual time where a clock is used), so a hang
fails the test instead of the run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, overload

import pytest
import trio
import trio.lowlevel
import trio.testing

import mcs
import mcs._requests

TaskLister = Any


def frame_names(tb: TracebackType | None) -> list[str]:
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def frame_locals(tb: TracebackType | None, name: str) -> list[object]:
    """The value of local ``name`` in every frame of the traceback that has one."""
    found = []
    while tb is not None:
        if name in tb.tb_frame.f_locals:
            found.append(tb.tb_frame.f_locals[name])
        tb = tb.tb_next
    return found


class Marker:
    """Something a caller's frame holds, so a test can see whether that frame is alive."""


# ---------------------------------------------------------------- one exception, many callers


async def test_a_shared_sentinel_carries_only_its_callers_frames() -> None:
    not_found = LookupError("not found")

    async def lookup(items: list[int]) -> list[object]:
        await trio.lowlevel.checkpoint()
        return [not_found for _ in items]

    seen: dict[int, tuple[list[object], int]] = {}
    same: list[bool] = []

    async def caller(batcher: mcs.Batcher[int, object], me: int) -> None:
        request_id = me
        try:
            await batcher(me)
        except LookupError as error:
            tb = error.__traceback__
            seen[request_id] = (frame_locals(tb, "request_id"), len(frame_names(tb)))
            same.append(error is not_found)

    with trio.fail_after(5):
        async with mcs.open_batcher(lookup, max_batch_size=7) as batcher:
            for round_ in range(3):  # several batches and several rounds of the same object
                async with trio.open_nursery() as nursery:
                    for me in range(round_ * 100, round_ * 100 + 100):
                        nursery.start_soon(caller, batcher, me)
    assert len(seen) == 300
    assert all(same)
    assert all(ids == [me] for me, (ids, _) in seen.items())
    assert len({depth for _, depth in seen.values()}) == 1  # no growth from raise to raise


async def test_a_shared_sentinel_keeps_no_callers_frames_alive() -> None:
    not_found = LookupError("not found")

    async def lookup(items: list[int]) -> list[object]:
        return [not_found for _ in items]

    markers: list[weakref.ref[Marker]] = []

    async def caller(batcher: mcs.Batcher[int, object], me: int) -> None:
        held = Marker()  # stands for whatever a request's frames hold (a 1 MB buffer, say)
        markers.append(weakref.ref(held))
        with pytest.raises(LookupError):
            await batcher(me)

    with trio.fail_after(60):
        async with mcs.open_batcher(lookup) as batcher, trio.open_nursery() as nursery:
            for me in range(10_000):
                nursery.start_soon(caller, batcher, me)
    gc.collect()
    # The sentinel still holds the traceback of its last raise (Python puts it there), and
    # nothing more: one caller's frames at most, however many callers raised it.
    assert sum(ref() is not None for ref in markers) <= 1


async def test_a_batch_error_gives_each_caller_only_its_own_frames() -> None:
    async def broken(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        raise ValueError("downstream is down")

    traces: dict[int, TracebackType | None] = {}

    async def caller(batcher: mcs.Batcher[int, int], me: int) -> None:
        request_id = me
        try:
            await batcher(request_id)
        except ValueError as error:
            traces[me] = error.__traceback__

    with trio.fail_after(5):
        async with mcs.open_batcher(broken) as batcher, trio.open_nursery() as nursery:
            for me in range(20):
                nursery.start_soon(caller, batcher, me)
    assert sorted(traces) == list(range(20))
    for me, tb in traces.items():
        assert frame_locals(tb, "request_id") == [me]
        assert "broken" in frame_names(tb)  # the original traceback is kept
    assert len({len(frame_names(tb)) for tb in traces.values()}) == 1


async def test_a_batch_fn_raising_one_error_object_gives_each_caller_only_its_own_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch_fn that raises the same exception object every time (a cached "circuit open",
    say). Python adds each raise's frames on top of the traceback the object already has, so
    without care every caller would carry the frames of every caller before it, and each
    failed batch would log a longer traceback than the last."""
    down = OSError("downstream is down")

    async def broken(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        raise down

    seen: dict[int, tuple[list[object], list[str]]] = {}
    same: list[bool] = []

    async def caller(batcher: mcs.Batcher[int, int], me: int) -> None:
        request_id = me
        try:
            await batcher(request_id)
        except OSError as error:
            same.append(error is down)
            tb = error.__traceback__
            seen[request_id] = (frame_locals(tb, "request_id"), frame_names(tb))

    caplog.set_level(logging.WARNING, logger="mcs")
    with trio.fail_after(5):
        async with mcs.open_batcher(broken, max_batch_size=7) as batcher:
            for round_ in range(3):  # several batches, and several rounds of the same object
                async with trio.open_nursery() as nursery:
                    for me in range(round_ * 30, round_ * 30 + 30):
                        nursery.start_soon(caller, batcher, me)
    assert len(seen) == 90
    assert all(same)  # the very object batch_fn raised
    assert all(ids == [me] for me, (ids, _) in seen.items())
    assert len({tuple(names) for _, names in seen.values()}) == 1  # no growth
    names = next(iter(seen.values()))[1]
    assert names.count("broken") == 1  # the raise itself, once
    logged = [record.exc_info[2] for record in caplog.records if record.exc_info]
    assert len(logged) == 15  # one line per failed batch
    assert len({len(frame_names(tb)) for tb in logged}) == 1
    assert all(frame_locals(tb, "request_id") == [] for tb in logged)


async def test_one_error_object_raised_in_a_thread_keeps_the_threads_frames() -> None:
    """The error comes back from ``trio.to_thread.run_sync`` (raised again in the batch task,
    on top of the thread's frames): those frames are the useful part, and stay."""
    down = OSError("downstream is down")

    def blocking_query(items: list[int]) -> list[int]:
        raise down

    async def query(items: list[int]) -> list[int]:
        return await trio.to_thread.run_sync(blocking_query, items)

    seen: dict[int, tuple[list[object], list[str]]] = {}

    async def caller(batcher: mcs.Batcher[int, int], me: int) -> None:
        request_id = me
        try:
            await batcher(request_id)
        except OSError as error:
            tb = error.__traceback__
            seen[request_id] = (frame_locals(tb, "request_id"), frame_names(tb))

    with trio.fail_after(5):
        async with mcs.open_batcher(query, max_batch_size=5) as batcher:
            for round_ in range(3):
                async with trio.open_nursery() as nursery:
                    for me in range(round_ * 10, round_ * 10 + 10):
                        nursery.start_soon(caller, batcher, me)
    assert len(seen) == 30
    assert all(ids == [me] for me, (ids, _) in seen.items())
    assert len({tuple(names) for _, names in seen.values()}) == 1
    names = next(iter(seen.values()))[1]
    assert names.count("query") == names.count("blocking_query") == 1


async def test_one_error_object_raised_again_where_it_was_caught_keeps_its_origin() -> None:
    down = OSError("downstream is down")

    def connect() -> None:
        raise down

    async def query(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        try:
            connect()
        except OSError as error:
            raise error  # the same object, raised again in this frame
        return items

    names: list[tuple[str, ...]] = []

    async def caller(batcher: mcs.Batcher[int, int], me: int) -> None:
        try:
            await batcher(me)
        except OSError as error:
            names.append(tuple(frame_names(error.__traceback__)))

    with trio.fail_after(5):
        async with mcs.open_batcher(query, max_batch_size=4) as batcher:
            for round_ in range(3):
                async with trio.open_nursery() as nursery:
                    for me in range(4):
                        nursery.start_soon(caller, batcher, round_ * 4 + me)
    assert len(names) == 12
    assert len(set(names)) == 1
    assert names[0].count("connect") == 1
    assert names[0].count("caller") == 1


async def test_an_error_from_a_batcher_called_by_batch_fn_keeps_where_it_was_raised() -> None:
    """Batchers in a chain: the outer batch_fn calls an inner batcher, whose batch_fn raises.
    The outer callers' traceback goes down to the inner raise, once."""

    async def inner_query(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        raise LookupError("row missing")

    names: list[tuple[str, ...]] = []

    async def caller(outer: mcs.Batcher[int, int], me: int) -> None:
        request_id = me
        try:
            await outer(request_id)
        except LookupError as error:
            tb = error.__traceback__
            assert frame_locals(tb, "request_id") == [me]
            names.append(tuple(frame_names(tb)))

    with trio.fail_after(5):
        async with mcs.open_batcher(inner_query, max_batch_size=3) as inner:

            async def outer_query(items: list[int]) -> list[int]:
                return [await inner(item) for item in items]

            async with mcs.open_batcher(outer_query, max_batch_size=3) as outer:
                for round_ in range(2):
                    async with trio.open_nursery() as nursery:
                        for me in range(3):
                            nursery.start_soon(caller, outer, round_ * 3 + me)
    assert len(names) == 6
    assert len(set(names)) == 1
    assert names[0].count("inner_query") == 1
    assert names[0].count("outer_query") == 1


async def test_a_batch_fn_raising_one_error_object_keeps_no_callers_frames_alive() -> None:
    down = OSError("downstream is down")

    async def broken(items: list[int]) -> list[int]:
        raise down

    markers: list[weakref.ref[Marker]] = []

    async def caller(batcher: mcs.Batcher[int, int], me: int) -> None:
        held = Marker()
        markers.append(weakref.ref(held))
        with pytest.raises(OSError, match="downstream is down"):
            await batcher(me)

    with trio.fail_after(60):
        async with mcs.open_batcher(broken, max_batch_size=10) as batcher:
            for _ in range(100):  # one batch after another
                async with trio.open_nursery() as nursery:
                    for me in range(10):
                        nursery.start_soon(caller, batcher, me)
    gc.collect()
    # What Python leaves on the object: the traceback of its last raise, one caller's frames.
    assert sum(ref() is not None for ref in markers) <= 1


# ---------------------------------------------------------------- batch_fn misbehaves


async def test_a_batch_fn_that_filters_its_items_in_place_fails_that_batch_only() -> None:
    async def drops_odd_items(items: list[int]) -> list[int]:
        items[:] = [item for item in items if item % 2 == 0]
        return [item * 10 for item in items]

    outcomes: dict[int, object] = {}

    async def caller(batcher: mcs.Batcher[int, int], item: int) -> None:
        try:
            outcomes[item] = await batcher(item)
        except mcs.BatchResultError as error:
            outcomes[item] = str(error)

    with trio.fail_after(5):
        async with mcs.open_batcher(drops_odd_items) as batcher:
            async with trio.open_nursery() as nursery:
                for item in range(4):
                    nursery.start_soon(caller, batcher, item)
            assert await batcher(2) == 20  # the batcher is unharmed
    message = "batcher 'test_a_batch_fn_that_filters_its_items_in_place_fails_that_batch_only.<locals>.drops_odd_items': batch_fn returned 2 results for 4 items"  # noqa: E501
    assert outcomes == dict.fromkeys(range(4), message)


async def test_a_batch_fn_that_empties_its_items_still_answers_by_key() -> None:
    async def keyed(items: list[int]) -> dict[int, int]:
        answer = {item: item * 10 for item in items}
        items.clear()
        items.append(99)
        return answer

    with trio.fail_after(5):
        async with mcs.open_batcher(keyed) as batcher, trio.open_nursery() as nursery:
            results: dict[int, int] = {}

            async def caller(item: int) -> None:
                results[item] = await batcher(item)

            for item in range(5):
                nursery.start_soon(caller, item)
    assert results == {item: item * 10 for item in range(5)}


class Touchy:
    """An item whose hash or equality raises, as a buggy key type does."""

    def __init__(self, value: int, *, bad_hash: bool = False, bad_eq: bool = False) -> None:
        self.value = value
        self.bad_hash = bad_hash
        self.bad_eq = bad_eq

    def __hash__(self) -> int:
        if self.bad_hash:
            raise RuntimeError("hash exploded")
        return 0 if self.bad_eq else hash(self.value)

    def __eq__(self, other: object) -> bool:
        if self.bad_eq or (isinstance(other, Touchy) and other.bad_eq):
            raise RuntimeError("eq exploded")
        return isinstance(other, Touchy) and other.value == self.value

    def __repr__(self) -> str:
        return f"Touchy({self.value})"


async def gather(batcher: mcs.Batcher[Any, Any], items: Sequence[Any]) -> list[object]:
    """Call the batcher once per item concurrently; each outcome as a value or the error."""
    outcomes: list[object] = [None] * len(items)

    async def one(i: int) -> None:
        try:
            outcomes[i] = await batcher(items[i])
        except Exception as error:
            outcomes[i] = error

    async with trio.open_nursery() as nursery:
        for i in range(len(items)):
            nursery.start_soon(one, i)
    return outcomes


@pytest.mark.parametrize("bad", ["hash", "eq"])
async def test_under_dedupe_an_item_that_cannot_be_compared_fails_alone(bad: str) -> None:
    async def values(items: list[Touchy]) -> list[int]:
        return [item.value for item in items]

    items = [
        Touchy(1),
        Touchy(2, bad_hash=bad == "hash", bad_eq=bad == "eq"),
        Touchy(3, bad_eq=bad == "eq"),
        Touchy(4),
    ]
    with trio.fail_after(5):
        async with mcs.open_batcher(values, dedupe=True, name="touchy") as batcher:
            outcomes = await gather(batcher, items)
            assert await batcher(Touchy(5)) == 5
    assert outcomes[0] == 1
    assert outcomes[3] == 4
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert failed  # the item(s) whose comparison raised, and only those
    for error in failed:
        assert isinstance(error, mcs.BatchResultError)
        assert str(error).startswith("batcher 'touchy': dedupe could not compare item Touchy(")
        assert isinstance(error.__cause__, RuntimeError)
    assert all(o in (2, 3) for o in outcomes[1:3] if not isinstance(o, BaseException))


class ExplodingMapping(Mapping[int, int]):
    def __init__(self, items: list[int]) -> None:
        self._items = items

    def __getitem__(self, key: int) -> int:
        if key == 13:
            raise RuntimeError("unlucky")
        return key * 10

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


async def test_a_mapping_whose_lookup_raises_fails_only_that_caller() -> None:
    async def keyed(items: list[int]) -> ExplodingMapping:
        return ExplodingMapping(items)

    with trio.fail_after(5):
        async with mcs.open_batcher(keyed, name="keyed") as batcher:
            outcomes = await gather(batcher, [12, 13, 14])
    assert outcomes[0] == 120
    assert outcomes[2] == 140
    error = outcomes[1]
    assert isinstance(error, mcs.BatchResultError)
    assert str(error) == (
        "batcher 'keyed': batch_fn's result has no entry for item 13 (RuntimeError('unlucky'))"
    )
    assert isinstance(error.__cause__, RuntimeError)


class ExplodingSequence(Sequence[int]):
    def __init__(self, size: int) -> None:
        self._size = size

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...
    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        raise RuntimeError("no results today")

    def __len__(self) -> int:
        return self._size


async def test_a_sequence_that_raises_fails_its_batch_and_the_batcher_goes_on(
    mcs_tasks: TaskLister,
) -> None:
    calls = 0

    async def flaky(items: list[int]) -> Sequence[int]:
        nonlocal calls
        calls += 1
        return ExplodingSequence(len(items)) if calls == 1 else [item for item in items]

    with trio.fail_after(5):
        async with mcs.open_batcher(flaky, name="flaky") as batcher:
            outcomes = await gather(batcher, [1, 2, 3])
            assert await batcher(4) == 4
    for error in outcomes:
        assert isinstance(error, mcs.BatchResultError)
        assert str(error) == (
            "batcher 'flaky': could not split batch_fn's result: RuntimeError('no results today')"
        )
    assert mcs_tasks() == []


# ---------------------------------------------------------------- a batch_fn that never returns


async def test_batch_timeout_fails_a_hung_batch_and_frees_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def sometimes_hangs(items: list[int]) -> list[int]:
        if 0 in items:
            await trio.sleep_forever()
        await trio.sleep(1)
        return items

    with trio.fail_after(100):
        async with mcs.open_batcher(sometimes_hangs, batch_timeout=5, name="db") as batcher:
            with pytest.raises(trio.TooSlowError) as caught:
                await batcher(0)
            assert trio.current_time() == 5.0
            assert str(caught.value) == (
                "batcher 'db': batch_fn did not return within batch_timeout=5.0 s"
            )
            assert await batcher(1) == 1  # the slot came back (max_in_flight=1)
            assert trio.current_time() == 6.0
            statistics = batcher.statistics()
            assert (statistics.failed_batches, statistics.timed_out_batches) == (1, 1)
            assert (statistics.cancelled_batches, statistics.in_flight) == (0, 0)


async def test_batch_timeout_does_not_touch_a_batch_that_finishes_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(items: list[int]) -> list[int]:
        await trio.sleep(4.5)
        return items

    async with mcs.open_batcher(slow, batch_timeout=5) as batcher:
        assert await batcher(7) == 7
        assert trio.current_time() == 4.5


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "batch_timeout must be > 0 and finite, got 0"),
        (-1.0, ValueError, "batch_timeout must be > 0 and finite, got -1.0"),
        (float("inf"), ValueError, "batch_timeout must be > 0 and finite, got inf"),
        ("5", TypeError, "batch_timeout must be a number of seconds, got '5'"),
    ],
)
def test_batch_timeout_refuses_bad_values(
    value: object, error: type[Exception], message: str
) -> None:
    async def fn(items: list[int]) -> list[int]:
        return items

    with pytest.raises(error, match=rf"^{message}$"):
        mcs.Batcher(fn, batch_timeout=value)  # type: ignore[arg-type]


def test_cancel_abandoned_refuses_non_bools() -> None:
    async def fn(items: list[int]) -> list[int]:
        return items

    with pytest.raises(TypeError, match=r"^cancel_abandoned must be a bool, got 1$"):
        mcs.Batcher(fn, cancel_abandoned=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("cancel_abandoned", [False, True])
async def test_cancel_abandoned_cancels_a_batch_once_every_caller_left(
    autojump_clock: trio.testing.MockClock, cancel_abandoned: bool
) -> None:
    ended: list[tuple[str, float]] = []

    async def slow(items: list[int]) -> list[int]:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            ended.append(("cancelled", trio.current_time()))
            raise
        ended.append(("finished", trio.current_time()))
        return items

    async with mcs.open_batcher(slow, cancel_abandoned=cancel_abandoned) as batcher:
        async with trio.open_nursery() as nursery:
            scopes = [trio.CancelScope() for _ in range(2)]

            async def caller(item: int, scope: trio.CancelScope) -> None:
                with scope:
                    await batcher(item)

            for item, scope in enumerate(scopes):
                nursery.start_soon(caller, item, scope)
            await trio.sleep(1)
            scopes[0].cancel()
            await trio.sleep(1)
            assert ended == []  # one caller is still waiting: the batch goes on
            scopes[1].cancel()
        assert await batcher(5) == 5  # the slot was freed either way
    if cancel_abandoned:
        assert ended[0] == ("cancelled", 2.0)
        assert trio.current_time() == 12.0
    else:
        assert ended[0] == ("finished", 10.0)
        assert trio.current_time() == 20.0
    statistics = batcher.statistics()
    assert (statistics.failed_batches, statistics.timed_out_batches) == (0, 0)
    assert statistics.cancelled_batches == (1 if cancel_abandoned else 0)


# ---------------------------------------------------------------- the wrong run or thread


async def test_a_call_from_another_trio_run_is_refused_and_the_batcher_is_untouched() -> None:
    async def double(items: list[int]) -> list[int]:
        return [item * 2 for item in items]

    async with mcs.open_batcher(double, name="double") as batcher:

        async def foreign() -> None:
            await batcher(1)

        with trio.fail_after(5):
            with pytest.raises(RuntimeError) as caught:
                await trio.to_thread.run_sync(trio.run, foreign)
        assert str(caught.value) == (
            "batcher 'double' belongs to another trio run: a batcher can only be used from the "
            "run (and thread) that opened it"
        )
        assert batcher.statistics().queued == 0
        assert await batcher(21) == 42


async def test_statistics_from_another_thread_and_after_the_run() -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    async with mcs.open_batcher(echo, max_in_flight=2) as batcher:
        await batcher(1)
        from_thread = await trio.to_thread.run_sync(batcher.statistics)
        assert from_thread.items == 1
        assert from_thread.saturation >= 0.0
    kept = batcher

    def after_the_run() -> mcs.BatcherStatistics:
        return kept.statistics()

    # A fresh thread has no trio run at all.
    result: list[mcs.BatcherStatistics] = []
    thread = threading.Thread(target=lambda: result.append(after_the_run()))
    thread.start()
    thread.join(5)
    assert result[0].batches == 1


def test_statistics_after_the_run_ended() -> None:
    kept: list[mcs.Batcher[int, int]] = []

    async def echo(items: list[int]) -> list[int]:
        return items

    async def main() -> None:
        async with mcs.open_batcher(echo) as batcher:
            await batcher(3)
            kept.append(batcher)

    trio.run(main)
    statistics = kept[0].statistics()
    assert (statistics.batches, statistics.callers_served) == (1, 1)


# ---------------------------------------------------------------- no cyclic garbage


def _cyclic_garbage_of(run: Any) -> int:
    """Objects found only by the cyclic collector after ``trio.run(run)``."""
    gc.collect()
    gc.disable()
    try:
        trio.run(run)
        return gc.collect()
    finally:
        gc.enable()


def test_rejected_calls_leave_no_cyclic_garbage() -> None:
    async def slow(items: list[int]) -> list[int]:
        await trio.sleep(1)
        return items

    async def baseline() -> None:
        async with mcs.open_batcher(slow, queue_size=1, overload="reject") as batcher:
            batcher.statistics()

    async def rejections() -> None:
        async with mcs.open_batcher(slow, queue_size=1, overload="reject") as batcher:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(batcher, 0)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(batcher, 1)
                await trio.testing.wait_all_tasks_blocked()
                for item in range(200):
                    with pytest.raises(mcs.Overloaded):
                        await batcher(item)

    assert _cyclic_garbage_of(rejections) <= _cyclic_garbage_of(baseline)


def test_failed_batches_leave_no_cyclic_garbage() -> None:
    async def broken(items: list[int]) -> list[int]:
        raise ValueError("down")

    async def ok(items: list[int]) -> list[int]:
        return items

    async def baseline() -> None:
        async with mcs.open_batcher(ok) as batcher:
            for item in range(200):
                await batcher(item)

    async def failures() -> None:
        async with mcs.open_batcher(broken) as batcher:
            for item in range(200):
                with pytest.raises(ValueError, match="down"):
                    await batcher(item)

    assert _cyclic_garbage_of(failures) <= _cyclic_garbage_of(baseline)


# ---------------------------------------------------------------- a batch_fn that calls itself


class CountDown:
    """A batch_fn that answers ``n`` by calling its own batcher for ``n - 1`` (0 is 0)."""

    batcher: mcs.Batcher[int, int]

    async def __call__(self, items: list[int]) -> list[int]:
        return [item if item == 0 else await self.batcher(item - 1) + 1 for item in items]


async def test_a_batch_fn_calling_its_own_batcher_with_no_free_slot_raises() -> None:
    count_down = CountDown()
    with trio.fail_after(5):
        async with mcs.open_batcher(count_down, name="tree") as count_down.batcher:
            with pytest.raises(RuntimeError) as caught:
                await count_down.batcher(3)
    assert str(caught.value) == (
        "batcher 'tree': batch_fn called its own batcher while all 1 in-flight slots are held "
        "by batches waiting for such calls; this would deadlock"
    )


async def test_a_batch_fn_may_call_its_own_batcher_while_a_slot_is_free() -> None:
    count_down = CountDown()
    with trio.fail_after(5):
        async with mcs.open_batcher(count_down, max_in_flight=3) as tree:
            count_down.batcher = tree
            assert await tree(2) == 2
            with pytest.raises(RuntimeError, match=r"this would deadlock$"):
                await tree(3)
            assert await tree(1) == 1  # every slot came back


# ---------------------------------------------------------------- interrupts out of batch_fn


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
async def test_an_interrupt_out_of_batch_fn_ends_the_block_unwrapped(
    interrupt: type[BaseException],
) -> None:
    async def interrupted(items: list[int]) -> list[int]:
        raise interrupt("stop")

    outcomes: list[object] = []

    async def caller(batcher: mcs.Batcher[int, int]) -> None:
        try:
            await batcher(1)
        except trio.BrokenResourceError as error:
            outcomes.append(type(error.__cause__))

    async def run() -> None:
        async with mcs.open_batcher(interrupted) as batcher, trio.open_nursery() as nursery:
            nursery.start_soon(caller, batcher)

    with trio.fail_after(5), pytest.raises(interrupt) as caught:
        await run()
    assert type(caught.value) is interrupt
    assert outcomes == [interrupt]


# ---------------------------------------------------------------- batches cut after the pass


async def test_callers_started_together_share_one_batch_right_after_the_batcher_opens() -> None:
    sizes: list[int] = []

    async def record(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    for _ in range(30):
        sizes.clear()
        async with mcs.open_batcher(record) as batcher, trio.open_nursery() as nursery:
            for item in range(40):
                nursery.start_soon(batcher, item)
        assert sizes == [40]


async def test_callers_woken_by_a_batch_share_the_next_one() -> None:
    sizes: list[int] = []

    async def record(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await trio.lowlevel.checkpoint()
        return items

    async def loop(batcher: mcs.Batcher[int, int], me: int) -> None:
        for _ in range(5):
            assert await batcher(me) == me

    for _ in range(10):
        sizes.clear()
        async with mcs.open_batcher(record) as batcher, trio.open_nursery() as nursery:
            for me in range(25):
                nursery.start_soon(loop, batcher, me)
        assert sizes == [25] * 5


# ---------------------------------------------------------------- KeyboardInterrupt guard rails


class ProbeRecord(mcs._requests._Request[int, int]):
    """A request record that notes whether delivery ran with KeyboardInterrupt deferred."""

    __slots__ = ("batch", "item", "protected", "state", "t0")

    def __init__(self, item: int) -> None:
        self.item = item
        self.t0 = trio.current_time()
        self.batch = None
        self.protected: list[bool] = []

    def _deliver_value(self, value: int, now: float) -> None:
        self.protected.append(trio.lowlevel.currently_ki_protected())

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        self.protected.append(trio.lowlevel.currently_ki_protected())


@pytest.mark.parametrize("fails", [False, True])
async def test_results_are_delivered_with_keyboard_interrupt_deferred(fails: bool) -> None:
    async def answer(items: list[int]) -> list[int]:
        if fails:
            raise ValueError("down")
        return items

    records = [ProbeRecord(item) for item in range(3)]
    with trio.fail_after(5):
        async with mcs.open_batcher(answer) as batcher:
            for record in records:
                batcher._submit_nowait(record)
    assert [record.protected for record in records] == [[True]] * 3


# ---------------------------------------------------------------- nothing waits for nobody


async def test_closing_does_not_wait_out_a_rate_limit_nobody_waits_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    with trio.fail_after(10):
        async with mcs.open_batcher(echo, rate=mcs.RateLimit(1, per=1000.0)) as batcher:
            assert await batcher(1) == 1  # spends the burst: the next call may start at 1000
            with trio.move_on_after(2):
                await batcher(2)
            assert trio.current_time() == 2.0
        assert trio.current_time() == 2.0  # the block closed at once
    statistics = batcher.statistics()
    assert (statistics.withdrawn, statistics.rate_limit_waits) == (1, 1)


def test_under_asyncio_open_batcher_says_it_needs_trio() -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    async def main() -> None:
        async with mcs.open_batcher(echo):
            raise AssertionError("opened outside trio")

    with pytest.raises(RuntimeError) as caught:
        asyncio.run(main())
    assert str(caught.value) == (
        "mcs.open_batcher needs Trio (or anyio with the trio backend): it was used outside a "
        "trio run"
    )
