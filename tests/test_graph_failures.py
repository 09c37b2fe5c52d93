"""Failure paths of graphs: tracebacks, garbage, context, deadlines, wrong runs, the engine room.

Every timed test runs on the autojump clock and asserts exact virtual times; every test that
could hang on a bug is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import importlib
import pkgutil
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from garbage import cyclic_garbage

import mcs
from mcs.testing import RecordingBatchFn


class MyError(Exception):
    pass


def _times_two(x: int) -> int:
    return 2 * x


def _healthy(delay: float = 1.0) -> RecordingBatchFn[int, int]:
    return RecordingBatchFn(_times_two, delay=delay)


def _fail_apply(x: int) -> int:
    raise MyError(f"bad apply {x}")


async def _fail_spawn(seconds: float) -> None:
    await trio.sleep(seconds)
    raise MyError("bad spawn")


def _frames(tb: types.TracebackType | None) -> Iterator[types.FrameType]:
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _tb_length(tb: types.TracebackType | None) -> int:
    return sum(1 for _ in _frames(tb))


def _locals_named(tb: types.TracebackType | None, name: str) -> list[Any]:
    """The values of local ``name`` in every frame of ``tb`` that has one."""
    return [frame.f_locals[name] for frame in _frames(tb) if name in frame.f_locals]


# ---------------------------------------------------------------------- tracebacks


async def test_result_of_a_failed_node_keeps_its_traceback_from_read_to_read() -> None:
    with trio.fail_after(5), pytest.raises(MyError):
        async with mcs.open_graph() as g:
            bad = g.apply(_fail_apply, 1, name="bad")
    lengths = set()
    for _ in range(100):
        with pytest.raises(MyError, match=r"^bad apply 1$") as raised:
            _ = bad.result
        tb = raised.value.__traceback__
        lengths.add(_tb_length(tb))
        assert [f.f_code.co_name for f in _frames(tb)].count("_fail_apply") == 1
    assert len(lengths) == 1
    assert lengths.pop() < 10


async def test_each_waiter_of_a_failed_node_sees_only_its_own_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: dict[int, types.TracebackType | None] = {}

    async def waiter(waiter_index: int, node: mcs.Node[None]) -> None:
        try:
            await node
        except MyError as error:
            seen[waiter_index] = error.__traceback__

    with trio.fail_after(5), pytest.raises(MyError, match=r"^bad spawn$") as raised:  # noqa: PT012
        async with mcs.open_graph() as g:
            bad = g.spawn(_fail_spawn, 1.0, name="bad")
            async with trio.open_nursery() as nursery:
                for k in range(4):
                    nursery.start_soon(waiter, k, bad)
    assert trio.current_time() == 1.0
    assert sorted(seen) == [0, 1, 2, 3]
    for k, tb in seen.items():
        assert _locals_named(tb, "waiter_index") == [k]
        names = [frame.f_code.co_name for frame in _frames(tb)]
        assert names.count("_fail_spawn") == 1
    # The block raises it with the traceback it failed with: no waiter's frames.
    assert _locals_named(raised.value.__traceback__, "waiter_index") == []


async def test_a_batch_error_shared_by_many_graphs_carries_only_each_graphs_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = MyError("bad batch")

    async def batch_fn(items: list[int]) -> list[int]:
        await trio.sleep(1.0)
        raise shared

    seen: dict[int, types.TracebackType | None] = {}

    async def request(request_index: int, batcher: mcs.Batcher[int, int]) -> None:
        with pytest.raises(MyError, match=r"^bad batch$") as raised:
            async with mcs.open_graph() as g:
                g.apply(_times_two, g.call(batcher, request_index))
        assert raised.value is shared
        seen[request_index] = raised.value.__traceback__

    with trio.fail_after(5):
        async with mcs.open_batcher(batch_fn, max_batch_size=10) as batcher:
            async with trio.open_nursery() as nursery:
                for k in range(5):
                    nursery.start_soon(request, k, batcher)
    assert trio.current_time() == 1.0
    assert sorted(seen) == [0, 1, 2, 3, 4]
    lengths = {_tb_length(tb) for tb in seen.values()}
    assert len(lengths) == 1  # nothing grows from raise to raise
    for k, tb in seen.items():
        assert _locals_named(tb, "request_index") == [k]
        assert [f.f_code.co_name for f in _frames(tb)].count("batch_fn") == 1


@pytest.mark.parametrize("kind", ["apply", "spawn"])
async def test_one_error_object_raised_by_a_node_in_graph_after_graph_keeps_each_its_own(
    kind: str,
) -> None:
    """A node function that raises the same exception object in every request (a cached
    error): each graph's error shows that graph's raise, not the first graph's."""
    shared = MyError("cached")

    def check(mine: int) -> int:
        raise shared

    async def check_later(mine: int) -> int:
        await trio.lowlevel.checkpoint()
        raise shared

    def add_node(g: mcs.Graph, mine: int) -> None:
        if kind == "apply":
            g.apply(check, mine)
        else:
            g.spawn(check_later, mine)

    seen: list[types.TracebackType | None] = []
    with trio.fail_after(5):
        for request_index in range(3):
            with pytest.raises(MyError, match=r"^cached$") as raised:
                async with mcs.open_graph() as g:
                    add_node(g, request_index)
            assert raised.value is shared
            seen.append(raised.value.__traceback__)
    assert len({_tb_length(tb) for tb in seen}) == 1  # nothing grows
    for request_index, tb in enumerate(seen):
        # its own raise, no other: the node function's frame (add_node's is not on it)
        assert _locals_named(tb, "mine") == [request_index]


