"""Cumulative histograms (queue wait, batch time, batch size) and the registry of open
batchers: exact buckets on the virtual clock, per-batch bucketing equal to per-sample counting,
and reads from another thread."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import mcs
from mcs._histogram import BATCH_SIZE_BOUNDS, SECONDS_BOUNDS, _Buckets
from mcs._registry import open_batchers


def naive(bounds: tuple[float, ...], values: list[float]) -> mcs.Histogram:
    counts = tuple(sum(1 for v in values if v <= bound) for bound in bounds)
    return mcs.Histogram(bounds, counts, len(values), sum(values))


durations = st.lists(
    st.one_of(st.sampled_from(SECONDS_BOUNDS), st.floats(0.0, 20.0, allow_nan=False))
)


@given(st.lists(durations, max_size=6), durations)
def test_bucketing_a_batch_at_once_equals_counting_each_sample(
    batches: list[list[float]], singles: list[float]
) -> None:
    buckets = _Buckets(SECONDS_BOUNDS)
    everything: list[float] = []
    for batch in batches:
        buckets.extend(batch)
        everything.extend(batch)
    for value in singles:
        buckets.add(value)
        everything.append(value)
    got = buckets.snapshot()
    want = naive(SECONDS_BOUNDS, everything)
    assert (got.bounds, got.counts, got.count) == (want.bounds, want.counts, want.count)
    assert abs(got.sum - want.sum) <= 1e-9 * max(1.0, want.sum)


async def test_exact_histograms_on_the_virtual_clock(autojump_clock: trio.abc.Clock) -> None:
    async def slow(items: list[int]) -> list[int]:
        await trio.sleep(0.003)
        return items

    async with mcs.open_batcher(slow, name="slow", max_batch_size=3) as batcher:
        assert batcher.histograms().batch_size.count == 0
        async with trio.open_nursery() as nursery:
            for n in range(5):  # batches [0, 1, 2] at t=0, then [3, 4] at t=0.003
                nursery.start_soon(batcher, n)
    got = batcher.histograms()
    assert got.name == "slow"
    seconds = SECONDS_BOUNDS
    # queue waits: three of 0 s, two of 3 ms
    assert got.queue_wait == mcs.Histogram(
        seconds, tuple(3 if b < 0.003 else 5 for b in seconds), 5, 0.006
    )
    # two batch_fn calls of 3 ms each
    assert got.batch_time == mcs.Histogram(
        seconds, tuple(0 if b < 0.003 else 2 for b in seconds), 2, 0.006
    )
    assert got.batch_size == mcs.Histogram(
        BATCH_SIZE_BOUNDS, tuple(0 if b < 2 else 1 if b < 3 else 2 for b in BATCH_SIZE_BOUNDS), 2, 5
    )


async def test_histograms_agree_with_the_statistics() -> None:
    async def echo(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        return items

    async with mcs.open_batcher(echo, max_batch_size=7) as batcher:
        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(batcher, n)
    stats, hists = batcher.statistics(), batcher.histograms()
    assert hists.batch_size.count == hists.batch_time.count == stats.batches
    assert hists.batch_size.sum == stats.items == hists.queue_wait.count == 100


async def test_open_batchers_lists_a_batcher_while_its_block_runs() -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    async with mcs.open_batcher(echo, name="listed") as batcher:
        assert batcher in open_batchers()
        async with mcs.open_batcher(echo, name="inner") as inner:
            assert {batcher, inner} <= set(open_batchers())
        assert inner not in open_batchers()
    assert batcher not in open_batchers()


async def test_a_batcher_whose_block_fails_leaves_the_registry() -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    seen: list[mcs.Batcher[int, int]] = []

    async def fail_inside() -> None:
        async with mcs.open_batcher(echo) as batcher:
            seen.append(batcher)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await fail_inside()
    assert len(seen) == 1
    assert seen[0] not in open_batchers()


async def test_reading_from_another_thread_while_recording() -> None:
    """A reader on its own thread sees every histogram consistent: the buckets never decrease,
    never exceed the total, and the total never decreases."""

    async def echo(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        return items

    problems: list[str] = []
    stop = threading.Event()

    def read(batcher: mcs.Batcher[int, int]) -> None:
        last = 0
        while not stop.is_set():
            for h in batcher.histograms().queue_wait, batcher.histograms().batch_size:
                if list(h.counts) != sorted(h.counts) or (h.counts and h.counts[-1] > h.count):
                    problems.append(f"inconsistent {h}")
            count = batcher.histograms().queue_wait.count
            if count < last:
                problems.append(f"count went down: {last} -> {count}")
            last = count

    async with mcs.open_batcher(echo, max_batch_size=10) as batcher:
        reader = threading.Thread(target=read, args=(batcher,))
        reader.start()
        try:
            for _ in range(20):
                async with trio.open_nursery() as nursery:
                    for n in range(50):
                        nursery.start_soon(batcher, n)
        finally:
            stop.set()
            await trio.to_thread.run_sync(reader.join)
    assert problems == []
    assert batcher.histograms().queue_wait.count == 1000
