"""DataLoader's own test cases, ported to mcs.

Each test cites the peer test it comes from:

- JS: graphql/dataloader, ``src/__tests__/dataloader.test.js``;
- aiodataloader: syrusakbary/aiodataloader, ``test_aiodataloader.py``;
- strawberry: strawberry-graphql/strawberry, ``tests/test_dataloaders.py``.

How the peers' notions translate:

- ``loader.load(k)`` is ``await batcher(k)``, or ``g.call(batcher, k)`` inside a graph;
  ``loadMany`` is ``await batcher.many(keys)`` or ``g.call_many(batcher, keys)``.
- Loads issued in one event-loop tick (``Promise.all``, ``asyncio.gather``) are callers that run
  in one Trio scheduler pass: tasks started together, or calls made by one task without a
  checkpoint between them.
- DataLoader's per-loader cache is, in mcs, the graph's memo: one per request, gone with it.
  ``prime`` and ``clear`` are ``g.prime`` and ``g.forget``; ``clearAll`` is the end of the graph.
  Coalescing of identical pending loads is the batcher's ``dedupe=True`` (queued *or* in flight).
- ``cacheKeyFn`` is ``key=``; ``{cache: false}`` is ``dedupe=False`` (and no graph);
  ``{batch: false}`` is ``max_batch_size=1``.

Where mcs differs on purpose (no cache across requests, so errors are never cached either), the
test asserts mcs's behaviour and says so.
"""

from __future__ import annotations

from collections.abc import Hashable
from functools import partial
from typing import Any, Generic, TypeVar

import pytest
import trio
import trio.testing

import mcs

T = TypeVar("T")


class IdLoader(Generic[T]):
    """The peers' ``idLoader``: a batch_fn that answers each key with itself and records the
    keys of every call (as ``loadCalls``); ``delay`` seconds per call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[list[T]] = []

    async def __call__(self, keys: list[T]) -> list[T]:
        self.calls.append(list(keys))
        await trio.sleep(self.delay)
        return list(keys)


class Odd(Exception):
    """The error the peers' "even loader" returns for odd keys."""


async def even_loader(calls: list[list[int]], keys: list[int]) -> list[int | Odd]:
    calls.append(list(keys))
    return [key if key % 2 == 0 else Odd(f"Odd: {key}") for key in keys]


async def load_together(batcher: mcs.Batcher[Any, Any], *keys: Any) -> list[Any]:
    """``Promise.all(keys.map(k => loader.load(k)))``: one caller task per key, all started in
    one scheduler pass; each entry is the value or the error that caller got."""
    results: list[Any] = [None] * len(keys)

    async def load(i: int, key: Any) -> None:
        try:
            results[i] = await batcher(key)
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i, key in enumerate(keys):
            nursery.start_soon(load, i, key)
    return results


async def load_in_order(loader: mcs.Batcher[Any, Any], busy: Any, *keys: Any) -> list[Any]:
    """Loads queued in exactly this order: a load of ``busy`` holds the one in-flight slot while
    each key's caller joins the queue in turn, so the keys leave together once it is done.

    (Trio runs the tasks of one scheduler pass in no fixed order, so callers started together
    reach the queue in any order; the peers' tests that pin an order within a batch need this.)
    """
    results: list[Any] = [None] * len(keys)

    async def load(i: int, key: Any) -> None:
        results[i] = await loader(key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader, busy)
        await trio.testing.wait_all_tasks_blocked()
        for i, key in enumerate(keys):
            nursery.start_soon(load, i, key)
            await trio.testing.wait_all_tasks_blocked()
    return results


def sorted_calls(calls: list[list[T]]) -> list[list[T]]:
    """The calls with the keys of each in order: callers of one scheduler pass queue in any
    order."""
    return [sorted(keys) for keys in calls]  # type: ignore[type-var]


