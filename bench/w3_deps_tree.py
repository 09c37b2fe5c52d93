"""W3: a deep dependency tree in one graph (the Go project's ``deps`` benchmark, reshaped).

L = 4 layers below the root, N = 10 dependencies per inner node: 1 + 10 + 100 + 1,000 + 10,000
= 11,111 nodes in one graph, built bottom-up (leaves first). Every node does 1 ms of work once
its dependencies have finished, so the ideal is 5 ms; the rest is the cost of 11,111 nodes.

- **W3a**: the work is ``await trio.sleep(0.001)`` in a spawned node. Baseline: the same tree
  as plain trio tasks and events in one nursery.
- **W3b**: the work is a call through one batcher whose batch_fn sleeps 1 ms
  (max_batch_size 100, max_in_flight 128); a node's dependencies are passed with ``after=``.
  Reference: the same tree as plain tasks and events, each calling the same mcs batcher.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

import mcs

from . import _graph_api
from ._harness import Metric, Params, Results, Target, Variant, Workload
from .baselines import EventNode

__all__ = ["WORKLOADS"]

WORK_SECONDS = 0.001

N = TypeVar("N")


def _build(params: Params, make: Callable[[int, Sequence[N]], N]) -> tuple[N, int]:
    """Build the tree bottom-up with ``make(node_id, children)``; return (root, node count)."""
    fanout, layers = params.tree_fanout, params.tree_layers
    next_id = 0
    layer: list[N] = []
    for depth in range(layers, -1, -1):
        previous, layer = layer, []
        for j in range(fanout**depth):
            children = previous[j * fanout : (j + 1) * fanout] if previous else ()
            layer.append(make(next_id, children))
            next_id += 1
    return layer[0], next_id


def _ms(elapsed: float) -> Results:
    return {"ms": elapsed * 1e3}


# ---------------------------------------------------------------------------------- W3a


async def work(*deps: int) -> int:
    """1 ms of work once the dependencies are done; counts the nodes of its subtree."""
    await trio.sleep(WORK_SECONDS)
    return 1 + sum(deps)


def measure_spawn_mcs(params: Params) -> Results:
    async def main() -> float:
        started = time.perf_counter()
        async with _graph_api.open_graph() as g:
            root, total = _build(params, lambda _, children: g.spawn(work, *children))
        elapsed = time.perf_counter() - started
        if root.result != total:
            raise AssertionError(f"root counted {root.result} nodes, expected {total}")
        return elapsed

    return _ms(trio.run(main))


async def _sleep_work() -> None:
    await trio.sleep(WORK_SECONDS)


def measure_spawn_events(params: Params) -> Results:
    async def main() -> float:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:

            def make(_: int, children: Sequence[EventNode]) -> EventNode:
                node = EventNode()
                nursery.start_soon(node.run, _sleep_work, children)
                return node

            root, total = _build(params, make)
        elapsed = time.perf_counter() - started
        if root.value != total:
            raise AssertionError(f"root counted {root.value} nodes, expected {total}")
        return elapsed

    return _ms(trio.run(main))


W3A = Workload(
    key="W3a",
    title="deps tree, spawned work",
    description=(
        "11,111 nodes (L=4, N=10) in one graph, each awaiting trio.sleep(0.001) after its "
        "dependencies; ideal 5 ms. Baseline: plain trio tasks + trio.Events in one nursery."
    ),
    metrics=(Metric("ms", "time", "ms", higher_is_better=False),),
    variants=(
        Variant("mcs", measure_spawn_mcs, _graph_api.missing),
        Variant("tasks+Events", measure_spawn_events),
    ),
    targets=(Target("mcs", "ms", "<=", 1.1, baseline="tasks+Events"),),
)


# ---------------------------------------------------------------------------------- W3b

MAX_BATCH_SIZE = 100
MAX_IN_FLIGHT = 128


class _WorkBatch:
    """The batched downstream: 1 ms per batch; counts the items it processed."""

    def __init__(self) -> None:
        self.items = 0

    async def __call__(self, ids: list[int]) -> list[int]:
        await trio.sleep(WORK_SECONDS)
        self.items += len(ids)
        return ids


def measure_batched_mcs(params: Params) -> Results:
    downstream = _WorkBatch()

    async def main() -> float:
        async with mcs.open_batcher(
            downstream, max_batch_size=MAX_BATCH_SIZE, max_in_flight=MAX_IN_FLIGHT
        ) as batcher:
            started = time.perf_counter()
            async with _graph_api.open_graph() as g:
                root, total = _build(
                    params, lambda node_id, children: g.call(batcher, node_id, after=children)
                )
            elapsed = time.perf_counter() - started
        if downstream.items != total or root.result != total - 1:
            raise AssertionError("wrong results")
        return elapsed

    return _ms(trio.run(main))


def measure_batched_events(params: Params) -> Results:
    downstream = _WorkBatch()

    async def main() -> float:
        async with mcs.open_batcher(
            downstream, max_batch_size=MAX_BATCH_SIZE, max_in_flight=MAX_IN_FLIGHT
        ) as batcher:
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:

                def make(node_id: int, children: Sequence[EventNode]) -> EventNode:
                    async def call() -> None:
                        await batcher(node_id)

                    node = EventNode()
                    nursery.start_soon(node.run, call, children)
                    return node

                root, total = _build(params, make)
            elapsed = time.perf_counter() - started
        if downstream.items != total or root.value != total:
            raise AssertionError("wrong results")
        return elapsed

    return _ms(trio.run(main))


W3B = Workload(
    key="W3b",
    title="deps tree, batched work",
    description=(
        "the same 11,111-node tree, each node one call through a batcher whose batch_fn "
        "sleeps 1 ms (max_batch_size 100, max_in_flight 128), dependencies via after=. "
        "Reference: plain tasks + trio.Events calling the same mcs batcher."
    ),
    metrics=(Metric("ms", "time", "ms", higher_is_better=False),),
    variants=(
        Variant("mcs", measure_batched_mcs, _graph_api.missing),
        Variant("tasks+Events, mcs batcher", measure_batched_events),
    ),
    targets=(Target("mcs", "ms", "<=", 60.0),),
)

WORKLOADS = (W3A, W3B)
