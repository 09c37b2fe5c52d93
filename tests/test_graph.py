"""Deterministic tests of per-request graphs (``mcs.open_graph``).

Every timed test runs on the autojump clock and asserts exact virtual times.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import pytest
import trio
import trio.testing

import mcs
from mcs.testing import (
    NodeKind,
    RecordingBatchFn,
    assert_batch_limits,
    assert_idle,
    run_virtual,
)


class MyError(Exception):
    pass


class OtherError(Exception):
    pass


def _double(x: int) -> int | BaseException:
    """Item 13 fails on its own; the others are doubled."""
    return MyError("bad item 13") if x == 13 else 2 * x


def _raise_for(items: list[int]) -> BaseException | None:
    """A batch holding item 14 fails as a whole."""
    return MyError("bad batch") if 14 in items else None


def _recorder(delay: float = 1.0) -> RecordingBatchFn[int, int]:
    return RecordingBatchFn(_double, delay=delay, raise_for=_raise_for)


def _times_two(x: int) -> int:
    return 2 * x


def _healthy(delay: float) -> RecordingBatchFn[int, int]:
    return RecordingBatchFn(_times_two, delay=delay)


def _task_names() -> list[str]:
    """The names of every task alive in this run."""
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
    return names


def _graph_tasks(*spawned: str) -> list[str]:
    """Tasks alive that belong to a graph: its nursery's host, or a spawned node."""
    return [name for name in _task_names() if "mcs.Graph" in name or name in spawned]


async def _sleep_logged(log: list[float], seconds: float = math.inf) -> str:
    try:
        await trio.sleep(seconds)
    finally:
        log.append(trio.current_time())
    return "slept"


def _inc(x: int) -> int:
    return x + 1


Outcomes = dict[str, tuple[str, float | None, float | None]]


def _outcomes(trace: mcs.GraphTrace) -> Outcomes:
    """Each node's outcome, start and end by name; None for a time it has not got (nan)."""

    def time(t: float) -> float | None:
        return None if math.isnan(t) else t

    return {n.name: (n.outcome, time(n.start), time(n.end)) for n in trace.nodes}


# ---------------------------------------------------------------------- building and values