async def test_the_block_raises_the_first_error_with_its_original_traceback() -> None:
    with trio.fail_after(5), pytest.raises(MyError, match=r"^bad apply 3$") as raised:
        async with mcs.open_graph() as g:
            g.apply(_fail_apply, 3)
    names = [frame.f_code.co_name for frame in _frames(raised.value.__traceback__)]
    assert names[-1] == "_fail_apply"
    assert names.count("_fail_apply") == 1


# ---------------------------------------------------------------------- cyclic garbage


def _is_ours(obj: object) -> bool:
    """An object that a failed graph would leave to the cyclic GC: the graph, its nodes, the
    error, or frames and tracebacks of mcs or of this module."""
    if isinstance(obj, mcs.Graph | mcs.Node | MyError):
        return True
    if isinstance(obj, types.TracebackType):
        obj = obj.tb_frame
    if isinstance(obj, types.FrameType):
        filename = obj.f_code.co_filename
        return "/mcs/" in filename or filename == __file__
    return False


async def _cyclic_garbage(run: Callable[[], Awaitable[None]]) -> list[str]:
    return await cyclic_garbage(run, _is_ours)


@pytest.mark.parametrize(
    "how", ["value", "apply", "spawn", "item", "timeout-call", "timeout-spawn"]
)
async def test_failed_and_timed_out_graphs_leave_no_cyclic_garbage(
    how: str, autojump_clock: trio.testing.MockClock
) -> None:
    def per_item(x: int) -> int | BaseException:
        return MyError("bad item") if x == 13 else x

    async def request(batcher: mcs.Batcher[int, int]) -> None:
        try:
            async with mcs.open_graph(timeout=2.0 if how.startswith("timeout") else None) as g:
                first = g.call(batcher, 1)
                if how == "apply":
                    g.apply(_fail_apply, first)
                elif how == "spawn":
                    g.spawn(_fail_spawn, 0.5)
                elif how == "item":
                    g.call(batcher, 13)
                elif how == "timeout-call":
                    g.call(batcher, 2, after=[g.call(batcher, first)])
                elif how == "timeout-spawn":
                    g.spawn(trio.sleep, 5.0)
        except (MyError, trio.TooSlowError):
            pass
        finally:
            # This frame is on the error's traceback: a local that keeps the graph keeps the
            # error, a cycle of the caller's own making.
            del g, first

    async def requests(batcher: mcs.Batcher[int, int]) -> None:
        for _ in range(5):
            await request(batcher)

    with trio.fail_after(100):
        async with mcs.open_batcher(RecordingBatchFn(per_item, delay=1.0)) as batcher:
            assert await _cyclic_garbage(lambda: requests(batcher)) == []


# ---------------------------------------------------------------------- the request's context

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="<unset>")


def _seen_id(_: object = None) -> str:
    return request_id.get()


async def _spawned_id(_: object = None) -> str:
    await trio.lowlevel.checkpoint()
    return request_id.get()


async def test_apply_and_spawn_run_in_the_requests_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    results: dict[str, dict[str, str]] = {}

    async def request(name: str, batcher: mcs.Batcher[int, int]) -> None:
        request_id.set(name)
        async with mcs.open_graph() as g:
            loaded = g.call(batcher, 1)
            nodes = {
                "apply after a call": g.apply(_seen_id, loaded),
                "spawn after a call": g.spawn(_spawned_id, loaded),
                "apply after a spawn": g.apply(_seen_id, g.spawn(trio.sleep, 0.5)),
                "apply at once": g.apply(_seen_id),
            }
        results[name] = {label: node.result for label, node in nodes.items()}

    with trio.fail_after(5):
        async with mcs.open_batcher(_healthy()) as batcher:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(request, "a", batcher)
                nursery.start_soon(request, "b", batcher)
    for name in "ab":
        assert set(results[name].values()) == {name}, results[name]
    assert trio.current_time() == 1.0


# ---------------------------------------------------------------------- spawned nodes


