"""The graph's memo (``g.call`` twice is one node), ``prime``/``forget``, and ``call_many``.

Deterministic: every timed test runs on the autojump clock and asserts exact virtual times.
Where a case comes from a peer's suite, the comment names the peer test it ports.
"""

from __future__ import annotations

import math
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from garbage import cyclic_garbage
from hypothesis import given, settings
from hypothesis import strategies as st

import mcs
from mcs._graph_many import _KeyRecord
from mcs._memo import NO_KEY, SCAN_LIMIT, memo_key
from mcs.testing import RecordingBatchFn


class MyError(Exception):
    pass


def _same(x: Any) -> Any:
    return x


def _odd_fails(x: int) -> int | BaseException:
    return MyError(f"odd: {x}") if x % 2 else x


def _recorder(fn: Callable[[Any], Any] = _same, delay: float = 1.0) -> RecordingBatchFn[Any, Any]:
    return RecordingBatchFn(fn, delay=delay)


def _batches(recorder: RecordingBatchFn[Any, Any]) -> list[list[Any]]:
    return [list(batch.items) for batch in recorder.batches]


# ---------------------------------------------------------------------- the memo


async def test_the_same_key_twice_is_one_node_and_one_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # aiodataloader test_coalesces_identical_requests
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            first = g.call(b, 1)
            second = g.call(b, 1)
            assert second is first
    assert first.result == 1
    assert _batches(recorder) == [[1]]
    assert trio.current_time() == 1.0


async def test_a_key_called_after_its_node_finished_is_not_sent_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # aiodataloader test_caches_repeated_requests
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            a, bb = g.call(b, "A"), g.call(b, "B")
            assert (await a, await bb) == ("A", "B")
            assert _batches(recorder) == [["A", "B"]]
            a2, c = g.call(b, "A"), g.call(b, "C")
            assert a2 is a
            assert (await a2, await c) == ("A", "C")
            assert _batches(recorder) == [["A", "B"], ["C"]]
            a3, b2, c2 = g.call(b, "A"), g.call(b, "B"), g.call(b, "C")
            assert [await a3, await b2, await c2] == ["A", "B", "C"]
            assert trio.current_time() == 2.0
    assert _batches(recorder) == [["A", "B"], ["C"]]


async def test_the_memo_is_per_batcher(autojump_clock: trio.testing.MockClock) -> None:
    first, second = _recorder(), _recorder()
    with trio.fail_after(10):
        async with (
            mcs.open_batcher(first) as b1,
            mcs.open_batcher(second) as b2,
            mcs.open_graph() as g,
        ):
            assert g.call(b1, 7) is not g.call(b2, 7)
    assert _batches(first) == _batches(second) == [[7]]


async def test_graphs_never_share_a_memo(autojump_clock: trio.testing.MockClock) -> None:
    # dedupe=False (the default): only a memo could have coalesced the two graphs' calls.
    recorder = _recorder()
    nodes: list[mcs.Node[Any]] = []

    async def request() -> None:
        async with mcs.open_graph() as g:
            nodes.append(g.call(b, 5))
            nodes.append(g.call(b, 5))

    with trio.fail_after(10):
        async with mcs.open_batcher(recorder, dedupe=False) as b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(request)
                nursery.start_soon(request)
            async with mcs.open_graph() as later:  # after both: nothing kept from them
                nodes.append(later.call(b, 5))
    assert nodes[0] is nodes[1]
    assert nodes[2] is nodes[3]
    assert nodes[0] is not nodes[2]
    assert _batches(recorder) == [[5, 5], [5]]
    assert trio.current_time() == 2.0


async def test_memo_false_sends_every_call(autojump_clock: trio.testing.MockClock) -> None:
    # aiodataloader test_may_disable_caching (DataLoader(cache=False))
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph(memo=False) as g:
            first, second = g.call(b, 1), g.call(b, 1)
            assert first is not second
    assert (first.result, second.result) == (1, 1)
    assert _batches(recorder) == [[1, 1]]


def test_memo_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"^memo must be a bool, got 1$"):
        mcs.open_graph(memo=1)  # type: ignore[arg-type]


async def test_unhashable_items_are_not_memoized(autojump_clock: trio.testing.MockClock) -> None:
    recorder = _recorder(lambda items: sum(items))
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            first, second = g.call(b, [1, 2]), g.call(b, [1, 2])
            assert first is not second
            assert not g.forget(b, [1, 2])
    assert (first.result, second.result) == (3, 3)
    assert _batches(recorder) == [[[1, 2], [1, 2]]]