def cache_key(key: dict[str, int]) -> Hashable:
    """The JS tests' ``cacheKey``: an object's entries, in key order."""
    return tuple(sorted(key.items()))


# ---------------------------------------------------------------------------- primary API


async def test_builds_a_really_simple_loader() -> None:
    # JS 'builds a really really simple data loader';
    # aiodataloader test_build_a_simple_data_loader; strawberry test_loading
    async with mcs.open_batcher(IdLoader[int](), dedupe=True) as loader:
        assert await loader(1) == 1


async def test_builds_a_loader_from_a_partial() -> None:
    # aiodataloader test_can_build_a_data_loader_from_a_partial
    async def call_fn(context: dict[int, str], keys: list[int]) -> list[str | None]:
        return [context.get(key) for key in keys]

    async with mcs.open_batcher(partial(call_fn, {1: "one"})) as loader:
        assert await loader(1) == "one"


async def test_loads_multiple_keys_in_one_call() -> None:
    # JS 'supports loading multiple keys in one call';
    # aiodataloader test_supports_loading_multiple_keys_in_one_call; strawberry test_loading
    load = IdLoader[int]()
    async with mcs.open_batcher(load, dedupe=True) as loader:
        assert await loader.many([1, 2]) == [1, 2]
        assert await loader.many([]) == []
        assert await loader.many([1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 5, 6]
    assert load.calls == [[1, 2], [1, 2, 3, 4, 5, 6]]


async def test_load_many_gives_errors_as_values() -> None:
    # JS 'supports loading multiple keys in one call with errors' (dataloader #41, PR #216)
    async def bad_key(keys: list[str]) -> list[str | Exception]:
        return [ValueError("Bad Key") if key == "bad" else key for key in keys]

    async with mcs.open_batcher(bad_key, dedupe=True) as loader:
        values = await loader.many(["a", "b", "bad"])
    assert values[:2] == ["a", "b"]
    assert isinstance(values[2], ValueError)
    assert str(values[2]) == "Bad Key"


async def test_batches_multiple_requests() -> None:
    # JS 'batches multiple requests'; aiodataloader test_batches_multiple_requests;
    # strawberry test_gathering
    load = IdLoader[int]()
    async with mcs.open_batcher(load, dedupe=True) as loader:
        assert await load_together(loader, 1, 2) == [1, 2]
    assert sorted_calls(load.calls) == [[1, 2]]


async def test_batches_multiple_requests_with_max_batch_sizes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # JS 'batches multiple requests with max batch sizes';
    # aiodataloader test_batches_multiple_requests_with_max_batch_sizes;
    # strawberry test_max_batch_size
    load = IdLoader[int](delay=1.0)
    async with mcs.open_batcher(load, max_batch_size=2, dedupe=True) as loader:
        assert await load_in_order(loader, 0, 1, 2, 3) == [1, 2, 3]
        assert trio.current_time() == 3.0  # one call in flight at a time (max_in_flight=1)
    assert load.calls == [[0], [1, 2], [3]]


async def test_coalesces_identical_requests() -> None:
    # JS 'coalesces identical requests'; aiodataloader test_coalesces_identical_requests;
    # strawberry test_caches_by_id and test_caches_by_id_when_loading_many
    load = IdLoader[int]()
    async with mcs.open_batcher(load, dedupe=True) as loader:
        assert await load_together(loader, 1, 1) == [1, 1]
        assert await loader.many([1, 1]) == [1, 1]
    assert load.calls == [[1], [1]]


async def test_coalesces_identical_requests_across_sized_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # JS 'coalesces identical requests across sized batches': max_batch_size counts distinct
    # keys, so the second load of 1 rides in the first batch
    load = IdLoader[int](delay=1.0)
    async with mcs.open_batcher(load, max_batch_size=2, dedupe=True) as loader:
        assert await load_in_order(loader, 0, 1, 2, 1, 3) == [1, 2, 1, 3]
    assert load.calls == [[0], [1, 2], [3]]


async def test_max_batch_size_counts_distinct_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # dataloader #294: loads a, b, a, b, c with maxBatchSize 3 must make one call [a, b, c],
    # not [[a, b], [a, b], [c]]
    load = IdLoader[str](delay=1.0)
    async with mcs.open_batcher(load, max_batch_size=3, dedupe=True) as loader:
        values = await load_in_order(loader, "busy", "a", "b", "a", "b", "c")
    assert values == ["a", "b", "a", "b", "c"]
    assert load.calls == [["busy"], ["a", "b", "c"]]


async def test_joins_an_identical_request_already_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # JS 'caches repeated requests', second round, while the first call is still running:
    # DataLoader answers A from its pending promise; mcs joins the call in flight
    load = IdLoader[str](delay=1.0)
    async with trio.open_nursery() as nursery, mcs.open_batcher(load, dedupe=True) as loader:
        nursery.start_soon(load_together, loader, "A", "B")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted_calls(load.calls) == [["A", "B"]]
        assert await load_together(loader, "A", "C") == ["A", "C"]
        assert trio.current_time() == 2.0
    assert sorted_calls(load.calls) == [["A", "B"], ["C"]]
    assert loader.statistics().items == 3


# ---------------------------------------------------------------------------- the per-request cache


async def test_caches_repeated_requests_within_a_request() -> None:
    # JS 'caches repeated requests'; aiodataloader test_caches_repeated_requests
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader, mcs.open_graph() as g:
        a, b = g.call(loader, "A"), g.call(loader, "B")
        assert (await a, await b) == ("A", "B")
        assert load.calls == [["A", "B"]]

        a2, c = g.call(loader, "A"), g.call(loader, "C")
        assert a2 is a
        assert (await a2, await c) == ("A", "C")
        assert load.calls == [["A", "B"], ["C"]]

        a3, b2, c2 = g.call(loader, "A"), g.call(loader, "B"), g.call(loader, "C")
        assert (await a3, await b2, await c2) == ("A", "B", "C")
    assert load.calls == [["A", "B"], ["C"]]


async def test_clears_single_value_in_loader() -> None:
    # JS 'clears single value in loader'; aiodataloader test_clears_single_value_in_loader
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader, mcs.open_graph() as g:
        a, b = g.call(loader, "A"), g.call(loader, "B")
        assert (await a, await b) == ("A", "B")
        assert load.calls == [["A", "B"]]
        g.forget(loader, "A")
        a2, b2 = g.call(loader, "A"), g.call(loader, "B")
        assert (await a2, await b2) == ("A", "B")
    assert load.calls == [["A", "B"], ["A"]]


async def test_clears_all_values_when_the_request_ends() -> None:
    # JS 'clears all values in loader'; aiodataloader test_clears_all_values_in_loader:
    # mcs has no clearAll, the memo ends with its graph (and so with its request)
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader:
        for _ in range(2):
            async with mcs.open_graph() as g:
                a, b = g.call(loader, "A"), g.call(loader, "B")
            assert (a.result, b.result) == ("A", "B")
    assert load.calls == [["A", "B"], ["A", "B"]]


async def test_clear_by_batch() -> None:
    # strawberry test_clear: which keys are fetched again after clear, clear_many and clear_all
    batches = 0

    async def numbered(keys: list[int]) -> list[tuple[int, int]]:
        nonlocal batches
        batches += 1
        return [(key, batches) for key in keys]

    async def load_many(g: mcs.Graph, keys: list[int]) -> list[tuple[int, int]]:
        nodes = [g.call(loader, key) for key in keys]  # memoized, as strawberry's load_many
        return [await node for node in nodes]

    async with mcs.open_batcher(numbered, dedupe=True) as loader:
        async with mcs.open_graph() as g:
            assert await load_many(g, [1, 2, 3]) == [(1, 1), (2, 1), (3, 1)]
            g.forget(loader, 1)
            assert await load_many(g, [1, 2, 3]) == [(1, 2), (2, 1), (3, 1)]
            g.forget(loader, 1)
            g.forget(loader, 2)
            assert await load_many(g, [1, 2, 3]) == [(1, 3), (2, 3), (3, 1)]
            # call_many reads the memo (and sends nothing here), though it does not add to it
            assert await g.call_many(loader, [1, 2, 3]) == [(1, 3), (2, 3), (3, 1)]
        async with mcs.open_graph() as g:  # clear_all: a new request
            many = g.call_many(loader, [1, 2, 3])
    assert many.result == [(1, 4), (2, 4), (3, 4)]


async def test_without_a_graph_nothing_is_cached() -> None:
    # strawberry test_clear_nocache and test_cache_disabled_immediate_await: outside a graph
    # (as with cache=False) a finished load is not remembered; dedupe only joins pending loads
    load = IdLoader[int]()
    async with mcs.open_batcher(load, dedupe=True) as loader:
        assert await loader(1) == 1
        assert await loader(1) == 1
    assert load.calls == [[1], [1]]


async def test_allows_priming_the_cache() -> None:
    # JS 'allows priming the cache'; aiodataloader test_allows_priming_the_cache
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader, mcs.open_graph() as g:
        g.prime(loader, "A", "A")
        a, b = g.call(loader, "A"), g.call(loader, "B")
        assert (await a, await b) == ("A", "B")
    assert load.calls == [["B"]]


async def test_does_not_prime_keys_that_already_exist() -> None:
    # JS 'does not prime keys that already exist';
    # aiodataloader test_does_not_prime_keys_that_already_exist; strawberry test_prime
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader, mcs.open_graph() as g:
        g.prime(loader, "A", "X")
        assert await g.call(loader, "A") == "X"
        assert await g.call(loader, "B") == "B"
        g.prime(loader, "A", "Y")
        g.prime(loader, "B", "Y")
        assert await g.call(loader, "A") == "X"
        assert await g.call(loader, "B") == "B"
    assert load.calls == [["B"]]


async def test_priming_with_an_error_primes_a_value() -> None:
    # JS 'Handles priming the cache with an error'; aiodataloader test_caches_failed_fetches_2 —
    # a difference: DataLoader's load then rejects with the error; g.prime stores the value as
    # it is, even an exception object (to fail a key, let batch_fn return its error)
    calls: list[list[int]] = []

    async def identity(keys: list[int]) -> list[object]:
        calls.append(list(keys))
        return list(keys)

    error = LookupError("Error: 1")
    async with mcs.open_batcher(identity, dedupe=True) as loader, mcs.open_graph() as g:
        g.prime(loader, 1, error)
        assert await g.call(loader, 1) is error
    assert calls == []


async def test_allows_forcefully_priming_the_cache() -> None:
    # JS 'allows forcefully priming the cache'; strawberry test_prime (force=True)
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader, mcs.open_graph() as g:
        g.prime(loader, "A", "X")
        assert await g.call(loader, "A") == "X"
        assert await g.call(loader, "B") == "B"
        g.forget(loader, "A")
        g.prime(loader, "A", "Y")
        g.forget(loader, "B")
        g.prime(loader, "B", "Y")
        assert await g.call(loader, "A") == "Y"
        assert await g.call(loader, "B") == "Y"
    assert load.calls == [["B"]]


async def test_the_memo_lives_and_dies_with_its_request() -> None:
    # JS 'caches repeated requests' across requests: DataLoader's cache is per loader, which is
    # why the docs tell you to make one loader per request; in mcs the batcher is shared and
    # the memo is per graph, so two requests never see each other's values
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader:
        async with mcs.open_graph() as g:
            g.prime(loader, "A", "primed")
            first = g.call(loader, "A")
        async with mcs.open_graph() as g:
            second = g.call(loader, "A")
    assert (first.result, second.result) == ("primed", "A")
    assert load.calls == [["A"]]


async def test_the_memo_can_be_turned_off() -> None:
    # JS 'May disable caching' (cache: false), within one request
    load = IdLoader[str]()
    async with mcs.open_batcher(load, dedupe=True) as loader, mcs.open_graph(memo=False) as g:
        assert await g.call(loader, "A") == "A"
        assert await g.call(loader, "A") == "A"
    assert load.calls == [["A"], ["A"]]


# ---------------------------------------------------------------------------- errors


async def test_resolves_to_error_to_indicate_failure() -> None:
    # JS 'Resolves to error to indicate failure';
    # aiodataloader test_resolves_to_error_to_indicate_failure; strawberry test_error and
    # test_error_and_values
    calls: list[list[int]] = []
    async with mcs.open_batcher(partial(even_loader, calls), dedupe=True) as loader:
        with pytest.raises(Odd, match=r"^Odd: 1$"):
            await loader(1)
        assert await loader(2) == 2
    assert calls == [[1], [2]]


async def test_represents_failures_and_successes_simultaneously() -> None:
    # JS 'Can represent failures and successes simultaneously';
    # aiodataloader test_can_represent_failures_and_successes_simultaneously
    calls: list[list[int]] = []
    async with mcs.open_batcher(partial(even_loader, calls), dedupe=True) as loader:
        error, value = await load_together(loader, 1, 2)
    assert isinstance(error, Odd)
    assert str(error) == "Odd: 1"
    assert value == 2
    assert sorted_calls(calls) == [[1, 2]]


async def test_does_not_cache_failed_fetches_across_requests() -> None:
    # JS 'Caches failed fetches'; aiodataloader test_caches_failed_fetches — a difference:
    # DataLoader keeps the error for the loader's life; mcs keeps nothing across requests, so
    # the next request asks again (what JS 'Can clear values from cache after errors' does by
    # hand). Within one request the failure fails the graph.
    calls: list[list[int]] = []

    async def error_loader(keys: list[int]) -> list[int | Exception]:
        calls.append(list(keys))
        return [LookupError(f"Error: {key}") for key in keys]

    async with mcs.open_batcher(error_loader, dedupe=True) as loader:
        for _ in range(2):
            with pytest.raises(LookupError, match=r"^Error: 1$"):
                async with mcs.open_graph() as g:
                    g.call(loader, 1)
    assert calls == [[1], [1]]


async def test_load_many_in_a_graph_gives_errors_as_values() -> None:
    # JS 'supports loading multiple keys in one call with errors', in a request: the failing
    # key's entry is its error, and the graph does not fail
    calls: list[list[int]] = []
    async with mcs.open_batcher(partial(even_loader, calls), dedupe=True) as loader:
        async with mcs.open_graph() as g:
            many = g.call_many(loader, [2, 1, 4])
            after = g.apply(len, many)
    two, one, four = many.result
    assert (two, four, after.result) == (2, 4, 3)
    assert isinstance(one, Odd)
    assert str(one) == "Odd: 1"


async def test_propagates_error_to_all_loads() -> None:
    # JS 'Propagates error to all loads'; aiodataloader test_catches_error_if_loader_resolver_fails;
    # strawberry test_when_raising_error_in_loader
    calls: list[list[int]] = []
    terrible = RuntimeError("I am a terrible loader")

    async def fail_loader(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        raise terrible

    async with mcs.open_batcher(fail_loader, dedupe=True) as loader:
        first, second = await load_together(loader, 1, 2)
    assert first is second is terrible
    assert sorted_calls(calls) == [[1, 2]]


async def test_a_wrong_number_of_results_is_an_error() -> None:
    # strawberry test_returning_wrong_number_of_results
    async def two_results(keys: list[int]) -> list[int]:
        return [1, 2]

    async with mcs.open_batcher(two_results, dedupe=True) as loader:
        with pytest.raises(mcs.BatchResultError):
            await loader(1)


# ---------------------------------------------------------------------------- any kind of key


class Key:
    """A plain object: equal only to itself, as JS objects are."""


async def test_accepts_objects_as_keys() -> None:
    # JS 'Accepts objects as keys'
    load = IdLoader[Key]()
    key_a, key_b = Key(), Key()
    async with mcs.open_batcher(load, dedupe=True) as loader, mcs.open_graph() as g:
        value_a, value_b = g.call(loader, key_a), g.call(loader, key_b)
        assert await value_a is key_a
        assert await value_b is key_b
        assert len(load.calls) == 1
        assert load.calls[0][0] is key_a
        assert load.calls[0][1] is key_b

        g.forget(loader, key_a)
        value_a2, value_b2 = g.call(loader, key_a), g.call(loader, key_b)
        assert await value_a2 is key_a
        assert await value_b2 is key_b
    assert len(load.calls) == 2
    assert load.calls[1] == [key_a]


async def test_accepts_objects_with_a_complex_key() -> None:
    # JS 'Accepts objects with a complex key' (cacheKeyFn is key=)
    load = IdLoader[dict[str, int]]()
    key1, key2 = {"id": 123}, {"id": 123}
    async with (
        mcs.open_batcher(load, dedupe=True, key=cache_key) as loader,
        mcs.open_graph() as g,
    ):
        value1 = await g.call(loader, key1)
        value2 = await g.call(loader, key2)
    assert load.calls == [[key1]]
    assert value1 is key1
    assert value2 is key1


async def test_clears_objects_with_a_complex_key() -> None:
    # JS 'Clears objects with complex key'
    load = IdLoader[dict[str, int]]()
    key1, key2 = {"id": 123}, {"id": 123}
    async with (
        mcs.open_batcher(load, dedupe=True, key=cache_key) as loader,
        mcs.open_graph() as g,
    ):
        value1 = await g.call(loader, key1)
        g.forget(loader, key2)  # an equal key clears it
        value2 = await g.call(loader, key1)
    assert load.calls == [[key1], [key1]]
    assert value1 is key1
    assert value2 is key1


async def test_accepts_objects_with_a_different_order_of_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # JS 'Accepts objects with different order of keys'
    load = IdLoader[dict[str, int]](delay=1.0)
    key_a, key_b = {"a": 123, "b": 321}, {"b": 321, "a": 123}
    async with mcs.open_batcher(load, dedupe=True, key=cache_key) as loader:
        value_a, value_b = await load_in_order(loader, {"busy": 1}, key_a, key_b)
    assert value_a is key_a
    assert value_b is value_a
    assert len(load.calls) == 2
    assert len(load.calls[1]) == 1
    assert load.calls[1][0] is key_a


async def test_allows_priming_the_cache_with_an_object_key() -> None:
    # JS 'Allows priming the cache with an object key'
    load = IdLoader[dict[str, int]]()
    key1, key2 = {"id": 123}, {"id": 123}
    async with (
        mcs.open_batcher(load, dedupe=True, key=cache_key) as loader,
        mcs.open_graph() as g,
    ):
        g.prime(loader, key1, key1)
        value1 = await g.call(loader, key1)
        value2 = await g.call(loader, key2)
    assert load.calls == []
    assert value1 is key1
    assert value2 is key1


# ---------------------------------------------------------------------------- options


async def test_may_disable_batching() -> None:
    # JS 'May disable batching' (batch: false is max_batch_size=1)
    load = IdLoader[int]()
    async with mcs.open_batcher(load, max_batch_size=1) as loader:
        assert await load_together(loader, 1, 2) == [1, 2]
    assert sorted(load.calls) == [[1], [2]]


async def test_keys_are_repeated_in_a_batch_without_dedupe() -> None:
    # JS 'Keys are repeated in batch when cache disabled'; strawberry test_cache_disabled
    load = IdLoader[str]()
    many: list[str | BaseException] = []

    async def load_many() -> None:
        many.extend(await loader.many(["C", "D", "A", "A", "B"]))

    async with mcs.open_batcher(load) as loader:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load_many)
            assert await load_together(loader, "A", "C", "D") == ["A", "C", "D"]
        assert await load_together(loader, "A", "A") == ["A", "A"]
    assert many == ["C", "D", "A", "A", "B"]
    assert sorted_calls(load.calls) == [sorted("ACDCDAAB"), ["A", "A"]]


# ---------------------------------------------------------------------------- scheduling


async def test_batches_loads_occurring_within_coroutines() -> None:
    # aiodataloader test_batches_loads_occuring_within_promises; JS 'batches loads occuring
    # within promises' (awaiting a coroutine is not a checkpoint, so no scheduler pass passes)
    load = IdLoader[str]()

    async with mcs.open_batcher(load, dedupe=True) as loader:

        async def load_b_2() -> str:
            return await loader("B")

        async def load_b_1() -> str:
            return await load_b_2()

        values: list[str] = []

        async def load_a() -> None:
            values.append(await loader("A"))

        async def load_b() -> None:
            values.append(await load_b_1())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load_a)
            nursery.start_soon(load_b)
    assert sorted(values) == ["A", "B"]
    assert len(load.calls) == 1
    assert sorted(load.calls[0]) == ["A", "B"]


