"""Tests of :mod:`mcs.testing`, the property-testing helpers."""

from __future__ import annotations

import inspect
import math
import pickle
import subprocess
import sys
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings

import mcs
import mcs.testing
from mcs.testing import (
    AutojumpClock,
    BatchRecord,
    GraphSpec,
    InjectedFailure,
    NodeSpec,
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

NAN = math.nan


def test_all_is_sorted_and_lists_every_public_name() -> None:
    names = mcs.testing.__all__
    assert names == sorted(names)
    defined = {
        name
        for name, obj in vars(mcs.testing).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == "mcs.testing"
    }
    assert set(names) - defined == {"Failure", "NodeKind"}  # the two type aliases
    assert defined <= set(names)
    for name in defined:
        assert getattr(mcs.testing, name).__doc__, name


def test_core_mcs_does_not_import_hypothesis() -> None:
    code = "import sys, mcs; print(sorted(m for m in sys.modules if m.startswith('hypothesis')))"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout == "[]\n"


# ---------------------------------------------------------------------- the clock


def test_run_virtual_runs_on_a_clock_that_jumps() -> None:
    async def main() -> float:
        assert trio.current_time() == 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 2.5)
            await trio.sleep(1.0)
            assert trio.current_time() == 1.0
        return trio.current_time()

    assert run_virtual(main) == 2.5


def test_run_virtual_raises_what_the_run_raised() -> None:
    async def main() -> None:
        await trio.sleep(1.0)
        raise KeyError("mine")

    with pytest.raises(KeyError, match=r"^'mine'$"):
        run_virtual(main)


def test_run_virtual_fails_on_a_deadlock() -> None:
    async def main() -> None:
        await trio.sleep(1.5)
        await trio.Event().wait()  # nothing will ever set it

    message = r"^deadlock: \d+ tasks are blocked and none has a deadline \(at 1.5 s on the clock\)$"
    with pytest.raises(AssertionError, match=message):
        run_virtual(main)


def test_autojump_clock() -> None:
    clock = AutojumpClock()

    async def main() -> None:
        with trio.move_on_after(3.0):
            await trio.sleep_forever()
        assert repr(clock) == "<mcs.testing.AutojumpClock at 3.0 s>"

    trio.run(main, clock=clock)
    assert clock.current_time() == 3.0
    assert clock.deadlock is None


# ---------------------------------------------------------------------- RecordingBatchFn


def _square(x: int) -> int | BaseException:
    return ValueError(f"no {x}") if x < 0 else x * x


async def test_recording_batch_fn_logs_each_batch(autojump_clock: trio.testing.MockClock) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(_square, delay=1.5)
    assert repr(batch_fn) == "<mcs.testing.RecordingBatchFn: 0 batches, 0 running, peak 0>"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch_fn, [1, 2])
        await trio.sleep(0.5)
        assert batch_fn.running == 1
        results = await batch_fn([3, -1])
    assert results[0] == 9
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "no -1"
    assert trio.current_time() == 2.0
    assert batch_fn.batches == [
        BatchRecord((1, 2), 0.0, 1, 1.5, "returned"),
        BatchRecord((3, -1), 0.5, 2, 2.0, "returned"),
    ]
    assert batch_fn.items == [1, 2, 3, -1]
    assert (batch_fn.running, batch_fn.peak_concurrency) == (0, 2)
    assert repr(batch_fn) == "<mcs.testing.RecordingBatchFn: 2 batches, 0 running, peak 2>"


def _total(items: list[int]) -> float:
    return sum(items) / 4


def _raise_on_zero(items: list[int]) -> BaseException | None:
    return KeyError("zero") if 0 in items else None