async def _deadline() -> float:
    await trio.lowlevel.checkpoint()
    return trio.current_effective_deadline()


@pytest.mark.parametrize(
    ("enclosing", "graph_timeout", "expected"),
    [(5.0, None, 5.0), (5.0, 2.0, 2.0), (1.5, 2.0, 1.5), (None, 2.0, 2.0)],
)
async def test_spawned_nodes_see_the_requests_deadline(
    enclosing: float | None,
    graph_timeout: float | None,
    expected: float,
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10), trio.move_on_after(enclosing if enclosing is not None else 100):
        async with mcs.open_graph(timeout=graph_timeout) as g:
            with trio.CancelScope(deadline=0.5):  # a scope inside the block is not the request's
                first = g.spawn(_deadline)
                after = g.spawn(_deadline, after=[g.spawn(trio.sleep, 0.25)])
                await trio.lowlevel.checkpoint()
    assert (first.result, after.result) == (expected, expected)
    assert trio.current_time() == 0.25


async def test_spawned_tasks_live_in_the_requests_tree(mcs_tasks: Callable[[], list[str]]) -> None:
    ancestry: list[trio.lowlevel.Task] = []
    request_task: list[trio.lowlevel.Task] = []

    async def record() -> None:
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            ancestry.append(task)
            nursery = task.parent_nursery
            task = nursery.parent_task if nursery is not None else None

    async def request() -> None:
        request_task.append(trio.lowlevel.current_task())
        async with mcs.open_graph() as g:
            g.spawn(record, name="record")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
    parent = request_task[0].parent_nursery
    assert parent is not None
    assert parent.parent_task in ancestry  # this test's task, not trio's system nursery
    assert ancestry.index(parent.parent_task) == 2  # record <- the graph's host <- this task
    assert mcs_tasks() == []


async def test_a_spawned_error_never_reaches_the_requests_siblings(
    autojump_clock: trio.testing.MockClock, mcs_tasks: Callable[[], list[str]]
) -> None:
    log: list[tuple[str, float]] = []

    async def request() -> None:
        with pytest.raises(MyError, match=r"^bad spawn$"):  # noqa: PT012
            async with mcs.open_graph() as g:
                g.spawn(_fail_spawn, 1.0)
                g.spawn(trio.sleep, 10.0)
        log.append(("request", trio.current_time()))

    async def sibling() -> None:
        await trio.sleep(2.0)
        log.append(("sibling", trio.current_time()))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            nursery.start_soon(sibling)
    assert log == [("request", 1.0), ("sibling", 2.0)]
    assert mcs_tasks() == []


async def test_a_keyboard_interrupt_in_a_spawned_node_is_raised_by_the_block(
    autojump_clock: trio.testing.MockClock, mcs_tasks: Callable[[], list[str]]
) -> None:
    async def interrupt() -> None:
        await trio.sleep(1.0)
        raise KeyboardInterrupt

    with trio.fail_after(5), pytest.raises(KeyboardInterrupt):  # noqa: PT012
        async with mcs.open_graph() as g:
            g.spawn(interrupt)
            sleeper = g.spawn(trio.sleep, 10.0, name="sleeper")
    assert trio.current_time() == 1.0
    assert [n.outcome for n in g.trace().nodes] == ["error", "cancelled"]
    assert sleeper.done
    assert mcs_tasks() == []


def test_a_graph_in_the_main_task_can_spawn() -> None:
    async def main() -> list[float]:
        with trio.fail_after(5):
            async with mcs.open_graph(timeout=3.0) as g:
                node = g.spawn(_deadline)
        return [node.result]

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == [3.0]


# ---------------------------------------------------------------------- the engine room


async def test_a_cancelled_exit_cancels_the_graph_in_the_request_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Cancelling the request only marks the parked task; the graph's nodes are cancelled by
    # the request task itself once it runs again, not inside whoever called cancel().
    nodes: list[mcs.Node[int]] = []
    checked: list[bool] = []
    scope = trio.CancelScope()

    async def cancel_soon() -> None:
        await trio.sleep(0.5)
        scope.cancel()
        checked.append(nodes[0].done)  # False: the abort callback did no graph work
        await trio.testing.wait_all_tasks_blocked()  # the request task has run
        checked.append(nodes[0].done)

    with trio.fail_after(5):
        async with mcs.open_batcher(_healthy()) as batcher, trio.open_nursery() as nursery:
            nursery.start_soon(cancel_soon)
            with scope:
                async with mcs.open_graph() as g:
                    nodes.append(g.call(batcher, 1))
            assert scope.cancelled_caught
            assert trio.current_time() == 0.5
    assert checked == [False, True]
    assert [n.outcome for n in g.trace().nodes] == ["cancelled"]