async def test_calls_with_dependencies_are_not_memoized(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            one = g.call(b, 1)
            by_node = g.call(b, g.apply(_same, 1))
            after = g.call(b, 1, after=[by_node])
            again = g.call(b, 1)
            assert again is one
            assert len({id(one), id(by_node), id(after)}) == 3
    assert _batches(recorder) == [[1, 1], [1]]
    assert trio.current_time() == 2.0


class _Keyed:
    """Stands in for a batcher with a key function (``Batcher._key``)."""

    @staticmethod
    def _key(item: dict[str, int]) -> int:
        return item["id"]


def test_a_key_function_decides_the_memo_key() -> None:
    assert memo_key(_Keyed(), {"id": 1, "x": 2}) == 1
    assert memo_key(_Keyed(), {"x": 3}) is NO_KEY  # the key function fails: not memoized
    assert memo_key(object(), (1, 2)) == (1, 2)
    assert memo_key(object(), [1, 2]) is NO_KEY  # unhashable


async def test_a_batchers_key_function_decides_what_matches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = _recorder(lambda item: item["id"])
    open_keyed: Any = mcs.open_batcher
    with trio.fail_after(10):
        async with (
            open_keyed(recorder, dedupe=True, key=lambda item: item["id"]) as b,
            mcs.open_graph() as g,
        ):
            first = g.call(b, {"id": 1, "x": 1})
            assert g.call(b, {"id": 1, "x": 2}) is first
    assert first.result == 1
    assert _batches(recorder) == [[{"id": 1, "x": 1}]]


async def test_prime_seeds_without_a_lookup(autojump_clock: trio.testing.MockClock) -> None:
    # aiodataloader test_allows_priming_the_cache
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            primed = g.prime(b, "A", "A")
            assert primed.done
            assert primed.result == "A"
            a, bb = g.call(b, "A"), g.call(b, "B")
            assert a is primed
            assert (await a, await bb) == ("A", "B")
        trace = g.trace()
    assert _batches(recorder) == [["B"]]
    assert [(n.kind, n.outcome, n.start, n.end) for n in trace.nodes] == [
        ("call", "value", 0.0, 0.0),
        ("call", "value", 0.0, 1.0),
    ]


async def test_prime_does_not_replace_a_memoized_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # aiodataloader test_does_not_prime_keys_that_already_exist
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            g.prime(b, "A", "X")
            assert await g.call(b, "A") == "X"
            assert await g.call(b, "B") == "B"
            g.prime(b, "A", "Y")
            g.prime(b, "B", "Y")
            assert await g.call(b, "A") == "X"
            assert await g.call(b, "B") == "B"
    assert _batches(recorder) == [["B"]]


async def test_forget_then_prime_replaces(autojump_clock: trio.testing.MockClock) -> None:
    # graphql/dataloader "Allows forcefully priming the cache" (clear, then prime)
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            g.prime(b, "A", "X")
            assert g.forget(b, "A")
            g.prime(b, "A", "Y")
            assert await g.call(b, "A") == "Y"
    assert recorder.batches == []


async def test_forget_refetches(autojump_clock: trio.testing.MockClock) -> None:
    # aiodataloader test_clears_single_value_in_loader, test_dataloader_clear_with_missing_key_works
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            a, bb = g.call(b, "A"), g.call(b, "B")
            assert (await a, await bb) == ("A", "B")
            assert g.forget(b, "A")
            assert not g.forget(b, "A")
            assert not g.forget(b, "missing")
            a2, b2 = g.call(b, "A"), g.call(b, "B")
            assert a2 is not a
            assert b2 is bb
            assert (await a2, await b2) == ("A", "B")
    assert _batches(recorder) == [["A", "B"], ["A"]]
    assert trio.current_time() == 2.0


@pytest.mark.parametrize("calls", [SCAN_LIMIT - 1, SCAN_LIMIT, SCAN_LIMIT + 1, 3 * SCAN_LIMIT])
async def test_the_memo_holds_past_the_scan_limit(
    calls: int, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            nodes = [g.call(b, i) for i in range(calls)]
            assert [g.call(b, i) for i in range(calls)] == nodes
            assert g.forget(b, 0)
            assert not g.forget(b, 0)
            assert g.call(b, 0) is not nodes[0]
            assert g.call(b, calls - 1) is nodes[-1]
    assert _batches(recorder) == [[*range(calls), 0]]  # one scheduler pass: one batch


async def test_prime_and_forget_need_a_memo_and_a_plain_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mcs.open_batcher(_recorder()) as b:
        async with mcs.open_graph(memo=False, name="req") as g:
            with pytest.raises(
                RuntimeError, match=r"^graph 'req' has no memo: it was opened with memo=False$"
            ):
                g.prime(b, 1, 1)
            with pytest.raises(RuntimeError, match=r"memo=False"):
                g.forget(b, 1)
        async with mcs.open_graph() as g:
            node = g.apply(_same, 1, name="one")
            with pytest.raises(TypeError, match=r"^prime needs a plain item, got node 'one'$"):
                g.prime(b, node, 1)
            with pytest.raises(TypeError, match=r"^forget needs a plain item, got node 'one'$"):
                g.forget(b, node)
            with pytest.raises(
                TypeError, match=r"^prime needs an item that can be memoized, got \[1\]$"
            ):
                g.prime(b, [1], 1)
            with pytest.raises(TypeError, match=r"^batcher must be a mcs.Batcher, got 3$"):
                g.prime(3, 1, 1)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=r"^graph 'graph' is closed$"):
            g.prime(b, 1, 1)


async def test_a_failed_call_stays_memoized(autojump_clock: trio.testing.MockClock) -> None:
    recorder = _recorder(_odd_fails)
    seen: list[mcs.Node[Any]] = []
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b:
            with pytest.raises(MyError, match=r"^odd: 1$"):  # noqa: PT012
                async with mcs.open_graph() as g:
                    failed = g.call(b, 1)
                    with pytest.raises(MyError):
                        await failed
                    seen.append(g.call(b, 1))
    assert seen == [failed]
    assert _batches(recorder) == [[1]]


# ---------------------------------------------------------------------- call_many


async def test_call_many_aligns_values_and_errors(autojump_clock: trio.testing.MockClock) -> None:
    # graphql/dataloader "Supports loading multiple keys in one call with errors";
    # aiodataloader test_can_represent_failures_and_successes_simultaneously
    recorder = _recorder(_odd_fails)
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            many = g.call_many(b, [2, 1, 4])
            total = g.apply(lambda entries: sum(e for e in entries if isinstance(e, int)), many)
    entries = many.result
    assert entries[0] == 2
    assert isinstance(entries[1], MyError)
    assert str(entries[1]) == "odd: 1"
    assert entries[2] == 4
    assert total.result == 6
    assert _batches(recorder) == [[2, 1, 4]]
    assert trio.current_time() == 1.0
    assert (many.start, many.end) == (0.0, 1.0)
    assert g.trace().nodes[0].kind == "call_many"


async def test_call_many_of_nothing_and_a_batch_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # aiodataloader test_supports_loading_multiple_keys_in_one_call (the empty list)
    recorder = RecordingBatchFn(_same, delay=1.0, raise_for=lambda items: MyError("batch"))
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            empty = g.call_many(b, [])
            assert empty.done
            assert empty.result == []
            failed = g.call_many(b, iter([1, 2]))
    first, second = failed.result
    assert isinstance(first, MyError)
    assert second is first
    assert trio.current_time() == 1.0


async def test_call_many_uses_the_memo(autojump_clock: trio.testing.MockClock) -> None:
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph() as g:
            g.prime(b, "P", "primed")
            running = g.call(b, "R")
            many = g.call_many(b, ["P", "R", "X", "X", "Y"])
            assert await many == ["primed", "R", "X", "X", "Y"]
            assert trio.current_time() == 2.0  # waited for R, then sent X and Y
            assert g.call(b, "X") is not many  # call_many does not memoize what it sends
    assert _batches(recorder) == [["R"], ["X", "Y"], ["X"]]
    assert running.result == "R"


async def test_call_many_without_memo_sends_every_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = _recorder()
    with trio.fail_after(10):
        async with mcs.open_batcher(recorder) as b, mcs.open_graph(memo=False) as g:
            many = g.call_many(b, [1, 1])
    assert many.result == [1, 1]
    assert _batches(recorder) == [[1, 1]]


async def test_call_many_refused_keys_are_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mcs.open_batcher(_recorder()) as b:
        pass
    async with mcs.open_graph() as g:
        many = g.call_many(b, [1, 2])
    assert [type(entry) for entry in many.result] == [trio.ClosedResourceError] * 2


async def test_call_many_rejects_nodes_in_keys(autojump_clock: trio.testing.MockClock) -> None:
    async with mcs.open_batcher(_recorder()) as b, mcs.open_graph() as g:
        node = g.apply(_same, 1)
        with pytest.raises(TypeError, match=r"^keys must hold plain items, got a node at index 1$"):
            g.call_many(b, [0, node])
        with pytest.raises(TypeError, match=r"^batcher must be a mcs.Batcher, got None$"):
            g.call_many(None, [1])  # type: ignore[arg-type]


@pytest.mark.parametrize("state", ["queued", "in flight"])
async def test_cancelling_the_graph_withdraws_every_record(
    state: str, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = _recorder(delay=10.0)
    with trio.fail_after(100):
        async with mcs.open_batcher(recorder, max_in_flight=1) as b:
            if state == "queued":  # hold the only slot, so that the keys stay queued
                async with trio.open_nursery() as holder:
                    holder.start_soon(b, -1)
                    await trio.testing.wait_all_tasks_blocked()
                    with trio.move_on_after(1.0):
                        async with mcs.open_graph() as g:
                            many = g.call_many(b, [1, 2, 3])
                    assert trio.current_time() == 1.0
                    stats = b.statistics()
                    assert (stats.withdrawn, stats.queued) == (3, 0)
            else:
                with trio.move_on_after(1.0):
                    async with mcs.open_graph() as g:
                        many = g.call_many(b, [1, 2, 3])
                assert trio.current_time() == 1.0
                assert b.statistics().dropped == 3
            assert not many._records  # type: ignore[attr-defined]
    assert g.trace().nodes[0].outcome == "cancelled"
    assert recorder.items == ([-1] if state == "queued" else [1, 2, 3])


async def test_a_failing_node_cancels_call_many(autojump_clock: trio.testing.MockClock) -> None:
    recorder = _recorder(delay=5.0)

    def boom(_: object) -> None:
        raise MyError("boom")

    with trio.fail_after(100):
        async with mcs.open_batcher(recorder, max_in_flight=1) as b:
            with pytest.raises(MyError, match=r"^boom$"):  # noqa: PT012
                async with mcs.open_graph() as g:
                    many = g.call_many(b, [1, 2])
                    g.apply(boom, g.spawn(trio.sleep, 1.0))
            assert trio.current_time() == 1.0
            assert b.statistics().dropped == 2
    assert [n.outcome for n in g.trace().nodes] == ["cancelled", "value", "error"]
    assert many.done


# ---------------------------------------------------------------------- garbage


def _is_ours(obj: object) -> bool:
    if isinstance(obj, mcs.Graph | mcs.Node | MyError | list):
        return not isinstance(obj, list) or any(isinstance(x, mcs.Node) for x in obj)
    if isinstance(obj, types.TracebackType):
        obj = obj.tb_frame
    if isinstance(obj, types.FrameType):
        filename = obj.f_code.co_filename
        return "/mcs/" in filename or filename == __file__
    return isinstance(obj, _KeyRecord)


async def _cyclic_garbage(run: Callable[[], Awaitable[None]]) -> list[str]:
    return await cyclic_garbage(run, _is_ours)


@pytest.mark.parametrize("how", ["value", "many", "failed", "cancelled"])
async def test_a_graph_with_a_memo_leaves_no_cyclic_garbage(
    how: str, autojump_clock: trio.testing.MockClock
) -> None:
    async def request(b: mcs.Batcher[int, int]) -> None:
        with trio.move_on_after(0.5 if how == "cancelled" else math.inf):
            try:
                async with mcs.open_graph() as g:
                    for i in range(2 * SCAN_LIMIT):  # past the chain: the dict too
                        g.call(b, i % (SCAN_LIMIT + 2))
                    g.prime(b, -2, 0)
                    g.forget(b, 3)
                    g.call_many(b, [1, 3, 5, 20, 21])
                    if how == "failed":
                        g.call(b, 13)
            except MyError:
                pass
            finally:  # this frame is on the error's traceback: let go of the graph
                g = None  # type: ignore[assignment]

    async def run() -> None:
        async with mcs.open_batcher(_recorder(_odd_fails if how != "value" else _same)) as b:
            for _ in range(3):
                await request(b)

    with trio.fail_after(100):
        assert await _cyclic_garbage(run) == []


# ---------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(0, 12), max_size=30),
    forgets=st.lists(st.integers(0, 12), max_size=3),
)
def test_each_distinct_key_is_sent_once_and_every_node_has_its_own_value(
    keys: list[int], forgets: list[int]
) -> None:
    recorder = _recorder(lambda x: 10 * x, delay=1.0)

    async def main() -> None:
        async with mcs.open_batcher(recorder, max_batch_size=4) as b, mcs.open_graph() as g:
            nodes = [g.call(b, key) for key in keys]
            many = g.call_many(b, keys)
            for key in forgets:
                g.forget(b, key)
            again = [g.call(b, key) for key in keys]
        assert [node.result for node in nodes] == [10 * key for key in keys]
        assert [node.result for node in again] == [10 * key for key in keys]
        assert many.result == [10 * key for key in keys]
        for key, node in zip(keys, nodes, strict=True):
            assert node is nodes[keys.index(key)]
        forgotten = set(forgets) & set(keys)
        expected = sorted(set(keys)) + sorted(forgotten)
        assert sorted(recorder.items) == sorted(expected)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
