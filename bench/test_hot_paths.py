"""pytest-benchmark timings of the hot paths, outside the default test run.

Run with ``.venv/bin/python -m pytest bench/test_hot_paths.py -p no:randomly`` (``make
bench-hot``). Each benchmark runs a whole ``trio.run`` of many concurrent calls, so what it
times is the per-call cost including Trio's scheduling, and reports it per call.
"""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from pytest_benchmark.fixture import BenchmarkFixture

import mcs

CALLS = 5_000


async def double(items: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return [2 * item for item in items]


def run_concurrently(request: Callable[..., Awaitable[object]], *stages: int) -> None:
    """``CALLS`` concurrent ``request(*batchers, i)`` over ``len(stages)`` shared batchers."""

    async def main() -> None:
        async with (
            mcs.open_batcher(double) as first,
            mcs.open_batcher(double) as second,
            mcs.open_batcher(double) as third,
        ):
            call = partial(request, *(first, second, third)[: len(stages)])
            async with trio.open_nursery() as nursery:
                for i in range(CALLS):
                    nursery.start_soon(call, i)

    trio.run(main)


async def one_call(users: mcs.Batcher[int, int], i: int) -> None:
    assert await users(i) == 2 * i


async def graph3(
    users: mcs.Batcher[int, int], posts: mcs.Batcher[int, int], feed: mcs.Batcher[int, int], i: int
) -> None:
    async with mcs.open_graph() as g:
        u = g.call(users, i)
        p = g.call(posts, i)
        f = g.call(feed, g.apply(operator.add, u, p))
    assert f.result == 8 * i


async def checkpoint_only(i: int) -> None:
    await trio.lowlevel.checkpoint()


def test_trio_floor(benchmark: BenchmarkFixture) -> None:
    benchmark.extra_info["calls"] = CALLS
    benchmark(run_concurrently, checkpoint_only)


def test_batcher_call(benchmark: BenchmarkFixture) -> None:
    benchmark.extra_info["calls"] = CALLS
    benchmark(run_concurrently, one_call, 1)


def test_graph3_request(benchmark: BenchmarkFixture) -> None:
    benchmark.extra_info["calls"] = CALLS
    benchmark(run_concurrently, graph3, 1, 2, 3)