async def test_call_sends_items_through_the_batcher(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = _recorder()
    async with mcs.open_batcher(batch_fn) as batcher:
        async with mcs.open_graph() as g:
            a = g.call(batcher, 3)
            b = g.call(batcher, 4, name="four")
            assert not a.done
            assert (a.name, b.name) == (batcher.name, "four")
        assert trio.current_time() == 1.0
        assert a.done
        assert b.done
        assert (a.result, b.result) == (6, 8)
    assert [batch.items for batch in batch_fn.batches] == [(3, 4)]


async def test_a_node_as_item_sends_its_value(autojump_clock: trio.testing.MockClock) -> None:
    batch_fn = _recorder()
    async with mcs.open_batcher(batch_fn) as batcher:
        async with mcs.open_graph() as g:
            inner = g.call(batcher, 3)
            outer = g.call(batcher, inner)
        assert trio.current_time() == 2.0
        assert outer.result == 12
    assert [(b.items, b.start, b.end) for b in batch_fn.batches] == [
        ((3,), 0.0, 1.0),
        ((6,), 1.0, 2.0),
    ]
    assert g.trace().nodes[1].deps == (0,)


def _describe(a: object, b: object, *, k: object, n: object) -> str:
    return f"{a}-{b}-{k}-{n}"


async def _describe_later(a: object, b: object, *, k: object, n: object) -> str:
    await trio.sleep(0.5)
    return f"{a}-{b}-{k}-{n}"


async def test_apply_and_spawn_get_node_values_by_position_and_keyword(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mcs.open_batcher(_recorder()) as batcher:
        async with mcs.open_graph() as g:
            x = g.call(batcher, 1, name="x")
            y = g.call(batcher, 2, name="y")
            applied = g.apply(_describe, x, "lit", k=y, n=5)
            spawned = g.spawn(_describe_later, y, x, k="kw", n=x)
        assert trio.current_time() == 1.5
    assert applied.result == "2-lit-4-5"
    assert spawned.result == "4-2-kw-2"
    trace = g.trace()
    assert [(n.name, n.kind, n.deps) for n in trace.nodes] == [
        ("x", "call", ()),
        ("y", "call", ()),
        ("_describe", "apply", (0, 1)),
        ("_describe_later", "spawn", (1, 0)),
    ]
    assert [(n.start, n.end) for n in trace.nodes[2:]] == [(1.0, 1.0), (1.0, 1.5)]


async def test_after_orders_nodes_without_passing_values(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = _recorder()
    async with mcs.open_batcher(batch_fn) as batcher:
        async with mcs.open_graph() as g:
            nap = g.spawn(trio.sleep, 0.5, name="nap")
            call = g.call(batcher, 7, after=[nap])
            when = g.apply(trio.current_time, after=(nap, call))
    assert (nap.result, call.result, when.result) == (None, 14, 1.5)
    assert [(b.items, b.start) for b in batch_fn.batches] == [((7,), 0.5)]
    assert [n.deps for n in g.trace().nodes] == [(), (0,), (0, 1)]


def _pair(a: int, b: int) -> tuple[int, int]:
    return a, b


async def test_a_dependency_named_twice_is_one_dependency() -> None:
    async with mcs.open_graph() as g:
        x = g.apply(int, "4", name="x")
        y = g.apply(int, "5", name="y")
        both = g.apply(_pair, x, b=x, after=[x, y, y])
    assert both.result == (4, 4)
    assert g.trace().nodes[2].deps == (0, 1)


def _args_of(*args: object) -> tuple[object, ...]:
    return args


@pytest.mark.parametrize("shape", ["none", "one", "two", "same twice", "three", "literal"])
async def test_apply_arguments_of_every_common_shape(
    shape: str, autojump_clock: trio.testing.MockClock
) -> None:
    # Applies of one or two positional arguments keep them in slots, not in a tuple: the
    # values, the dependencies and the trace must not tell the difference.
    async with mcs.open_batcher(_recorder()) as batcher:
        async with mcs.open_graph() as g:
            x = g.call(batcher, 1, name="x")
            y = g.call(batcher, 2, name="y")
            args: tuple[object, ...] = {
                "none": (),
                "one": (y,),
                "two": (y, x),
                "same twice": (x, x),
                "three": (x, "lit", y),
                "literal": ("lit", 3),
            }[shape]
            applied = g.apply(_args_of, *args, name="applied")
        deps = g.trace().nodes[2].deps
    values = {x: 2, y: 4}
    assert applied.result == tuple(values.get(a, a) for a in args)  # type: ignore[call-overload]
    expected = {"none": (), "one": (1,), "two": (1, 0), "same twice": (0,), "three": (0, 1)}
    assert deps == expected.get(shape, ())


async def test_a_graph_cannot_be_awaited() -> None:
    # The graph is its own awaitable for the block's entry and exit only.
    message = r"^graph 'req' cannot be awaited: use 'async with mcs.open_graph\(\) as g'$"
    g = mcs.open_graph(name="req")
    with pytest.raises(TypeError, match=message):
        await g
    async with g:
        with pytest.raises(TypeError, match=message):
            await g
        with pytest.raises(TypeError, match=message):
            g.send(None)  # the await protocol, stepped by hand: nothing is parked
        node = g.apply(int, "3")
    assert node.result == 3
    with pytest.raises(TypeError, match=message):
        await g


async def test_await_node_inside_the_block(autojump_clock: trio.testing.MockClock) -> None:
    async with mcs.open_batcher(_recorder()) as batcher:
        async with mcs.open_graph() as g:
            a = g.call(batcher, 3)
            assert await a == 6
            assert trio.current_time() == 1.0
            with trio.testing.assert_checkpoints():
                assert await a == 6  # done already: still a checkpoint
            b = g.call(batcher, a.result + 1)
            assert await b == 14
            assert trio.current_time() == 2.0


async def test_block_waits_for_every_node(autojump_clock: trio.testing.MockClock) -> None:
    log: list[float] = []
    async with mcs.open_batcher(_recorder()) as batcher:
        async with mcs.open_graph() as g:
            call = g.call(batcher, 1)
            slow = g.spawn(_sleep_logged, log, 2.5, name="slow")
            then = g.apply(_inc, call, after=[slow])
        assert trio.current_time() == 2.5
        assert log == [2.5]
        assert (call.done, slow.done, then.done) == (True, True, True)
        assert then.result == 3
        assert {n.outcome for n in g.trace().nodes} == {"value"}
        assert _graph_tasks("slow") == []


async def test_result_before_completion_raises(autojump_clock: trio.testing.MockClock) -> None:
    async with mcs.open_batcher(_recorder()) as batcher:
        async with mcs.open_graph() as g:
            node = g.call(batcher, 1, name="n")
            assert not node.done
            with pytest.raises(
                RuntimeError, match=r"^node 'n' has not finished yet; await it first$"
            ):
                _ = node.result
        assert node.done
        assert node.result == 2


async def test_result_of_failed_and_cancelled_nodes() -> None:
    with pytest.raises(MyError) as excinfo:  # noqa: PT012
        async with mcs.open_graph() as g:
            bad = g.spawn(_fail_after, 0, "boom", name="bad")
            child = g.apply(_inc, bad, name="child")
    with pytest.raises(MyError) as again:
        _ = bad.result
    assert again.value is excinfo.value
    with pytest.raises(RuntimeError, match=r"^node 'child' was cancelled before it finished$"):
        _ = child.result
    assert child.done


async def test_reprs(autojump_clock: trio.testing.MockClock) -> None:
    g = mcs.open_graph(name="req")
    assert repr(g) == "<mcs.Graph 'req' new: 0 nodes, 0 unfinished>"
    async with mcs.open_batcher(_recorder(), name="users") as batcher, g:
        node = g.call(batcher, 1)
        pending = g.apply(_inc, node, name="inc")
        assert repr(g) == "<mcs.Graph 'req' open: 2 nodes, 2 unfinished>"
        assert repr(node) == "<mcs.Node 'users' call running>"
        assert repr(pending) == "<mcs.Node 'inc' apply pending>"
    assert repr(g) == "<mcs.Graph 'req' closed: 2 nodes, 0 unfinished>"
    assert repr(pending) == "<mcs.Node 'inc' apply value>"


# ---------------------------------------------------------------------- misuse


async def test_a_node_from_another_graph_is_refused() -> None:
    async with mcs.open_batcher(_recorder()) as batcher:
        async with mcs.open_graph(name="one") as one:
            a = one.apply(int, name="a")
            async with mcs.open_graph(name="two") as two:
                message = r"^node 'a' belongs to another graph$"
                with pytest.raises(ValueError, match=message):
                    two.call(batcher, a)
                with pytest.raises(ValueError, match=message):
                    two.call(batcher, 1, after=[a])
                with pytest.raises(ValueError, match=message):
                    two.apply(_inc, a)
                with pytest.raises(ValueError, match=message):
                    two.spawn(_describe_later, 1, 2, k=a, n=3)
                with pytest.raises(ValueError, match=message):
                    two.apply(_inc, 1, after=[a])
            assert two.trace().nodes == ()  # nothing was added
        async with mcs.open_graph(name="three") as three:
            with pytest.raises(ValueError, match=message):  # a closed graph's node
                three.apply(_inc, a)
    assert batcher.statistics().items == 0


async def test_after_must_hold_nodes() -> None:
    async with mcs.open_batcher(_recorder()) as batcher, mcs.open_graph() as g:
        with pytest.raises(TypeError, match=r"^after must hold nodes, got 3$"):
            g.call(batcher, 1, after=[3])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"^after must hold nodes, got 'x'$"):
            g.apply(_inc, 1, after=["x"])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"^after must hold nodes, got None$"):
            g.spawn(trio.sleep, 0, after=[g.apply(int), None])  # type: ignore[list-item]
    assert len(g.trace().nodes) == 1  # only the int() node
    assert batcher.statistics().items == 0


async def test_graph_must_be_open() -> None:
    async with mcs.open_batcher(_recorder()) as batcher:
        g = mcs.open_graph()
        not_open = r"^graph 'graph' is not open: use 'async with mcs.open_graph\(\) as g'$"
        with pytest.raises(RuntimeError, match=not_open):
            g.call(batcher, 1)
        with pytest.raises(RuntimeError, match=not_open):
            g.apply(_inc, 1)
        with pytest.raises(RuntimeError, match=not_open):
            g.spawn(trio.sleep, 0)
        async with g:
            pass
        closed = r"^graph 'graph' is closed$"
        with pytest.raises(RuntimeError, match=closed):
            g.call(batcher, 1)
        with pytest.raises(RuntimeError, match=closed):
            g.apply(_inc, 1)
        with pytest.raises(RuntimeError, match=closed):
            g.spawn(trio.sleep, 0)
    assert batcher.statistics().items == 0


async def test_a_graph_is_entered_once() -> None:
    twice = r"^graph 'req' was already entered; open a new one$"
    g = mcs.open_graph(name="req")
    async with g:
        with pytest.raises(RuntimeError, match=twice):
            await g.__aenter__()
        node = g.apply(int, "2")
    assert node.result == 2
    with pytest.raises(RuntimeError, match=twice):
        async with g:
            pass


async def _coro_fn() -> None:
    await trio.lowlevel.checkpoint()


async def test_bad_node_arguments_are_refused() -> None:
    async with mcs.open_graph() as g:
        with pytest.raises(TypeError, match=r"^batcher must be a mcs.Batcher, got 'db'$"):
            g.call(cast(Any, "db"), 1)
        with pytest.raises(
            TypeError,
            match=r"^apply needs a sync function \(use spawn for async ones\), "
            r"got <function _coro_fn at 0x[0-9a-f]+>$",
        ):
            g.apply(_coro_fn)
        with pytest.raises(
            TypeError, match=r"^apply needs a sync function \(use spawn for async ones\), got 3$"
        ):
            g.apply(3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^spawn needs an async function, got <class 'int'>$"):
            g.spawn(int)  # type: ignore[arg-type]
    assert g.trace().nodes == ()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"timeout": -1}, ValueError, r"^timeout must be >= 0 and finite, got -1$"),
        ({"timeout": math.nan}, ValueError, r"^timeout must be >= 0 and finite, got nan$"),
        ({"timeout": math.inf}, ValueError, r"^timeout must be >= 0 and finite, got inf$"),
        ({"timeout": "1"}, TypeError, r"^timeout must be a number of seconds, got '1'$"),
        ({"timeout": True}, TypeError, r"^timeout must be a number of seconds, got True$"),
        ({"name": 3}, TypeError, r"^name must be a str or None, got 3$"),
    ],
)
def test_open_graph_checks_its_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        mcs.open_graph(**kwargs)


