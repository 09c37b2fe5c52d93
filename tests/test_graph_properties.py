"""Property tests of per-request graphs over random DAGs, built with :mod:`mcs.testing`.

Each example runs its own ``trio.run`` on a virtual clock that jumps whenever every task is
blocked (``mcs.testing.run_virtual``), so every time is exact and a deadlock fails the example.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import mcs
from mcs.testing import (
    BuiltGraph,
    GraphSpec,
    InjectedFailure,
    RecordingBatchFn,
    SpecItem,
    assert_batch_limits,
    assert_dependencies_respected,
    assert_finished,
    assert_idle,
    assert_ran_once,
    build_graph,
    graph_specs,
    run_virtual,
    spec_batch_fn,
)

EXAMPLES = settings(max_examples=150, deadline=None)
LONGEST = 100.0  # longer than any graph of these specs can take


def _graph_tasks(graph: str = "") -> list[str]:
    """Tasks alive that host a graph's spawned nodes (named ``graph``, if given)."""
    names: list[str] = []
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    while stack:
        task = stack.pop()
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                names.append(child.name)
                stack.append(child)
    return [name for name in names if f"mcs.Graph({graph}" in name]


def _descendants(spec: GraphSpec, root: int) -> set[int]:
    found = {root}
    for i, node in enumerate(spec.nodes):
        if found.intersection(node.deps + node.after):
            found.add(i)
    return found - {root}


def _check_withdrawn_never_sent(
    trace: mcs.GraphTrace,
    built: BuiltGraph,
    batchers: Sequence[mcs.Batcher[SpecItem, int]],
    batch_fns: Sequence[RecordingBatchFn[SpecItem, int]],
) -> None:
    """Each cancelled call that was queued was withdrawn or dropped, and batch_fn saw exactly
    the dropped ones. Call it once the batchers are idle (a dropped item may still be on its way
    to batch_fn), and only if this graph is the only one cancelling anything."""
    sent = built.run_counts(*batch_fns)
    cancelled = [
        n.index
        for n in trace.nodes
        if n.kind == "call" and n.outcome == "cancelled" and not math.isnan(n.start)
    ]
    stats = [b.statistics() for b in batchers]
    assert sum(s.withdrawn for s in stats) == sum(1 for i in cancelled if sent[i] == 0)
    assert sum(s.dropped for s in stats) == sum(1 for i in cancelled if sent[i] == 1)


# (max_batch_size, max_in_flight) of a batcher
LIMITS = st.tuples(st.integers(1, 4), st.integers(1, 3))


@EXAMPLES
@given(spec=graph_specs(max_nodes=10, batchers=2), limits=st.lists(LIMITS, min_size=2, max_size=2))
def test_random_graphs_respect_dependencies_and_compute_the_right_values(
    spec: GraphSpec, limits: list[tuple[int, int]]
) -> None:
    async def main() -> None:
        batch_fns = [spec_batch_fn(), spec_batch_fn()]
        async with (
            mcs.open_batcher(
                batch_fns[0], max_batch_size=limits[0][0], max_in_flight=limits[0][1]
            ) as b0,
            mcs.open_batcher(
                batch_fns[1], max_batch_size=limits[1][0], max_in_flight=limits[1][1]
            ) as b1,
        ):
            async with mcs.open_graph() as g:
                built = build_graph(g, spec, [b0, b1], tag=7)
            exit_time = trio.current_time()
            assert_idle(b0, b1)
            assert _graph_tasks() == []
        trace = g.trace()
        assert_finished(trace)
        assert_dependencies_respected(trace)
        assert_ran_once(trace, built.run_counts(*batch_fns))
        assert [n.outcome for n in trace.nodes] == ["value"] * len(spec.nodes)
        assert tuple(node.result for node in built.nodes) == built.expected_values()
        assert exit_time == max(n.end for n in trace.nodes)
        for batch_fn, (size, in_flight) in zip(batch_fns, limits, strict=True):
            assert_batch_limits(batch_fn, max_batch_size=size, max_in_flight=in_flight)

    run_virtual(main)


@EXAMPLES
@given(spec=graph_specs(max_nodes=10, batchers=2))
def test_times_and_critical_path_match_the_spec(spec: GraphSpec) -> None:
    async def main() -> None:
        batch_fns = [spec_batch_fn(), spec_batch_fn()]
        await trio.sleep(3.0)  # the graph's times are on trio's clock, its start is not 0
        async with (
            # one item per batch and no waiting for a slot: each call takes its own delay
            mcs.open_batcher(batch_fns[0], max_batch_size=1, max_in_flight=100) as b0,
            mcs.open_batcher(batch_fns[1], max_batch_size=1, max_in_flight=100) as b1,
        ):
            async with mcs.open_graph() as g:
                build_graph(g, spec, [b0, b1])
            assert trio.current_time() == 3.0 + max(end for _, end in spec.expected_times())
        trace = g.trace()
        assert [(n.start - 3.0, n.end - 3.0) for n in trace.nodes] == list(spec.expected_times())

        path = trace.critical_path
        span = max(n.end for n in trace.nodes)
        assert path[0].deps == ()
        assert path[0].start == trace.start
        assert path[-1].end == span
        for before, after in itertools.pairwise(path):
            assert before.index in after.deps
            assert before.end == max(trace.nodes[d].end for d in after.deps)
            assert after.start == before.end  # no slack on the critical path
        # it ends with the node that finished last: no node waiting for it ended as late
        assert not [n.index for n in trace.nodes if path[-1].index in n.deps and n.end == span]

    run_virtual(main)


