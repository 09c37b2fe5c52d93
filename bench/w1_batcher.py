"""W1: one batcher under many concurrent callers (throughput, memory).

Every batch_fn here is one ``trio.lowlevel.checkpoint()`` and a list comprehension, so what is
measured is the library's own cost per call, not a downstream's. Two shapes (open-loop latency
is W4's sweep, :mod:`bench.w4_latency`, over the same three implementations):

- **W1**: 20,000 request tasks start at once; each makes one call. Compared with the Trio floor
  (20,000 tasks that each do one checkpoint and nothing else) and with the obvious
  channel+Event batcher of :mod:`bench.baselines`.
- **W1-memory**: 100,000 callers parked in a batcher whose batch_fn is blocked, against 100,000
  tasks parked on one ``trio.Event``: the difference is what the batcher holds per caller.
"""

from __future__ import annotations

import gc
import math
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio
import trio.testing

import mcs

from ._harness import Metric, Params, Results, Target, Variant, Workload
from .baselines import open_channel_batcher

__all__ = ["WORKLOADS"]

Call = Callable[[int], Awaitable[int]]
"""One request's call: an item in, its result out."""

Opener = Callable[[], AbstractAsyncContextManager[Call]]
"""Opens whatever serves the calls for the duration of one measurement."""

MAX_BATCH_SIZE = 100


async def batch_fn(items: list[int]) -> list[int]:
    """The downstream: one checkpoint and a list comprehension."""
    await trio.lowlevel.checkpoint()
    return [x + 1 for x in items]


async def _floor_call(item: int) -> int:
    await trio.lowlevel.checkpoint()
    return item + 1


@asynccontextmanager
async def open_floor() -> AsyncIterator[Call]:
    """No batcher at all: each call is one checkpoint (what a task costs on its own)."""
    yield _floor_call


def open_mcs() -> AbstractAsyncContextManager[Call]:
    return mcs.open_batcher(batch_fn, max_batch_size=MAX_BATCH_SIZE)


def open_channel() -> AbstractAsyncContextManager[Call]:
    return open_channel_batcher(batch_fn, max_batch_size=MAX_BATCH_SIZE)


# ---------------------------------------------------------------------------------- W1


def _throughput(opener: Opener, params: Params) -> Results:
    n = params.requests
    out = [0] * n

    async def request(call: Call, i: int) -> None:
        out[i] = await call(i)

    async def main() -> float:
        async with opener() as call:
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(request, call, i)
            return time.perf_counter() - started

    elapsed = trio.run(main)
    if out != list(range(1, n + 1)):
        raise AssertionError("wrong results")
    return {"rps": n / elapsed}


W1 = Workload(
    key="W1",
    title="batcher throughput",
    description=(
        "20,000 concurrent request tasks, one call each through one batcher "
        "(max_batch_size=100, batch_fn = checkpoint + list comprehension)."
    ),
    metrics=(Metric("rps", "throughput", "req/s", higher_is_better=True),),
    variants=(
        Variant("mcs", lambda p: _throughput(open_mcs, p)),
        Variant("trio floor", lambda p: _throughput(open_floor, p)),
        Variant("channel+Event", lambda p: _throughput(open_channel, p)),
    ),
    targets=(
        Target("mcs", "rps", ">=", 0.8, baseline="trio floor"),
        Target("mcs", "rps", ">=", 1.5, baseline="channel+Event"),
    ),
)


# ---------------------------------------------------------------------------------- W1-memory

GatedOpener = Callable[[trio.Event], AbstractAsyncContextManager[Call]]


@asynccontextmanager
async def _open_event(gate: trio.Event) -> AsyncIterator[Call]:
    async def wait(item: int) -> int:
        await gate.wait()
        return item

    yield wait


def _gated(gate: trio.Event) -> Callable[[list[int]], Awaitable[list[int]]]:
    async def blocked_batch_fn(items: list[int]) -> list[int]:
        await gate.wait()
        return [x + 1 for x in items]

    return blocked_batch_fn


def _open_mcs_gated(gate: trio.Event) -> AbstractAsyncContextManager[Call]:
    return mcs.open_batcher(_gated(gate), max_batch_size=MAX_BATCH_SIZE, queue_size=math.inf)


def _open_channel_gated(gate: trio.Event) -> AbstractAsyncContextManager[Call]:
    return open_channel_batcher(_gated(gate), max_batch_size=MAX_BATCH_SIZE)


def _memory(opener: GatedOpener, params: Params) -> Results:
    n = params.memory_callers

    async def caller(call: Call, i: int) -> None:
        await call(i)

    async def main() -> float:
        gate = trio.Event()
        async with opener(gate) as call, trio.open_nursery() as nursery:
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(n):
                    nursery.start_soon(caller, call, i)
                await trio.testing.wait_all_tasks_blocked()
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            gate.set()
        return (after - before) / n

    return {"bytes": trio.run(main)}


W1_MEMORY = Workload(
    key="W1-memory",
    title="memory per queued caller",
    description=(
        "100,000 callers parked in a batcher whose batch_fn is blocked (queue_size=inf), "
        "against 100,000 tasks parked on one trio.Event; traced bytes (tracemalloc) per "
        "caller, the difference being what the batcher holds per caller."
    ),
    metrics=(Metric("bytes", "traced per caller", "B", higher_is_better=False),),
    variants=(
        Variant("mcs", lambda p: _memory(_open_mcs_gated, p)),
        Variant("task on Event", lambda p: _memory(_open_event, p)),
        Variant("channel+Event", lambda p: _memory(_open_channel_gated, p)),
    ),
    targets=(Target("mcs", "bytes", "<=", 1024, baseline="task on Event", relation="excess"),),
    compare="excess",
    max_runs=2,  # tracemalloc counts are deterministic here: two runs show they repeat
)

WORKLOADS = (W1, W1_MEMORY)