# ---------------------------------------------------------------------- the failure policy


async def _fail_after(seconds: float, message: str) -> None:
    await trio.sleep(seconds)
    raise MyError(message)


def _fail_with(value: int) -> int:
    raise MyError(f"bad apply {value}")


FailureKind = Literal["item", "batch", "apply", "spawn"]


def _failing_node(
    g: mcs.Graph, how: FailureKind, fast: mcs.Batcher[int, int]
) -> tuple[mcs.Node[Any], str]:
    """Add a node named "bad" that fails at t=1.0; return it and its error message."""
    if how == "item":
        return g.call(fast, 13, name="bad"), "bad item 13"
    if how == "batch":
        return g.call(fast, 14, name="bad"), "bad batch"
    if how == "apply":
        return g.apply(_fail_with, g.call(fast, 3, name="trigger"), name="bad"), "bad apply 6"
    return g.spawn(_fail_after, 1.0, "bad spawn", name="bad"), "bad spawn"


@pytest.mark.parametrize("how", ["item", "batch", "apply", "spawn"])
async def test_first_failure_cancels_the_rest_and_is_raised_unwrapped(
    autojump_clock: trio.testing.MockClock, how: FailureKind
) -> None:
    fast_fn, held_fn = _recorder(1.0), _recorder(5.0)
    log: list[float] = []
    async with (
        mcs.open_batcher(fast_fn, name="fast") as fast,
        mcs.open_batcher(held_fn, name="held") as held,
    ):
        message = ""
        with pytest.raises(MyError) as excinfo:  # noqa: PT012
            async with mcs.open_graph() as g:
                tick = g.spawn(trio.sleep, 0.5, name="tick")
                g.call(held, 1, name="in_flight")  # sent at 0: dropped when the graph fails
                g.call(held, 2, name="queued", after=[tick])  # waits for held's only slot
                g.spawn(_sleep_logged, log, name="sleeper")
                bad, message = _failing_node(g, how, fast)
                g.apply(_inc, bad, name="child")
                nap = g.spawn(trio.sleep, 2.0, name="nap")
                g.call(fast, 5, name="late", after=[nap])
        assert trio.current_time() == 1.0
        assert type(excinfo.value) is MyError
        assert str(excinfo.value) == message
        trace = g.trace()
        expected = {
            "tick": ("value", 0.0, 0.5),
            "in_flight": ("cancelled", 0.0, 1.0),
            "queued": ("cancelled", 0.5, 1.0),
            "sleeper": ("cancelled", 0.0, 1.0),
            "bad": ("error", 0.0 if how != "apply" else 1.0, 1.0),
            "child": ("cancelled", None, 1.0),
            "nap": ("cancelled", 0.0, 1.0),
            "late": ("cancelled", None, 1.0),
        }
        if how == "apply":
            expected["trigger"] = ("value", 0.0, 1.0)
        assert _outcomes(trace) == expected
        assert [n.error for n in trace.nodes if n.outcome == "error"] == [excinfo.value]
        assert log == [1.0]  # the spawned task saw the cancellation at once
        assert _graph_tasks("sleeper", "tick", "bad", "nap") == []
        stats = held.statistics()
        assert (stats.queued, stats.withdrawn, stats.dropped, stats.in_flight) == (0, 1, 1, 1)
        assert held_fn.items == [1]  # item 2 was withdrawn before it was sent
        assert 5 not in fast_fn.items
        await trio.sleep(4.5)  # the dropped batch runs to its end at 5.0, its result discarded
        assert held_fn.batches[0].outcome == "returned"
        assert held_fn.batches[0].end == 5.0
        assert_idle(fast, held)


