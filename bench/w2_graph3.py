"""W2 "graph3": 20,000 concurrent requests, each a three-call graph over three shared batchers.

Each request loads ``u = users(i)`` and ``p = posts(i)`` in parallel, then ``feed(u + p)``.
Every batch_fn is one checkpoint (or ``asyncio.sleep(0)``) and a list comprehension, with
max_batch_size 100, so what is measured is the cost of expressing a request as a graph and of
the batched calls, across many live requests. Baselines:

- **obvious trio, task per node**: the graph written the obvious way the target is stated for:
  a nursery per request, a task for every node (the two loads, the sum, the feed) waiting on its
  dependencies' ``trio.Event``, through channel+Event batchers (:mod:`bench.baselines`);
- **lean trio**: what a careful programmer writes by hand instead: a nursery per request with a
  task for each of the two parallel loads only, then the feed call in the request's own task,
  through the same batchers. It is the stronger of the two Trio baselines.
- **aiodataloader**: the asyncio DataLoader (the GraphQL batching pattern), one loader per
  stage, ``asyncio.gather`` for the parallel pair, the requests started in a TaskGroup.

The mcs variant also reports the GC-tracked objects each live request holds (the cyclic
collector walks all of them, over and over, while tens of thousands of requests are alive): the
growth of ``gc.get_objects()`` while ``n`` requests are parked on their first two calls, over
``n``. ``python -m bench.w2_graph3 --sweep 10000,20000,40000`` runs mcs and aiodataloader at
several concurrencies.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import operator
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import TypeVar

import trio
import trio.testing

import mcs

from . import _graph_api
from ._harness import Metric, Params, Results, Target, Variant, Workload
from .baselines import ChannelBatcher, open_channel_batcher

__all__ = ["WORKLOADS"]

MAX_BATCH_SIZE = 100

BatchFn = Callable[[list[int]], Awaitable[list[int]]]
S = TypeVar("S")  # a stage: an mcs or a channel+Event batcher


async def users_fn(ids: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return [i * 10 for i in ids]


async def posts_fn(ids: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return [i + 1 for i in ids]


async def feed_fn(keys: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return [k * 2 for k in keys]


async def ausers_fn(ids: list[int]) -> list[int]:
    await asyncio.sleep(0)
    return [i * 10 for i in ids]


async def aposts_fn(ids: list[int]) -> list[int]:
    await asyncio.sleep(0)
    return [i + 1 for i in ids]


async def afeed_fn(keys: list[int]) -> list[int]:
    await asyncio.sleep(0)
    return [k * 2 for k in keys]


STAGES = (users_fn, posts_fn, feed_fn)


def _check(out: Sequence[int]) -> None:
    if any(v != 2 * (11 * i + 1) for i, v in enumerate(out)):
        raise AssertionError("wrong results")


def _run_trio(
    open_stage: Callable[[BatchFn], AbstractAsyncContextManager[S]],
    request: Callable[[S, S, S, int, list[int]], Awaitable[None]],
    n: int,
) -> float:
    """Open the three stages, run ``n`` concurrent requests; the seconds they took."""
    out = [0] * n

    async def main() -> float:
        async with AsyncExitStack() as stack:
            users, posts, feed = [await stack.enter_async_context(open_stage(f)) for f in STAGES]
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(request, users, posts, feed, i, out)
            return time.perf_counter() - started

    elapsed = trio.run(main)
    _check(out)
    return elapsed


# ---------------------------------------------------------------------------------- mcs


async def _mcs_request(
    users: mcs.Batcher[int, int],
    posts: mcs.Batcher[int, int],
    feed: mcs.Batcher[int, int],
    i: int,
    out: list[int],
) -> None:
    async with _graph_api.open_graph() as g:
        u = g.call(users, i)
        p = g.call(posts, i)
        s = g.apply(operator.add, u, p)
        f = g.call(feed, s)
    out[i] = f.result


def _open_mcs_stage(fn: BatchFn) -> AbstractAsyncContextManager[mcs.Batcher[int, int]]:
    return mcs.open_batcher(fn, max_batch_size=MAX_BATCH_SIZE)


def measure_mcs(params: Params) -> Results:
    rps = params.requests / _run_trio(_open_mcs_stage, _mcs_request, params.requests)
    return {"rps": rps, "objects": tracked_objects_per_request(min(params.requests, 5_000))}


def tracked_objects_per_request(n: int) -> float:
    """GC-tracked objects per live mcs request: ``n`` requests parked, their first two calls
    held in flight, the feed call not yet made."""

    async def main() -> float:
        gate = trio.Event()

        async def held(ids: list[int]) -> list[int]:
            await gate.wait()
            return [i * 10 for i in ids]

        async with (
            mcs.open_batcher(held, max_batch_size=MAX_BATCH_SIZE, max_in_flight=n) as users,
            mcs.open_batcher(held, max_batch_size=MAX_BATCH_SIZE, max_in_flight=n) as posts,
            _open_mcs_stage(feed_fn) as feed,
            trio.open_nursery() as nursery,
        ):
            out = [0] * n
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            before = len(gc.get_objects())
            for i in range(n):
                nursery.start_soon(_mcs_request, users, posts, feed, i, out)
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            grown = len(gc.get_objects()) - before
            gate.set()
        return grown / n

    return trio.run(main)


# ---------------------------------------------------------------------------------- obvious trio


async def _obvious_request(
    users: ChannelBatcher[int, int],
    posts: ChannelBatcher[int, int],
    feed: ChannelBatcher[int, int],
    i: int,
    out: list[int],
) -> None:
    loaded = [0, 0]

    async def load(slot: int, stage: ChannelBatcher[int, int]) -> None:
        loaded[slot] = await stage(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load, 0, users)
        nursery.start_soon(load, 1, posts)
    out[i] = await feed(loaded[0] + loaded[1])


async def _per_node_request(
    users: ChannelBatcher[int, int],
    posts: ChannelBatcher[int, int],
    feed: ChannelBatcher[int, int],
    i: int,
    out: list[int],
) -> None:
    values = [0, 0, 0]
    loaded = [trio.Event(), trio.Event()]
    summed = trio.Event()

    async def load(slot: int, stage: ChannelBatcher[int, int]) -> None:
        values[slot] = await stage(i)
        loaded[slot].set()

    async def add() -> None:
        for event in loaded:
            await event.wait()
        values[2] = values[0] + values[1]
        summed.set()

    async def load_feed() -> None:
        await summed.wait()
        out[i] = await feed(values[2])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load, 0, users)
        nursery.start_soon(load, 1, posts)
        nursery.start_soon(add)
        nursery.start_soon(load_feed)


def _open_channel_stage(fn: BatchFn) -> AbstractAsyncContextManager[ChannelBatcher[int, int]]:
    return open_channel_batcher(fn, max_batch_size=MAX_BATCH_SIZE)


def measure_obvious(params: Params) -> Results:
    n = params.requests
    return {"rps": n / _run_trio(_open_channel_stage, _per_node_request, n)}


def measure_lean(params: Params) -> Results:
    n = params.requests
    return {"rps": n / _run_trio(_open_channel_stage, _obvious_request, n)}


# ---------------------------------------------------------------------------------- aiodataloader


def _aiodataloader_missing() -> str | None:
    try:
        import aiodataloader  # noqa: F401
    except ImportError:
        return "aiodataloader is not installed"
    return None


def measure_aiodataloader(params: Params) -> Results:
    from aiodataloader import DataLoader

    n = params.requests
    out = [0] * n

    async def main() -> float:
        users = DataLoader(ausers_fn, max_batch_size=MAX_BATCH_SIZE)
        posts = DataLoader(aposts_fn, max_batch_size=MAX_BATCH_SIZE)
        feed = DataLoader(afeed_fn, max_batch_size=MAX_BATCH_SIZE)

        async def request(i: int) -> None:
            u, p = await asyncio.gather(users.load(i), posts.load(i))
            out[i] = await feed.load(u + p)

        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(request(i))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    _check(out)
    return {"rps": n / elapsed}


W2 = Workload(
    key="W2",
    title="graph3",
    description=(
        "20,000 concurrent requests, each u = users(i) and p = posts(i) in parallel, then "
        "feed(u + p); three batchers, max_batch_size 100, batch_fn = checkpoint + list "
        "comprehension."
    ),
    metrics=(
        Metric("rps", "throughput", "req/s", higher_is_better=True),
        Metric("objects", "GC-tracked objects per live request", "objects", False),
    ),
    variants=(
        Variant("mcs", measure_mcs, _graph_api.missing),
        Variant("obvious trio", measure_obvious),
        Variant("lean trio", measure_lean),
        Variant("aiodataloader", measure_aiodataloader, _aiodataloader_missing),
    ),
    targets=(
        Target("mcs", "rps", ">=", 7.0, baseline="obvious trio"),
        Target("mcs", "rps", ">=", 1.5, baseline="aiodataloader"),
    ),
)

WORKLOADS = (W2,)


def sweep(sizes: list[int], runs: int) -> str:
    """mcs and aiodataloader at each concurrency in ``sizes``, interleaved; a text table of
    medians and of the median paired ratio."""
    rows = [
        "| concurrent requests | mcs req/s | aiodataloader req/s | mcs / aiodataloader "
        "| mcs objects per live request |",
        "|---|---|---|---|---|",
    ]
    measure_mcs(Params(requests=500))  # warm-up
    measure_aiodataloader(Params(requests=500))
    for n in sizes:
        params = Params(requests=n)
        ours: list[float] = []
        theirs: list[float] = []
        objects = 0.0
        for run in range(runs):
            pair = [measure_mcs, measure_aiodataloader]
            for measure in pair if run % 2 == 0 else pair[::-1]:
                gc.collect()
                results = measure(params)
                if measure is measure_mcs:
                    ours.append(results["rps"])
                    objects = results["objects"]
                else:
                    theirs.append(results["rps"])
        ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
        rows.append(
            f"| {n:,} | {statistics.median(ours):,.0f} | {statistics.median(theirs):,.0f} "
            f"| {ratio:.2f}x | {objects:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.w2_graph3")
    parser.add_argument("--sweep", default="10000,20000,40000", help="concurrencies")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(sweep([int(n) for n in args.sweep.split(",")], args.runs))