async def test_recording_batch_fn_delays_and_fails_on_demand(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(
        _square, delay=_total, raise_for=_raise_on_zero
    )
    assert await batch_fn([1, 2]) == [1, 4]
    assert trio.current_time() == 0.75
    with pytest.raises(KeyError, match=r"^'zero'$"):
        await batch_fn([0, 2])
    assert trio.current_time() == 1.25
    batch_fn.delay = 0.0  # changed on demand
    batch_fn.raise_for = None
    assert await batch_fn([0]) == [0]
    assert trio.current_time() == 1.25
    assert [(b.items, b.start, b.end, b.outcome) for b in batch_fn.batches] == [
        ((1, 2), 0.0, 0.75, "returned"),
        ((0, 2), 0.75, 1.25, "raised"),
        ((0,), 1.25, 1.25, "returned"),
    ]


async def test_recording_batch_fn_records_a_cancelled_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(_square, delay=5.0)
    with trio.move_on_after(2.0):
        await batch_fn([1])
    assert batch_fn.batches == [BatchRecord((1,), 0.0, 1, 2.0, "cancelled")]
    assert batch_fn.running == 0


async def test_a_recording_batch_fn_is_a_batch_fn(autojump_clock: trio.testing.MockClock) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(_square, delay=1.0)
    async with mcs.open_batcher(batch_fn, max_batch_size=2) as batcher:
        async with trio.open_nursery() as nursery:
            for x in range(3):
                nursery.start_soon(batcher, x)
        with pytest.raises(ValueError, match=r"^no -4$"):
            await batcher(-4)
    assert sorted(len(b.items) for b in batch_fn.batches) == [1, 1, 2]
    assert_batch_limits(batch_fn, max_batch_size=2, max_in_flight=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fn": 3}, TypeError, r"^fn must be callable, got 3$"),
        ({"delay": "1"}, TypeError, r"^delay must be a number of seconds or callable, got '1'$"),
        ({"delay": True}, TypeError, r"^delay must be a number of seconds or callable, got True$"),
        ({"delay": -1}, ValueError, r"^delay must be >= 0, got -1$"),
        ({"delay": math.nan}, ValueError, r"^delay must be >= 0, got nan$"),
        ({"raise_for": 3}, TypeError, r"^raise_for must be callable or None, got 3$"),
    ],
)
def test_recording_batch_fn_checks_its_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    kwargs = {"fn": _square, **kwargs}
    with pytest.raises(error, match=message):
        RecordingBatchFn(**kwargs)


# ---------------------------------------------------------------------- specs


@settings(max_examples=200, deadline=None)
@given(spec=graph_specs(max_nodes=12, batchers=3, delays=(0.0, 2.0)))
def test_graph_specs_draw_well_formed_dags(spec: GraphSpec) -> None:
    assert 1 <= len(spec.nodes) <= 12
    assert spec.failures == ()
    for i, node in enumerate(spec.nodes):
        links = node.deps + node.after
        assert all(0 <= j < i for j in links)
        assert len(set(links)) == len(links) <= 3
        assert node.delay in (0.0, 2.0)
        if node.kind == "call":
            assert node.deps == ()
            assert 0 <= node.batcher < 3
        else:
            assert node.batcher == 0
        if node.kind == "apply":
            assert node.delay == 0.0


@settings(max_examples=100, deadline=None)
@given(spec=graph_specs(max_nodes=5, failure=True, batch_failures=False))
def test_graph_specs_inject_exactly_one_failure(spec: GraphSpec) -> None:
    (failing,) = spec.failures
    node = spec.nodes[failing]
    assert node.fail == ("item" if node.kind == "call" else "raise")