@pytest.mark.parametrize("shape", ["call", "batch", "call then apply", "slowest", "apply"])
async def test_a_failure_of_the_last_node_to_finish_is_raised(
    autojump_clock: trio.testing.MockClock, shape: str
) -> None:
    # No spawned node and no timeout: the block's exit parks the request task directly, and
    # the failing node is the one that completes the graph.
    async with (
        mcs.open_batcher(_recorder(1.0)) as fast,
        mcs.open_batcher(_recorder(2.0)) as slow,
    ):
        with pytest.raises(MyError) as excinfo:  # noqa: PT012
            async with mcs.open_graph() as g:
                if shape == "call":
                    g.call(fast, 13)
                elif shape == "batch":
                    g.call(fast, 14)
                elif shape == "call then apply":
                    g.apply(_fail_with, g.call(fast, 1))
                elif shape == "slowest":
                    g.call(fast, 1)
                    g.call(slow, 13)
                else:
                    g.apply(_fail_with, 5)  # fails inside the block
        expected = {
            "call": ("bad item 13", 1.0),
            "batch": ("bad batch", 1.0),
            "call then apply": ("bad apply 2", 1.0),
            "slowest": ("bad item 13", 2.0),
            "apply": ("bad apply 5", 0.0),
        }
        assert (str(excinfo.value), trio.current_time()) == expected[shape]
    assert [n.error for n in g.trace().nodes if n.outcome == "error"] == [excinfo.value]


async def test_nodes_waiting_on_a_failed_node_are_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = _recorder()
    async with mcs.open_batcher(batch_fn) as batcher:
        with pytest.raises(MyError, match=r"^bad item 13$"):  # noqa: PT012
            async with mcs.open_graph() as g:
                bad = g.call(batcher, 13, name="bad")
                child = g.apply(_inc, bad, name="child")
                grandchild = g.call(batcher, child, name="grandchild")
                waiter = g.spawn(_describe_later, 1, 2, k=3, n=4, name="waiter", after=[bad])
                later = g.call(batcher, 5, name="later", after=[waiter])
        assert trio.current_time() == 1.0
    trace = g.trace()
    assert _outcomes(trace) == {
        "bad": ("error", 0.0, 1.0),
        "child": ("cancelled", None, 1.0),
        "grandchild": ("cancelled", None, 1.0),
        "waiter": ("cancelled", None, 1.0),
        "later": ("cancelled", None, 1.0),
    }
    assert (grandchild.done, later.done) == (True, True)
    assert batch_fn.items == [13]


async def _fail_on_cancel() -> None:
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        raise OtherError("cleanup failed") from None