@EXAMPLES
@given(
    spec=graph_specs(max_nodes=10, batchers=2, failure=True),
    limits=st.lists(LIMITS, min_size=2, max_size=2),
)
def test_one_failure_cancels_the_rest_and_is_raised(
    spec: GraphSpec, limits: list[tuple[int, int]]
) -> None:
    (failing,) = spec.failures

    async def main() -> None:
        batch_fns = [spec_batch_fn(), spec_batch_fn()]
        async with (
            mcs.open_batcher(
                batch_fns[0], max_batch_size=limits[0][0], max_in_flight=limits[0][1]
            ) as b0,
            mcs.open_batcher(
                batch_fns[1], max_batch_size=limits[1][0], max_in_flight=limits[1][1]
            ) as b1,
        ):
            with pytest.raises(InjectedFailure) as excinfo:
                async with mcs.open_graph() as g:
                    built = build_graph(g, spec, [b0, b1], tag=3)
            exit_time = trio.current_time()
            assert _graph_tasks() == []
            assert b0.statistics().queued == b1.statistics().queued == 0
            trace = g.trace()
            await trio.sleep(LONGEST)  # let dropped batches end
            assert_idle(b0, b1)
            _check_withdrawn_never_sent(trace, built, [b0, b1], batch_fns)

        assert type(excinfo.value) is InjectedFailure
        assert (excinfo.value.tag, excinfo.value.node) == (3, failing)
        assert_finished(trace)
        assert_dependencies_respected(trace)
        assert_ran_once(trace, built.run_counts(*batch_fns))
        errors = [n for n in trace.nodes if n.outcome == "error"]
        assert [n.error for n in errors] == [excinfo.value]
        failed_at = errors[0].end
        assert exit_time == failed_at
        for n in trace.nodes:
            if n.outcome == "value":
                assert n.end <= failed_at
            elif n.outcome == "cancelled":
                assert n.end == failed_at
        assert all(trace.nodes[i].outcome == "cancelled" for i in _descendants(spec, failing))
        for node, n, expected in zip(
            built.nodes, trace.nodes, built.expected_values(), strict=True
        ):
            if n.outcome == "value":
                assert node.result == expected

    run_virtual(main)


Victim = Literal["fail", "cancel", "timeout"]


@EXAMPLES
@given(
    specs=st.lists(graph_specs(max_nodes=8, batchers=2), min_size=2, max_size=4),
    victim_spec=graph_specs(max_nodes=8, batchers=2, failure=True, batch_failures=False),
    how=st.sampled_from(["fail", "cancel", "timeout"]),
    when=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]),
    limits=st.lists(LIMITS, min_size=2, max_size=2),
)
def test_a_failing_or_cancelled_graph_leaves_its_neighbours_intact(
    specs: list[GraphSpec],
    victim_spec: GraphSpec,
    how: Victim,
    when: float,
    limits: list[tuple[int, int]],
) -> None:
    if how != "fail":  # cancelled from outside: no node of its own fails
        victim_spec = GraphSpec(tuple(attrs.evolve(n, fail=None) for n in victim_spec.nodes))
    results: dict[int, tuple[int, ...]] = {}
    expected = {tag: spec.expected_values(tag) for tag, spec in enumerate(specs)}
    victim_tag = len(specs)

    async def neighbour(
        tag: int, spec: GraphSpec, batchers: list[mcs.Batcher[SpecItem, int]]
    ) -> None:
        async with mcs.open_graph(name=f"g{tag}") as g:
            built = build_graph(g, spec, batchers, tag=tag)
        assert [n.outcome for n in g.trace().nodes] == ["value"] * len(spec.nodes)
        results[tag] = tuple(node.result for node in built.nodes)

    async def victim(batchers: list[mcs.Batcher[SpecItem, int]]) -> None:
        raised: BaseException | None = None
        try:
            with trio.move_on_after(when if how == "cancel" else math.inf) as scope:
                timeout = when if how == "timeout" else None
                async with mcs.open_graph(timeout=timeout, name="victim") as g:
                    built = build_graph(g, victim_spec, batchers, tag=victim_tag)
        except (InjectedFailure, trio.TooSlowError) as exc:
            raised = exc
        if how == "fail":
            assert type(raised) is InjectedFailure
        elif raised is not None:
            assert type(raised) is trio.TooSlowError
            assert how == "timeout"
        assert _graph_tasks("victim") == []
        trace = g.trace()
        assert_finished(trace)
        assert_dependencies_respected(trace)
        if raised is None and not scope.cancelled_caught:  # it finished in time
            assert tuple(n.result for n in built.nodes) == built.expected_values()
        victims.append((trace, built))

    victims: list[tuple[mcs.GraphTrace, BuiltGraph]] = []

    batch_fns = [spec_batch_fn(), spec_batch_fn()]

    async def main() -> None:
        async with (
            mcs.open_batcher(
                batch_fns[0], max_batch_size=limits[0][0], max_in_flight=limits[0][1]
            ) as b0,
            mcs.open_batcher(
                batch_fns[1], max_batch_size=limits[1][0], max_in_flight=limits[1][1]
            ) as b1,
        ):
            async with trio.open_nursery() as nursery:
                for tag, spec in enumerate(specs):
                    nursery.start_soon(neighbour, tag, spec, [b0, b1])
                nursery.start_soon(victim, [b0, b1])
            await trio.sleep(LONGEST)
            assert_idle(b0, b1)
            ((trace, built),) = victims
            _check_withdrawn_never_sent(trace, built, [b0, b1], batch_fns)
        for batch_fn, (size, in_flight) in zip(batch_fns, limits, strict=True):
            assert_batch_limits(batch_fn, max_batch_size=size, max_in_flight=in_flight)

    run_virtual(main)
    assert results == expected