async def test_can_call_a_loader_from_a_loader() -> None:
    # JS 'can call a loader from a loader'; aiodataloader test_can_call_a_loader_from_a_loader
    deep = IdLoader[tuple[str, ...]]()
    async with mcs.open_batcher(deep, dedupe=True) as deep_loader:

        async def do_resolve(calls: list[list[str]], keys: list[str]) -> tuple[str, ...]:
            calls.append(list(keys))
            return await deep_loader(tuple(keys))

        a_calls: list[list[str]] = []
        b_calls: list[list[str]] = []
        async with (
            mcs.open_batcher(partial(do_resolve, a_calls), dedupe=True) as a_loader,
            mcs.open_batcher(partial(do_resolve, b_calls), dedupe=True) as b_loader,
            mcs.open_graph() as g,
        ):
            a1, b1 = g.call(a_loader, "A1"), g.call(b_loader, "B1")
            a2, b2 = g.call(a_loader, "A2"), g.call(b_loader, "B2")
    assert (a1.result, b1.result, a2.result, b2.result) == ("A1", "B1", "A2", "B2")
    assert a_calls == [["A1", "A2"]]
    assert b_calls == [["B1", "B2"]]
    assert len(deep.calls) == 1
    assert sorted(deep.calls[0]) == [("A1", "A2"), ("B1", "B2")]


async def test_does_not_dispatch_cancelled_loads(autojump_clock: trio.testing.MockClock) -> None:
    # strawberry test_dont_dispatch_cancelled: a load cancelled (by hand or by a timeout)
    # before its batch leaves is never sent, and its key can be loaded again later
    load = IdLoader[int](delay=1.0)
    async with trio.open_nursery() as nursery, mcs.open_batcher(load, dedupe=True) as loader:
        assert await loader(1) == 1
        busy = trio.CancelScope()

        async def load_cancelled(key: int) -> None:
            with busy:
                await loader(key)

        nursery.start_soon(loader, 0)  # keeps the one in-flight slot busy until 2.0
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(load_cancelled, 2)
        await trio.testing.wait_all_tasks_blocked()
        busy.cancel()
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.5):
                await loader(3)
        assert await loader(4) == 4
        assert trio.current_time() == 3.0
        assert await loader.many([1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 5, 6]
        assert (await loader(2), await loader(3)) == (2, 3)
    assert load.calls == [[1], [0], [4], [1, 2, 3, 4, 5, 6], [2], [3]]
    assert loader.statistics().withdrawn == 2