async def test_only_the_first_failure_is_raised(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(MyError, match=r"^first$"):  # noqa: PT012
        async with mcs.open_graph() as g:
            g.spawn(_fail_after, 1.0, "first", name="first")
            g.spawn(_fail_on_cancel, name="second")  # fails because it was cancelled
            g.spawn(_fail_after, 2.0, "third", name="third")  # cancelled before it fails
    assert trio.current_time() == 1.0
    trace = g.trace()
    assert [(n.name, n.outcome, repr(n.error)) for n in trace.nodes] == [
        ("first", "error", "MyError('first')"),
        ("second", "error", "OtherError('cleanup failed')"),
        ("third", "cancelled", "None"),
    ]
    assert [n.end for n in trace.nodes] == [1.0, 1.0, 1.0]


async def test_an_error_in_the_block_cancels_the_nodes_and_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[float] = []
    batch_fn = _recorder()
    mine = KeyError("mine")
    async with mcs.open_batcher(batch_fn, max_in_flight=1) as batcher:
        with pytest.raises(KeyError) as excinfo:  # noqa: PT012
            async with mcs.open_graph() as g:
                g.call(batcher, 1, name="in_flight")
                g.spawn(_sleep_logged, log, name="sleeper")
                await trio.sleep(0.5)
                g.call(batcher, 2, name="queued")
                raise mine
        assert excinfo.value is mine
        assert trio.current_time() == 0.5
        assert log == [0.5]
        assert _outcomes(g.trace()) == {
            "in_flight": ("cancelled", 0.0, 0.5),
            "sleeper": ("cancelled", 0.0, 0.5),
            "queued": ("cancelled", 0.5, 0.5),
        }
        stats = batcher.statistics()
        assert (stats.queued, stats.withdrawn, stats.dropped) == (0, 1, 1)
        assert _graph_tasks("sleeper") == []
    assert batch_fn.items == [1]


async def test_a_failure_does_not_interrupt_the_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = _recorder()
    async with mcs.open_batcher(batch_fn) as batcher:
        with pytest.raises(MyError, match=r"^boom$"):  # noqa: PT012
            async with mcs.open_graph() as g:
                g.spawn(_fail_after, 1.0, "boom", name="bad")
                await trio.sleep(3.0)  # not cancelled by the failure at 1.0
                assert trio.current_time() == 3.0
                late = g.call(batcher, 1, name="late")  # the graph has failed: never sent
                assert late.done
                with pytest.raises(
                    RuntimeError, match=r"^node 'late' was cancelled before it finished$"
                ):
                    _ = late.result
        assert trio.current_time() == 3.0
    assert batch_fn.batches == []
    assert _outcomes(g.trace()) == {"bad": ("error", 0.0, 1.0), "late": ("cancelled", None, 3.0)}


async def test_await_node_raises_the_graph_error(autojump_clock: trio.testing.MockClock) -> None:
    async with mcs.open_batcher(_recorder()) as batcher:
        with pytest.raises(MyError, match=r"^bad item 13$") as at_exit:  # noqa: PT012
            async with mcs.open_graph() as g:
                bad = g.call(batcher, 13, name="bad")
                child = g.apply(_inc, bad, name="child")
                with pytest.raises(MyError, match=r"^bad item 13$") as awaited:
                    await child  # cancelled because of bad: raises bad's error
                assert trio.current_time() == 1.0
                with pytest.raises(MyError) as direct:
                    await bad
    assert awaited.value is direct.value is at_exit.value


async def _graph_of_three(
    batcher: mcs.Batcher[int, int], base: int, results: dict[int, tuple[int, int, int]]
) -> None:
    """A request: a first-stage call, a second stage on its value, and a late call."""
    async with mcs.open_graph(name=f"g{base}") as g:
        first = g.call(batcher, base + 3)  # item 13 fails in graph 10
        g.call(batcher, base + 2, name="mate")  # same batch as first, after it
        second = g.call(batcher, first)
        late = g.call(batcher, base + 5, after=[g.spawn(trio.sleep, 0.5)])  # queued at 0.5
    results[base] = (first.result, second.result, late.result)


async def test_a_failure_never_touches_another_graph(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = _recorder()
    results: dict[int, tuple[int, int, int]] = {}
    failed_at: list[float] = []

    async def failing() -> None:
        with pytest.raises(MyError, match=r"^bad item 13$"):
            await _graph_of_three(batcher, 10, results)
        failed_at.append(trio.current_time())

    async with mcs.open_batcher(batch_fn, max_in_flight=1) as batcher:
        # let the dispatcher park, so that it takes the three graphs' items as one batch
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_graph_of_three, batcher, 0, results)
            nursery.start_soon(failing)
            nursery.start_soon(_graph_of_three, batcher, 20, results)
        assert trio.current_time() == 2.0
    assert results == {0: (6, 12, 10), 20: (46, 92, 50)}
    assert failed_at == [1.0]
    assert [sorted(b.items) for b in batch_fn.batches] == [
        [2, 3, 12, 13, 22, 23],
        [5, 6, 25, 46],  # 15 (queued) was withdrawn; graph 10 sent no second stage
    ]
    stats = batcher.statistics()
    assert (stats.withdrawn, stats.dropped) == (1, 1)  # 15 withdrawn, 12 dropped


async def test_cancelling_one_graph_never_touches_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = _recorder()
    results: dict[int, tuple[int, int, int]] = {}
    cancelled_at: list[float] = []

    async def cancelled() -> None:
        with trio.move_on_after(0.75) as scope:
            await _graph_of_three(batcher, 30, results)
        assert scope.cancelled_caught
        cancelled_at.append(trio.current_time())

    async with mcs.open_batcher(batch_fn, max_in_flight=1) as batcher:
        # let the dispatcher park, so that it takes the three graphs' items as one batch
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_graph_of_three, batcher, 0, results)
            nursery.start_soon(cancelled)
            nursery.start_soon(_graph_of_three, batcher, 20, results)
        assert trio.current_time() == 2.0
    assert results == {0: (6, 12, 10), 20: (46, 92, 50)}
    assert cancelled_at == [0.75]
    assert [sorted(b.items) for b in batch_fn.batches] == [
        [2, 3, 22, 23, 32, 33],
        [5, 6, 25, 46],  # 35 (queued) was withdrawn
    ]
    stats = batcher.statistics()
    assert (stats.withdrawn, stats.dropped) == (1, 2)  # 35 withdrawn, 32 and 33 dropped


# ---------------------------------------------------------------------- deadlines


def _timed_graph(
    g: mcs.Graph, held: mcs.Batcher[int, int], log: list[float]
) -> tuple[Outcomes, mcs.Node[int]]:
    """Nodes cut short at t=1.5; returns the trace outcomes expected then, and the last node."""
    first = g.call(held, 1, name="first")  # 0 -> 1
    second = g.call(held, first, name="second")  # 1 -> 2: in flight at 1.5
    tick = g.spawn(trio.sleep, 1.25, name="tick")
    g.call(held, 7, name="queued", after=[tick])  # queued at 1.25 behind second
    g.spawn(_sleep_logged, log, 10.0, name="sleeper")
    later = g.apply(_inc, second, name="later")
    return {
        "first": ("value", 0.0, 1.0),
        "second": ("cancelled", 1.0, 1.5),
        "tick": ("value", 0.0, 1.25),
        "queued": ("cancelled", 1.25, 1.5),
        "sleeper": ("cancelled", 0.0, 1.5),
        "later": ("cancelled", None, 1.5),
    }, later


TOO_SLOW = r"^graph 'req' timed out after 1.5 s$"