async def test_a_cancelled_waiter_is_skipped_and_the_others_are_woken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got: list[int] = []

    async def waiter(k: int, node: mcs.Node[None], scope: trio.CancelScope) -> None:
        with scope:
            await node
            got.append(k)

    scopes = [trio.CancelScope() for _ in range(3)]
    with trio.fail_after(5):
        async with mcs.open_graph() as g:
            nap = g.spawn(trio.sleep, 1.0)
            async with trio.open_nursery() as nursery:
                for k, scope in enumerate(scopes):
                    nursery.start_soon(waiter, k, nap, scope)
                await trio.sleep(0.5)
                scopes[1].cancel()
    assert sorted(got) == [0, 2]
    assert trio.current_time() == 1.0


def test_states_are_int_enums_with_names_unique_across_the_package() -> None:
    enums: dict[str, str] = {}
    for info in pkgutil.iter_modules(mcs.__path__, "mcs."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, enum.IntEnum)
                and value.__module__ == info.name
            ):
                assert enums.setdefault(value.__name__, info.name) == info.name
    from mcs._graph import GraphPhase
    from mcs._node import NodeOutcome, NodeState

    assert [s.name for s in NodeState] == ["PENDING", "RUNNING", "FINISHED"]
    assert [s.name for s in NodeOutcome] == ["VALUE", "ERROR", "CANCELLED"]
    assert [s.name for s in GraphPhase] == ["NEW", "OPEN", "CLOSED"]


# ---------------------------------------------------------------------- wrong run


WRONG_RUN = r"^graph 'request' belongs to another trio run; use it only in the run that opened it$"


@pytest.mark.parametrize("how", ["call", "apply", "spawn"])
async def test_a_graph_used_from_another_run_is_refused(how: str) -> None:
    errors: list[BaseException] = []

    async def use(g: mcs.Graph, batcher: mcs.Batcher[int, int]) -> None:
        try:
            if how == "call":
                g.call(batcher, 1)
            elif how == "apply":
                g.apply(_times_two, 1)
            else:
                g.spawn(trio.sleep, 0)
        except RuntimeError as error:
            errors.append(error)

    def other_run(g: mcs.Graph, batcher: mcs.Batcher[int, int]) -> None:
        trio.run(use, g, batcher)

    with trio.fail_after(5):
        async with mcs.open_batcher(_healthy(0.0)) as batcher:
            async with mcs.open_graph(name="request") as g:
                await trio.to_thread.run_sync(other_run, g, batcher)
    assert len(errors) == 1
    with pytest.raises(RuntimeError, match=WRONG_RUN):
        raise errors[0]
    assert g.trace().nodes == ()


async def test_a_graph_used_outside_any_run_is_refused() -> None:
    with trio.fail_after(5):
        async with mcs.open_graph(name="request") as g:
            with pytest.raises(RuntimeError, match=WRONG_RUN):
                await trio.to_thread.run_sync(g.apply, _times_two, 1)
    assert g.trace().nodes == ()


@pytest.mark.parametrize("spawned", [False, True])
async def test_a_request_cancelled_at_the_end_of_the_block_cancels_its_graph(
    spawned: bool, autojump_clock: trio.testing.MockClock, mcs_tasks: Callable[[], list[str]]
) -> None:
    # The block ends with a call pending, so the request task parks without a coroutine of the
    # graph's own; with `spawned`, a node spawned once the call returns (at 1.0) is running
    # when the request is cancelled (at 2.0) and must unwind before the block ends.
    async def slow(items: list[int]) -> list[int]:
        await trio.sleep(1.0)
        return items

    async def sleepy(_: int) -> None:
        await trio.sleep(10.0)

    with trio.fail_after(100):
        async with mcs.open_batcher(slow, name="slow") as batcher:
            with trio.move_on_after(2.0 if spawned else 0.5) as scope:
                async with mcs.open_graph() as g:
                    first = g.call(batcher, 1)
                    if spawned:
                        g.spawn(sleepy, first, name="sleepy")
            assert scope.cancelled_caught
            assert trio.current_time() == (2.0 if spawned else 0.5)
            outcomes = [n.outcome for n in g.trace().nodes]
            assert outcomes == (["value", "cancelled"] if spawned else ["cancelled"])
            assert [t for t in mcs_tasks() if "Graph" in t] == []  # nothing of the graph's left
            statistics = batcher.statistics()
            assert statistics.dropped == (0 if spawned else 1)


def test_under_asyncio_open_graph_says_it_needs_trio() -> None:
    async def main() -> None:
        async with mcs.open_graph():
            raise AssertionError("opened outside trio")

    with pytest.raises(RuntimeError) as caught:
        asyncio.run(main())
    assert str(caught.value) == (
        "mcs.open_graph needs Trio (or anyio with the trio backend): it was used outside a trio run"
    )