@settings(max_examples=50, deadline=None)
@given(spec=graph_specs(min_nodes=3, max_nodes=3, kinds=["apply"], max_deps=0))
def test_graph_specs_obey_kinds_and_sizes(spec: GraphSpec) -> None:
    assert [(n.kind, n.deps, n.after) for n in spec.nodes] == [("apply", (), ())] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_nodes": 0}, r"^need 1 <= min_nodes <= max_nodes, got 0 and 8$"),
        ({"min_nodes": 3, "max_nodes": 2}, r"^need 1 <= min_nodes <= max_nodes, got 3 and 2$"),
        ({"kinds": []}, r"^kinds must be some of 'call', 'apply', 'spawn', got \[\]$"),
        (
            {"kinds": ["sleep"]},
            r"^kinds must be some of 'call', 'apply', 'spawn', got \['sleep'\]$",
        ),
        ({"batchers": 0}, r"^batchers must be >= 1, got 0$"),
        ({"delays": [-1.0]}, r"^delays must be numbers >= 0, got \[-1.0\]$"),
        ({"max_deps": -1}, r"^max_deps must be >= 0, got -1$"),
    ],
)
def test_graph_specs_checks_its_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        graph_specs(**kwargs)


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([NodeSpec("apply", deps=(0,))], r"^node 0 must depend on earlier nodes only, got \(0,\)$"),
        (
            [NodeSpec("apply"), NodeSpec("apply", deps=(0,), after=(0,))],
            r"^node 1 lists a dependency twice: \(0, 0\)$",
        ),
        (
            [NodeSpec("apply"), NodeSpec("call", deps=(0,))],
            r"^call node 1 sends its own item; give its deps as after$",
        ),
        ([NodeSpec("apply", delay=1.0)], r"^apply node 0 runs at once; its delay must be 0$"),
        ([NodeSpec("spawn", delay=-1.0)], r"^node 0 delay must be >= 0, got -1.0$"),
        ([NodeSpec("call", fail="raise")], r"^call node 0 cannot fail with 'raise'$"),
        ([NodeSpec("spawn", fail="item")], r"^spawn node 0 cannot fail with 'item'$"),
    ],
)
def test_graph_spec_checks_its_nodes(nodes: list[NodeSpec], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GraphSpec(tuple(nodes))


CHAIN = GraphSpec(
    (
        NodeSpec("spawn", delay=0.5),
        NodeSpec("call", after=(0,), delay=1.0, batcher=1),
        NodeSpec("apply", deps=(0, 1)),
        NodeSpec("spawn", deps=(2, 1, 0), delay=0.25),
        NodeSpec("call", delay=2.0),
    )
)


def test_expected_values_and_times_of_a_spec() -> None:
    call1 = SpecItem(tag=2, node=1).value
    assert call1 == 2 * 1009 + 31 + 7
    spawn0 = 2 * 1009
    apply2 = (2 * 1009 + 2 * 7919 + 2 * spawn0 + 3 * call1) % 1_000_000_007
    assert CHAIN.expected_values(tag=2)[:3] == (spawn0, call1, apply2)
    assert (
        CHAIN.expected_values(tag=2)[3]
        == (2 * 1009 + 3 * 7919 + 2 * apply2 + 3 * call1 + 4 * spawn0) % 1_000_000_007
    )
    assert CHAIN.expected_times() == (
        (0.0, 0.5),
        (0.5, 1.5),
        (1.5, 1.5),
        (1.5, 1.75),
        (0.0, 2.0),
    )


async def test_build_graph_builds_the_spec(autojump_clock: trio.testing.MockClock) -> None:
    batch_fns = [spec_batch_fn(), spec_batch_fn()]
    async with (
        mcs.open_batcher(batch_fns[0]) as b0,
        mcs.open_batcher(batch_fns[1]) as b1,
    ):
        async with mcs.open_graph() as g:
            built = build_graph(g, CHAIN, [b0, b1], tag=2)
    assert trio.current_time() == 2.0
    trace = g.trace()
    assert [(n.name, n.kind, n.deps) for n in trace.nodes] == [
        ("n0", "spawn", ()),
        ("n1", "call", (0,)),
        ("n2", "apply", (0, 1)),
        ("n3", "spawn", (2, 0, 1)),  # n2 and n0 by position, then n1 as d1=
        ("n4", "call", ()),
    ]
    assert tuple(n.result for n in built.nodes) == built.expected_values()
    assert [(n.start, n.end) for n in trace.nodes] == list(CHAIN.expected_times())
    assert [b.items for b in batch_fns[0].batches] == [(SpecItem(2, 4, 2.0),)]
    assert [b.items for b in batch_fns[1].batches] == [(SpecItem(2, 1, 1.0),)]
    assert built.run_counts(*batch_fns) == (1, 1, 1, 1, 1)
    assert built.run_counts(batch_fns[0]) == (1, 0, 1, 1, 1)  # n1 went through the other
    assert built.runs == {0: 1, 2: 1, 3: 1}


async def test_build_graph_checks_batcher_indexes() -> None:
    async with mcs.open_batcher(spec_batch_fn()) as batcher, mcs.open_graph() as g:
        with pytest.raises(ValueError, match=r"^node 1 uses batcher 1, but 1 batchers were given$"):
            build_graph(g, CHAIN, [batcher])
    assert g.trace().nodes == ()  # checked before anything was built


async def test_spec_batch_fn_fails_and_delays_as_told(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = spec_batch_fn()
    results = await batch_fn([SpecItem(0, 1, 0.5), SpecItem(0, 2, 1.0, "item")])
    assert trio.current_time() == 1.0  # the slowest item's delay
    assert results[0] == SpecItem(0, 1).value
    assert isinstance(results[1], InjectedFailure)
    assert str(results[1]) == "injected failure in node 2 of graph 0"
    with pytest.raises(InjectedFailure, match=r"^injected failure in node 4 of graph 1$") as info:
        await batch_fn([SpecItem(1, 3), SpecItem(1, 4, 0.25, "batch")])
    assert (info.value.tag, info.value.node) == (1, 4)
    assert repr(info.value) == "InjectedFailure(1, 4)"
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    assert trio.current_time() == 1.25


async def test_spec_failures_of_apply_and_spawn_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for kind in ("apply", "spawn"):
        spec = GraphSpec((NodeSpec("spawn", delay=1.0), NodeSpec(kind, deps=(0,), fail="raise")))
        with pytest.raises(InjectedFailure, match=r"^injected failure in node 1 of graph 5$"):
            async with mcs.open_graph() as g:
                build_graph(g, spec, [], tag=5)
        assert [n.outcome for n in g.trace().nodes] == ["value", "error"]


# ---------------------------------------------------------------------- invariant checks


def _trace(*nodes: tuple[tuple[int, ...], float, float, str]) -> mcs.GraphTrace:
    traces = tuple(
        mcs.NodeTrace(i, f"n{i}", "apply", deps, start, end, outcome)
        for i, (deps, start, end, outcome) in enumerate(nodes)
    )
    return mcs.GraphTrace("g", 0.0, traces, ())


GOOD = _trace(
    ((), 0.0, 1.0, "value"),
    ((0,), 1.0, 2.0, "value"),
    ((0, 1), 2.0, 2.0, "error"),
    ((2,), NAN, 2.0, "cancelled"),
    ((0,), 1.0, 2.0, "cancelled"),
)


def test_the_checks_pass_on_a_good_trace() -> None:
    assert_finished(GOOD)
    assert_dependencies_respected(GOOD)
    assert_ran_once(GOOD, [1, 1, 1, 0, 1])
    assert_ran_once(GOOD, [1, 1, 1, 0, 0])


@pytest.mark.parametrize(
    ("trace", "message"),
    [
        (_trace(((), 0.0, NAN, "running")), r"^node 0 \('n0'\) is still running$"),
        (_trace(((), NAN, NAN, "pending")), r"^node 0 \('n0'\) is still pending$"),
        (_trace(((), 0.0, NAN, "value")), r"^node 0 \('n0'\) ended with value at no time$"),
    ],
)
def test_assert_finished_names_the_culprit(trace: mcs.GraphTrace, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        assert_finished(trace)


@pytest.mark.parametrize(
    ("trace", "message"),
    [
        (
            _trace(((), 0.0, 1.0, "value"), ((0,), 0.5, 2.0, "value")),
            r"^node 1 \('n1'\) started at 0.5 before its dependency 0 ended at 1.0$",
        ),
        (
            _trace(((), 0.0, 1.0, "cancelled"), ((0,), 1.0, 2.0, "cancelled")),
            r"^node 1 \('n1'\) started although its dependency 0 ended with cancelled$",
        ),
        (
            _trace(((), 0.0, NAN, "running"), ((0,), 1.0, 2.0, "value")),
            r"^node 1 \('n1'\) started although its dependency 0 ended with running$",
        ),
        (_trace(((), NAN, 1.0, "value")), r"^node 0 \('n0'\) has value but never started$"),
        (
            _trace(((), 2.0, 1.0, "value")),
            r"^node 0 \('n0'\) ended at 1.0 before it started at 2.0$",
        ),
    ],
)
def test_assert_dependencies_respected_names_the_culprit(
    trace: mcs.GraphTrace, message: str
) -> None:
    with pytest.raises(AssertionError, match=message):
        assert_dependencies_respected(trace)


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([0, 1, 1, 0, 1], r"^node 0 \('n0'\) ended with value but ran 0 times$"),
        ([1, 2, 1, 0, 1], r"^node 1 \('n1'\) ended with value but ran 2 times$"),
        ([1, 1, 1, 1, 1], r"^node 3 \('n3'\) was cancelled but ran 1 times$"),
        ([1, 1, 1, 0, 2], r"^node 4 \('n4'\) was cancelled but ran 2 times$"),
    ],
)
def test_assert_ran_once_names_the_culprit(runs: list[int], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        assert_ran_once(GOOD, runs)


def test_assert_ran_once_needs_a_count_per_node() -> None:
    with pytest.raises(ValueError, match=r"^runs must have 5 counts, got 4$"):
        assert_ran_once(GOOD, [1, 1, 1, 0])


async def test_assert_batch_limits_names_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn: RecordingBatchFn[int, int] = RecordingBatchFn(_square, delay=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch_fn, [1])
        nursery.start_soon(batch_fn, [2, 3, 4])
    await batch_fn([])
    with pytest.raises(AssertionError, match=r"^batch 2 has 0 items; max_batch_size is 3$"):
        assert_batch_limits(batch_fn, max_batch_size=3, max_in_flight=2)
    del batch_fn.batches[2]
    assert_batch_limits(batch_fn, max_batch_size=3, max_in_flight=2)
    big = next(k for k, b in enumerate(batch_fn.batches) if len(b.items) == 3)
    with pytest.raises(AssertionError, match=rf"^batch {big} has 3 items; max_batch_size is 2$"):
        assert_batch_limits(batch_fn, max_batch_size=2, max_in_flight=2)
    with pytest.raises(
        AssertionError, match=r"^batch 1 started with 2 batches running; max_in_flight is 1$"
    ):
        assert_batch_limits(batch_fn, max_batch_size=3, max_in_flight=1)


async def test_assert_idle_names_the_busy_batcher(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        mcs.open_batcher(RecordingBatchFn(_square, delay=1.0), name="quiet") as quiet,
        mcs.open_batcher(
            RecordingBatchFn(_square, delay=1.0), name="busy", max_batch_size=1
        ) as busy,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(busy, 1)
        nursery.start_soon(busy, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert_idle(quiet)
        with pytest.raises(
            AssertionError,
            match=r"^batcher 'busy' is not idle: queued=1, waiting_for_room=0, in_flight=1$",
        ):
            assert_idle(quiet, busy)
    assert_idle(quiet, busy)