async def _check_cut_short(
    g: mcs.Graph,
    expected: Outcomes,
    held: mcs.Batcher[int, int],
    held_fn: RecordingBatchFn[int, int],
    log: list[float],
) -> None:
    assert trio.current_time() == 1.5
    assert _outcomes(g.trace()) == expected
    assert log == [1.5]
    assert _graph_tasks("sleeper", "tick") == []
    stats = held.statistics()
    assert (stats.queued, stats.withdrawn, stats.dropped, stats.in_flight) == (0, 1, 1, 1)
    await trio.sleep(1.0)  # the dropped batch ends at 2.0
    assert_idle(held)
    assert held_fn.items == [1, 2]  # 7 was withdrawn


async def test_timeout_raises_too_slow_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    held_fn = _recorder()
    log: list[float] = []
    async with mcs.open_batcher(held_fn, max_in_flight=1) as held:
        with pytest.raises(trio.TooSlowError, match=TOO_SLOW):
            async with mcs.open_graph(timeout=1.5, name="req") as g:
                expected, _ = _timed_graph(g, held, log)
        await _check_cut_short(g, expected, held, held_fn, log)


async def test_timeout_while_awaiting_a_node(autojump_clock: trio.testing.MockClock) -> None:
    held_fn = _recorder()
    log: list[float] = []
    async with mcs.open_batcher(held_fn, max_in_flight=1) as held:
        with pytest.raises(trio.TooSlowError, match=TOO_SLOW):  # noqa: PT012
            async with mcs.open_graph(timeout=1.5, name="req") as g:
                expected, later = _timed_graph(g, held, log)
                await later
        await _check_cut_short(g, expected, held, held_fn, log)


async def test_a_timeout_not_reached_leaves_no_deadline_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mcs.open_graph(timeout=1.5) as g:
        nap = g.spawn(trio.sleep, 1.0)
    assert nap.done
    assert trio.current_time() == 1.0
    assert trio.current_effective_deadline() == math.inf
    await trio.sleep(5.0)  # not cut short by the graph's former deadline
    assert trio.current_time() == 6.0


@pytest.mark.parametrize("how", ["deadline", "deadline set later", "cancel"])
async def test_an_enclosing_cancel_scope_cancels_the_graph(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    held_fn = _recorder()
    log: list[float] = []
    async with mcs.open_batcher(held_fn, max_in_flight=1) as held, trio.open_nursery() as nursery:
        with trio.CancelScope(deadline=1.5 if how == "deadline" else math.inf) as scope:
            async with mcs.open_graph() as g:
                expected, _ = _timed_graph(g, held, log)  # the first spawn reads the deadline
                if how == "deadline set later":
                    scope.deadline = 1.5
                elif how == "cancel":
                    nursery.start_soon(_cancel_at, scope, 1.5)
        assert scope.cancelled_caught
        await _check_cut_short(g, expected, held, held_fn, log)


async def _cancel_at(scope: trio.CancelScope, when: float) -> None:
    await trio.sleep_until(when)
    scope.cancel()


# ---------------------------------------------------------------------- inside handlers


def _render(user: int, posts: int) -> str:
    return f"user {user} posts {posts}"


async def test_many_graphs_at_once_share_batchers(autojump_clock: trio.testing.MockClock) -> None:
    users_fn, posts_fn = _healthy(1.0), _healthy(2.0)
    pages: dict[int, str] = {}
    traces: list[mcs.GraphTrace] = []

    async def handler(uid: int) -> None:
        async with mcs.open_graph(name=f"req{uid}") as g:
            page = g.apply(_render, g.call(users, uid), g.call(posts, uid + 1000))
        pages[uid] = page.result
        traces.append(g.trace())

    async with (
        mcs.open_batcher(users_fn, max_batch_size=30, max_in_flight=2) as users,
        mcs.open_batcher(posts_fn, max_batch_size=30, max_in_flight=2) as posts,
    ):
        await trio.testing.wait_all_tasks_blocked()  # both dispatchers parked
        async with trio.open_nursery() as nursery:
            for uid in range(100):
                nursery.start_soon(handler, uid)
        assert trio.current_time() == 4.0
        assert_idle(users, posts)
    assert pages == {uid: _render(2 * uid, 2 * (uid + 1000)) for uid in range(100)}
    for batch_fn, delay in ((users_fn, 1.0), (posts_fn, 2.0)):
        assert sorted((b.start, len(b.items)) for b in batch_fn.batches) == [
            (0.0, 30),
            (0.0, 30),
            (delay, 10),
            (delay, 30),
        ]
        assert sorted(batch_fn.items) == sorted(set(batch_fn.items))  # each item once
        assert_batch_limits(batch_fn, max_batch_size=30, max_in_flight=2)
        assert batch_fn.peak_concurrency == 2
    assert sorted(t.nodes[2].end for t in traces) == [2.0] * 60 + [4.0] * 40
    assert _graph_tasks() == []


async def test_a_graph_per_request_in_a_stream_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    users_fn = _healthy(1.0)
    replies: dict[int, bytes] = {}

    async def handle(stream: trio.abc.Stream) -> None:
        async with stream:
            request = await stream.receive_some()
            async with mcs.open_graph() as g:
                user = g.call(users, int(request))
                reply = g.apply(_render, user, g.spawn(_posts_of, user))
            await stream.send_all(reply.result.encode())

    async def client(stream: trio.abc.Stream, uid: int) -> None:
        async with stream:
            await stream.send_all(b"%d" % uid)
            chunks = []
            while chunk := await stream.receive_some():
                chunks.append(chunk)
        replies[uid] = b"".join(chunks)

    async with mcs.open_batcher(users_fn) as users:
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            for uid in range(20):
                client_stream, server_stream = trio.testing.memory_stream_pair()
                nursery.start_soon(handle, server_stream)
                nursery.start_soon(client, client_stream, uid)
        assert trio.current_time() == 1.5
    assert replies == {uid: b"user %d posts %d" % (2 * uid, 6 * uid) for uid in range(20)}
    assert [sorted(b.items) for b in users_fn.batches] == [list(range(20))]


async def _posts_of(user: int) -> int:
    await trio.sleep(0.5)
    return 3 * user


# ---------------------------------------------------------------------- trace


async def test_trace_of_a_chain(autojump_clock: trio.testing.MockClock) -> None:
    await trio.sleep(10.0)  # times are on trio's clock; the trace is relative to the block
    async with mcs.open_batcher(_recorder(1.0), max_batch_size=1) as batcher:
        async with mcs.open_graph(name="chain") as g:
            fetched = g.spawn(_posts_of, 1, name="fetch")
            loaded = g.call(batcher, fetched, name="load")
            summed = g.apply(_render, fetched, loaded, name="render")
            g.spawn(trio.sleep, 0.25, name="log", after=[summed])
        assert trio.current_time() == 11.75
    trace = g.trace()
    assert (trace.name, trace.start) == ("chain", 10.0)
    rows: list[tuple[str, NodeKind, tuple[int, ...], float, float]] = [
        ("fetch", "spawn", (), 10.0, 10.5),
        ("load", "call", (0,), 10.5, 11.5),
        ("render", "apply", (0, 1), 11.5, 11.5),
        ("log", "spawn", (2,), 11.5, 11.75),
    ]
    assert trace.nodes == tuple(
        mcs.NodeTrace(
            index=i,
            name=name,
            kind=kind,
            deps=deps,
            start=start,
            end=end,
            outcome="value",
        )
        for i, (name, kind, deps, start, end) in enumerate(rows)
    )
    assert trace.critical_path == trace.nodes
    assert str(trace) == "\n".join(
        [
            "graph 'chain': 4 nodes in 1750.000 ms",
            "*   0 fetch  spawn |#########                     |     0.000 ->   500.000 ms "
            "value     after -",
            "*   1 load   call  |         #################    |   500.000 ->  1500.000 ms "
            "value     after 0",
            "*   2 render apply |                          #   |  1500.000 ->  1500.000 ms "
            "value     after 0,1",
            "*   3 log    spawn |                          ####|  1500.000 ->  1750.000 ms "
            "value     after 2",
        ]
    )


@pytest.mark.parametrize(
    ("call_delay", "spawn_delay", "path"),
    [(1.0, 2.0, ["start", "spawned", "join"]), (2.0, 1.0, ["start", "called", "join"])],
)
async def test_critical_path_follows_the_slower_branch(
    autojump_clock: trio.testing.MockClock, call_delay: float, spawn_delay: float, path: list[str]
) -> None:
    async with mcs.open_batcher(_recorder(call_delay)) as batcher:
        async with mcs.open_graph() as g:
            start = g.spawn(trio.sleep, 0.25, name="start")
            called = g.call(batcher, 1, name="called", after=[start])
            spawned = g.spawn(trio.sleep, spawn_delay, name="spawned", after=[start])
            g.apply(_pair, called, spawned, name="join")
    end = 0.25 + max(call_delay, spawn_delay)
    assert trio.current_time() == end
    trace = g.trace()
    assert [n.name for n in trace.critical_path] == path
    assert [(n.start, n.end) for n in trace.critical_path] == [
        (0.0, 0.25),
        (0.25, end),
        (end, end),
    ]
    lines = str(trace).splitlines()
    assert lines[0] == f"graph 'graph': 4 nodes in {end * 1e3:.3f} ms"
    assert len(lines) == 5
    for line, node in zip(lines[1:], trace.nodes, strict=True):
        marked = "*" if node.name in path else " "
        assert line.startswith(f"{marked}{node.index:>4} {node.name:<7} {node.kind:<5} |")


async def test_trace_inside_the_block_and_after_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mcs.open_batcher(_recorder(1.0)) as batcher:
        with pytest.raises(MyError, match=r"^bad item 13$") as excinfo:  # noqa: PT012
            async with mcs.open_graph() as g:
                ok = g.call(batcher, 1, name="ok")
                nap = g.spawn(trio.sleep, 0.5, name="nap")
                g.call(batcher, 13, name="bad", after=[nap])
                g.apply(_inc, ok, name="inc", after=[nap])
                await trio.sleep(0.25)
                inside = g.trace()
        assert trio.current_time() == 2.0  # bad waited for the batcher's slot until 1.0
    assert _outcomes(inside) == {
        "ok": ("running", 0.0, None),
        "nap": ("running", 0.0, None),
        "bad": ("pending", None, None),
        "inc": ("pending", None, None),
    }
    assert inside.critical_path == ()  # nothing has ended yet
    after = g.trace()
    assert _outcomes(after) == {
        "ok": ("value", 0.0, 1.0),
        "nap": ("value", 0.0, 0.5),
        "bad": ("error", 0.5, 2.0),
        "inc": ("value", 1.0, 1.0),
    }
    assert after.nodes[2].error is excinfo.value
    assert [n.name for n in after.critical_path] == ["nap", "bad"]
    assert "error     after 1" in str(after).splitlines()[3]


# ---------------------------------------------------------------------- edges


async def test_exit_is_a_checkpoint() -> None:
    with trio.testing.assert_checkpoints():
        async with mcs.open_graph():
            pass
    with trio.testing.assert_checkpoints():
        async with mcs.open_graph() as g:
            g.apply(int)  # done at once: nothing to wait for


async def test_a_failure_before_spawned_tasks_start_never_runs_them() -> None:
    ran: list[str] = []

    async def record() -> None:
        ran.append("ran")

    with pytest.raises(MyError, match=r"^bad apply 1$"):  # noqa: PT012
        async with mcs.open_graph() as g:
            g.spawn(record, name="spawned")
            g.apply(_fail_with, 1, name="bad")  # fails before the spawned task is scheduled
    assert ran == []
    assert [(n.name, n.outcome) for n in g.trace().nodes] == [
        ("spawned", "cancelled"),
        ("bad", "error"),
    ]
    assert _graph_tasks("spawned") == []


async def test_a_call_to_a_closed_batcher_fails_the_graph() -> None:
    async with mcs.open_batcher(_recorder(), name="db") as batcher:
        pass
    with pytest.raises(trio.ClosedResourceError, match=r"^batcher 'db' is closed$"):  # noqa: PT012
        async with mcs.open_graph() as g:
            g.call(batcher, 1, name="closed")
            pending = g.call(batcher, 2, after=[g.spawn(trio.sleep, 1)])
    assert pending.done
    assert [n.outcome for n in g.trace().nodes] == ["error", "cancelled", "cancelled"]


async def test_a_call_refused_by_a_full_batcher_fails_the_graph(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn = _recorder()
    async with mcs.open_batcher(
        batch_fn, name="db", queue_size=1, overload="reject", max_in_flight=1
    ) as batcher:
        with pytest.raises(mcs.Overloaded, match=r"^batcher 'db' is full \(1 items queued\)$"):  # noqa: PT012
            async with mcs.open_graph() as g:
                g.call(batcher, 1)
                g.call(batcher, 2)
        assert trio.current_time() == 0.0
        assert batcher.statistics().withdrawn == 1
    assert batch_fn.batches == []


async def test_a_timeout_with_calls_only(autojump_clock: trio.testing.MockClock) -> None:
    batch_fn = _recorder()
    async with mcs.open_batcher(batch_fn, max_in_flight=1, max_batch_size=1) as batcher:
        with pytest.raises(trio.TooSlowError, match=r"^graph 'graph' timed out after 1.5 s$"):  # noqa: PT012
            async with mcs.open_graph(timeout=1.5) as g:
                first = g.call(batcher, 1, name="first")  # 0 -> 1
                g.call(batcher, 3, name="third")  # 1 -> 2: in flight at 1.5
                g.call(batcher, first, name="second")  # queued at 1 behind third
        assert trio.current_time() == 1.5
        assert _outcomes(g.trace()) == {
            "first": ("value", 0.0, 1.0),
            "third": ("cancelled", 0.0, 1.5),
            "second": ("cancelled", 1.0, 1.5),
        }
        assert [b.items for b in batch_fn.batches] == [(1,), (3,)]
        stats = batcher.statistics()
        assert (stats.queued, stats.withdrawn, stats.dropped) == (0, 1, 1)


async def test_a_scope_inside_the_block_does_not_bound_later_spawns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The first spawn happens under a short scope nested in the block (bounding the wait for
    # one node); that scope is the caller's business, not the graph's, and must not cut the
    # graph's later tasks short.
    async with mcs.open_graph() as g:
        with trio.move_on_after(0.5):
            first = g.spawn(trio.sleep, 0.25, name="first")
            await first
        second = g.spawn(trio.sleep, 1.0, name="second")  # at 0.25, once first is done
    assert trio.current_time() == 1.25
    assert _outcomes(g.trace()) == {
        "first": ("value", 0.0, 0.25),
        "second": ("value", 0.25, 1.25),
    }
    assert (first.result, second.result) == (None, None)


async def test_a_clean_exit_means_every_node_has_its_value(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The enclosing deadline is pushed back after the graph was entered: spawned nodes keep
    # the deadline of graph entry, so the nap is cancelled at 1.0; the block must not end
    # quietly with a node cancelled.
    with trio.move_on_after(1.0) as scope:
        with pytest.raises(  # noqa: PT012
            trio.TooSlowError, match=r"^graph 'graph' passed the deadline it was entered with$"
        ):
            async with mcs.open_graph() as g:
                nap = g.spawn(trio.sleep, 2.0, name="nap")
                scope.deadline += 5.0
        assert nap.done
        assert [(n.name, n.outcome) for n in g.trace().nodes] == [("nap", "cancelled")]
        assert trio.current_time() == 1.0
    assert not scope.cancelled_caught


@pytest.mark.parametrize("deadline", ["timeout", "enclosing scope"])
def test_a_deadline_racing_a_dependency_neither_hangs_nor_breaks_the_batcher(
    deadline: str,
) -> None:
    # At t=1.0 the graph's deadline expires, cancelling the graph and the nursery of its idle
    # spawned tasks, while the batch its next spawn waits for returns. Which runs first is up
    # to trio's scheduler, so each run holds several such graphs, and the test runs many times.
    async def request(batcher: mcs.Batcher[int, int]) -> None:
        with trio.move_on_after(1.0 if deadline == "enclosing scope" else math.inf) as scope:
            try:
                async with mcs.open_graph(timeout=1.0 if deadline == "timeout" else None) as g:
                    g.spawn(trio.sleep, 0, name="early")  # done at once: the nursery idles
                    g.spawn(trio.sleep, 0, name="late", after=[g.call(batcher, 1)])  # at 1.0
            except trio.TooSlowError:
                assert deadline == "timeout"
            else:
                assert scope.cancelled_caught
        assert trio.current_time() == 1.0
        assert g.trace().nodes[2].outcome == "cancelled"

    async def main() -> None:
        async with mcs.open_batcher(_healthy(1.0)) as batcher:
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(request, batcher)
            assert await batcher(5) == 10  # the batcher still works

    for _ in range(40):
        run_virtual(main)  # a deadlock fails instead of spinning the clock forever


async def test_the_default_queue_takes_a_busy_service_without_a_room_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 40,000 concurrent calls (a busy service, far more than one batch) all fit in the default
    # queue: none goes through the room queue. With the old default (10,000) 30,000 would.
    async def double(items: list[int]) -> list[int]:
        await trio.sleep(1.0)
        return [2 * i for i in items]

    async with mcs.open_batcher(double) as batcher:
        async with mcs.open_graph() as g:
            for i in range(40_000):
                g.call(batcher, i)
            stats = batcher.statistics()
            assert (stats.queued, stats.waiting_for_room) == (40_000, 0)
