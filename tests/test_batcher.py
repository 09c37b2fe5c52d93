"""Deterministic tests of :func:`mcs.open_batcher` on trio's virtual clock.

Every timed test uses the ``autojump_clock`` fixture and asserts exact virtual times. Callers
usually live in a nursery *outside* the batcher's block, as a service's requests do.
"""

from __future__ import annotations

import functools
import math
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import pytest
import trio
import trio.testing

import mcs

TaskLister = Callable[[], list[str]]

CANCELLED = "cancelled"
"""What :class:`Callers` records for a caller whose own scope was cancelled."""


@dataclass(frozen=True)
class Raised:
    """An error as a comparable value: its exact type and message."""

    type: type[BaseException]
    message: str


class Downstream:
    """A fake batch_fn: records each call, answers ``x -> x * 10`` after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[float, list[int]]] = []
        self.running = 0
        self.peak_running = 0
        self.cancelled = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append((trio.current_time(), list(items)))
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        finished = False
        try:
            await trio.sleep(self.delay)
            finished = True
        finally:
            self.running -= 1
            if not finished:
                self.cancelled += 1
        return [item * 10 for item in items]


class Callers:
    """Callers of a batcher, each in its own task and cancel scope, keyed by a name.

    ``results`` holds each caller's value, a :class:`Raised` for its error, or ``CANCELLED``;
    ``done_at`` holds when each caller finished.
    """

    def __init__(self, nursery: trio.Nursery, batcher: mcs.Batcher[Any, Any]) -> None:
        self.nursery = nursery
        self.batcher = batcher
        self.results: dict[Any, object] = {}
        self.done_at: dict[Any, float] = {}
        self.scopes: dict[Any, trio.CancelScope] = {}

    def start(self, key: Any, item: Any = None, *, at: float | None = None) -> None:
        """Start a caller sending ``item`` (default: ``key``), at time ``at`` if given."""
        scope = trio.CancelScope()
        self.scopes[key] = scope
        self.nursery.start_soon(self._call, key, key if item is None else item, at, scope)

    async def start_in_order(self, keys: Iterable[Any]) -> None:
        """Start callers one after the other, each blocked before the next one calls."""
        for key in keys:
            self.start(key)
            await trio.testing.wait_all_tasks_blocked()

    async def start_together(self, keys: Iterable[Any]) -> None:
        """Start callers in one scheduler pass, so the dispatcher finds all of them queued."""
        await trio.testing.wait_all_tasks_blocked()
        for key in keys:
            self.start(key)
        await trio.testing.wait_all_tasks_blocked()

    def cancel(self, key: Any) -> None:
        self.scopes[key].cancel()

    async def _call(self, key: Any, item: Any, at: float | None, scope: trio.CancelScope) -> None:
        if at is not None:
            await trio.sleep_until(at)
        with scope:
            try:
                self.results[key] = await self.batcher(item)
            except Exception as exc:
                self.results[key] = Raised(type(exc), str(exc))
        if scope.cancelled_caught:
            self.results[key] = CANCELLED
        self.done_at[key] = trio.current_time()


async def fetch_rows(items: list[int]) -> list[int]:
    """A module-level batch_fn, for its default name."""
    return [item * 10 for item in items]


def fetch_rows_sync(items: list[int]) -> list[int]:
    return [item * 10 for item in items]


def occupancy(statistics: mcs.BatcherStatistics) -> tuple[int, int, int]:
    """``(queued, waiting_for_room, in_flight)``."""
    return statistics.queued, statistics.waiting_for_room, statistics.in_flight


# ---------------------------------------------------------------------------- construction

BAD_ARGUMENTS = [
    pytest.param({"max_batch_size": 0}, ValueError, r"max_batch_size must be >= 1, got 0"),
    pytest.param({"max_batch_size": -3}, ValueError, r"max_batch_size must be >= 1, got -3"),
    pytest.param({"max_batch_size": 2.0}, TypeError, r"max_batch_size must be an int, got 2\.0"),
    pytest.param({"max_batch_size": True}, TypeError, r"max_batch_size must be an int, got True"),
    pytest.param({"max_wait": -0.5}, ValueError, r"max_wait must be >= 0 and finite, got -0\.5"),
    pytest.param({"max_wait": math.inf}, ValueError, r"max_wait must be >= 0 and finite, got inf"),
    pytest.param({"max_wait": math.nan}, ValueError, r"max_wait must be >= 0 and finite, got nan"),
    pytest.param({"max_wait": "1"}, TypeError, r"max_wait must be a number of seconds, got '1'"),
    pytest.param(
        {"max_wait": False}, TypeError, r"max_wait must be a number of seconds, got False"
    ),
    pytest.param({"max_in_flight": 0}, ValueError, r"max_in_flight must be >= 1, got 0"),
    pytest.param({"max_in_flight": None}, TypeError, r"max_in_flight must be an int, got None"),
    pytest.param(
        {"rate": (10, 1.0)}, TypeError, r"rate must be a mcs\.RateLimit or None, got \(10, 1\.0\)"
    ),
    pytest.param({"rate": 10}, TypeError, r"rate must be a mcs\.RateLimit or None, got 10"),
    pytest.param({"queue_size": 0}, ValueError, r"queue_size must be >= 1, got 0"),
    pytest.param({"queue_size": 2.5}, TypeError, r"queue_size must be an int, got 2\.5"),
    pytest.param({"queue_size": -math.inf}, TypeError, r"queue_size must be an int, got -inf"),
    pytest.param(
        {"overload": "drop"}, ValueError, r"overload must be 'block' or 'reject', got 'drop'"
    ),
    pytest.param({"dedupe": 1}, TypeError, r"dedupe must be a bool, got 1"),
    pytest.param({"name": b"db"}, TypeError, r"name must be a str or None, got b'db'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS)
async def test_bad_argument_raises_when_the_block_is_entered(
    kwargs: dict[str, Any], error: type[Exception], message: str, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream()
    entered = False
    with pytest.raises(error, match=f"^{message}$"):
        async with mcs.open_batcher(downstream, **kwargs):
            entered = True
    assert not entered
    assert mcs_tasks() == []


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS)
def test_bad_argument_raises_in_the_constructor(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{message}$"):
        mcs.Batcher(fetch_rows, **kwargs)


async def test_a_sync_batch_fn_is_refused() -> None:
    pattern = r"^batch_fn must be an async function, got <function fetch_rows_sync at 0x[0-9a-f]+>$"
    with pytest.raises(TypeError, match=pattern):
        async with mcs.open_batcher(fetch_rows_sync):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_a_non_callable_batch_fn_is_refused() -> None:
    with pytest.raises(TypeError, match=r"^batch_fn must be an async function, got 42$"):
        async with mcs.open_batcher(42):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_an_async_generator_is_not_a_batch_fn() -> None:
    async def rows(items: list[int]) -> Any:
        yield items

    pattern = r"^batch_fn must be an async function, got <function .*rows at 0x[0-9a-f]+>$"
    with pytest.raises(TypeError, match=pattern):
        async with mcs.open_batcher(rows):
            pass  # pragma: no cover


async def test_async_callables_of_every_kind_are_batch_fns() -> None:
    class Repository:
        async def fetch(self, items: list[int]) -> list[int]:
            return [item * 100 for item in items]

    async def scaled(factor: int, items: list[int]) -> list[int]:
        return [item * factor for item in items]

    async with (
        mcs.open_batcher(Downstream()) as instance,
        mcs.open_batcher(Repository().fetch) as method,
        mcs.open_batcher(functools.partial(scaled, 7)) as partial,
    ):
        assert await instance(1) == 10
        assert await method(1) == 100
        assert await partial(1) == 7
    assert method.name == Repository.fetch.__qualname__
    assert method.name.endswith(".<locals>.Repository.fetch")


# ---------------------------------------------------------------------------- batching


async def test_a_lone_call_is_sent_at_once(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream()
    async with mcs.open_batcher(downstream) as batcher:
        assert await batcher(4) == 40
        assert trio.current_time() == 0.0
        assert await batcher(5) == 50
        assert trio.current_time() == 0.0
    assert downstream.calls == [(0.0, [4]), (0.0, [5])]


async def test_batches_grow_while_the_slot_is_busy(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery, mcs.open_batcher(downstream) as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1, 2, 3, 4, 5])
        assert batcher.statistics().queued == 5
    assert downstream.calls == [(0.0, [0]), (1.0, [1, 2, 3, 4, 5])]
    assert callers.results == {i: i * 10 for i in range(6)}
    assert callers.done_at == {0: 1.0, 1: 2.0, 2: 2.0, 3: 2.0, 4: 2.0, 5: 2.0}


async def test_everything_queued_leaves_together_up_to_max_batch_size(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=3) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order(range(8))
    assert downstream.calls == [(0.0, [0]), (1.0, [1, 2, 3]), (2.0, [4, 5, 6]), (3.0, [7])]
    assert callers.results == {i: i * 10 for i in range(8)}


async def test_callers_get_their_own_results_from_a_mapping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def spell(items: list[int]) -> dict[int, str]:
        return {item: "x" * item for item in reversed(items)}

    async with trio.open_nursery() as nursery, mcs.open_batcher(spell) as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2, 3])
    assert callers.results == {1: "x", 2: "xx", 3: "xxx"}


# ---------------------------------------------------------------------------- max_wait


async def test_max_wait_holds_a_lone_call_until_it_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with mcs.open_batcher(downstream, max_wait=0.5) as batcher:
        assert await batcher(1) == 10
        assert trio.current_time() == 0.5
    assert downstream.calls == [(0.5, [1])]


async def test_max_wait_counts_from_the_oldest_queued_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_wait=0.5) as batcher,
    ):
        callers = Callers(nursery, batcher)
        for key, at in [(1, 0.0), (2, 0.25), (3, 1.0), (4, 1.125), (5, 1.375)]:
            callers.start(key, at=at)
        await trio.sleep(2)
    assert downstream.calls == [(0.5, [1, 2]), (1.5, [3, 4, 5])]
    assert callers.done_at == {1: 0.5, 2: 0.5, 3: 1.5, 4: 1.5, 5: 1.5}


async def test_max_wait_sends_early_once_the_batch_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_wait=1.0, max_batch_size=3) as batcher,
    ):
        callers = Callers(nursery, batcher)
        for key, at in [(1, 0.0), (2, 0.25), (3, 0.5), (4, 0.75)]:
            callers.start(key, at=at)
        await trio.sleep(2)
    assert downstream.calls == [(0.5, [1, 2, 3]), (1.75, [4])]


async def test_max_wait_does_not_hold_items_that_waited_for_a_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=2.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_wait=0.5) as batcher,
    ):
        callers = Callers(nursery, batcher)
        callers.start(1, at=0.0)
        callers.start(2, at=1.0)
        await trio.sleep(5)
    assert downstream.calls == [(0.5, [1]), (2.5, [2])]
    assert callers.done_at == {1: 2.5, 2: 4.5}


async def test_max_wait_restarts_from_the_oldest_item_still_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_wait=1.0) as batcher,
    ):
        callers = Callers(nursery, batcher)
        callers.start(1, at=0.0)
        callers.start(2, at=0.5)
        await trio.sleep(0.25)
        callers.cancel(1)
        await trio.sleep(2)
    assert downstream.calls == [(1.5, [2])]
    assert callers.results == {1: CANCELLED, 2: 20}


async def test_closing_sends_what_waits_for_max_wait_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with trio.open_nursery() as nursery:
        async with mcs.open_batcher(downstream, max_wait=10.0) as batcher:
            callers = Callers(nursery, batcher)
            callers.start(1)
            await trio.sleep(1)
        assert trio.current_time() == 1.0
    assert downstream.calls == [(1.0, [1])]
    assert callers.done_at == {1: 1.0}


# ---------------------------------------------------------------------------- max_in_flight


async def test_max_in_flight_bounds_concurrent_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=1, max_in_flight=2) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order(range(5))
        assert occupancy(batcher.statistics()) == (3, 0, 2)
    assert sorted(downstream.calls) == [
        (0.0, [0]),
        (0.0, [1]),
        (1.0, [2]),
        (1.0, [3]),
        (2.0, [4]),
    ]
    assert downstream.peak_running == 2
    assert callers.done_at == {0: 1.0, 1: 1.0, 2: 2.0, 3: 2.0, 4: 3.0}


async def test_raising_max_in_flight_sends_queued_batches_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=10.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=1) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1, 2, 3])
        await trio.sleep(1)
        batcher.max_in_flight = 3
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.max_in_flight == 3
        statistics = batcher.statistics()
        assert (statistics.max_in_flight, statistics.in_flight, statistics.queued) == (3, 3, 1)
        # Saturated from 0 to 1 with one slot, then saturated again with three.
        assert statistics.saturation == 1.0
    assert sorted(downstream.calls) == [(0.0, [0]), (1.0, [1]), (1.0, [2]), (10.0, [3])]


async def test_lowering_max_in_flight_never_cancels_running_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=2.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=1, max_in_flight=3) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order(range(5))
        await trio.sleep(1)
        batcher.max_in_flight = 1
        assert occupancy(batcher.statistics()) == (2, 0, 3)
    assert downstream.cancelled == 0
    assert sorted(downstream.calls) == [
        (0.0, [0]),
        (0.0, [1]),
        (0.0, [2]),
        (2.0, [3]),
        (4.0, [4]),
    ]
    assert callers.results == {i: i * 10 for i in range(5)}
    assert callers.done_at == {0: 2.0, 1: 2.0, 2: 2.0, 3: 4.0, 4: 6.0}


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"max_in_flight must be >= 1, got 0"),
        (-1, ValueError, r"max_in_flight must be >= 1, got -1"),
        (2.5, TypeError, r"max_in_flight must be an int, got 2\.5"),
        (True, TypeError, r"max_in_flight must be an int, got True"),
        ("8", TypeError, r"max_in_flight must be an int, got '8'"),
    ],
)
async def test_max_in_flight_refuses_bad_values(
    value: Any, error: type[Exception], message: str
) -> None:
    async with mcs.open_batcher(fetch_rows, max_in_flight=2) as batcher:
        with pytest.raises(error, match=f"^{message}$"):
            batcher.max_in_flight = value
        assert batcher.max_in_flight == 2
        assert batcher.statistics().max_in_flight == 2
        assert await batcher(1) == 10


async def test_max_batch_size_one_is_a_worker_pool(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=1, max_in_flight=3) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_together(range(7))
    assert sorted(time for time, _ in downstream.calls) == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0]
    assert sorted(item for _, items in downstream.calls for item in items) == list(range(7))
    assert all(len(items) == 1 for _, items in downstream.calls)
    assert downstream.peak_running == 3
    assert callers.results == {i: i * 10 for i in range(7)}
    assert sorted(callers.done_at.values()) == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0]
    statistics = batcher.statistics()
    assert (statistics.batches, statistics.peak_batch_size) == (7, 1)
    assert statistics.mean_batch_size == 1.0


# ---------------------------------------------------------------------------- results


class ItemFailed(Exception):
    pass


async def test_a_per_item_error_goes_to_its_caller_alone() -> None:
    async def lookup(items: list[int]) -> list[int | Exception]:
        return [ItemFailed(f"no row {item}") if item == 2 else item * 10 for item in items]

    async with trio.open_nursery() as nursery, mcs.open_batcher(lookup) as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2, 3])
    assert callers.results == {1: 10, 2: Raised(ItemFailed, "no row 2"), 3: 30}


async def test_a_per_item_error_in_a_mapping_goes_to_its_caller_alone() -> None:
    async def lookup(items: list[int]) -> dict[int, int | Exception]:
        return {item: ItemFailed(f"no row {item}") if item == 2 else item * 10 for item in items}

    async with trio.open_nursery() as nursery, mcs.open_batcher(lookup) as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2, 3])
    assert callers.results == {1: 10, 2: Raised(ItemFailed, "no row 2"), 3: 30}


async def test_a_missing_key_fails_only_that_caller() -> None:
    async def lookup(items: list[int]) -> dict[int, int]:
        return {item: item * 10 for item in items if item != 2}

    async with trio.open_nursery() as nursery, mcs.open_batcher(lookup, name="db") as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2, 3])
    missing = Raised(
        mcs.BatchResultError, "batcher 'db': batch_fn's result has no entry for item 2"
    )
    assert callers.results == {1: 10, 2: missing, 3: 30}


@pytest.mark.parametrize("returned", [2, 4])
async def test_a_wrong_length_fails_every_caller_of_the_batch(returned: int) -> None:
    async def lookup(items: list[int]) -> list[int]:
        return list(range(returned))

    async with trio.open_nursery() as nursery, mcs.open_batcher(lookup, name="db") as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2, 3])
    wrong = Raised(
        mcs.BatchResultError, f"batcher 'db': batch_fn returned {returned} results for 3 items"
    )
    assert callers.results == {1: wrong, 2: wrong, 3: wrong}
    statistics = batcher.statistics()
    assert (statistics.callers_served, statistics.failed_batches) == (3, 0)


@pytest.mark.parametrize(
    ("result", "kind"),
    [
        pytest.param(None, "NoneType", id="none"),
        pytest.param("abc", "str", id="str"),
        pytest.param(b"abc", "bytes", id="bytes"),
        pytest.param(42, "int", id="int"),
        pytest.param({1, 2, 3}, "set", id="set"),
        pytest.param(iter([10, 20, 30]), "list_iterator", id="iterator"),
    ],
)
async def test_a_result_that_is_neither_sequence_nor_mapping_fails_every_caller(
    result: object, kind: str
) -> None:
    async def lookup(items: list[int]) -> list[int]:
        return cast("list[int]", result)  # deliberately not a list

    async with trio.open_nursery() as nursery, mcs.open_batcher(lookup, name="db") as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2, 3])
    wrong = Raised(
        mcs.BatchResultError,
        f"batcher 'db': batch_fn must return a sequence or a mapping, got {kind}",
    )
    assert callers.results == {1: wrong, 2: wrong, 3: wrong}


class DownstreamDown(Exception):
    pass


async def test_a_batch_fn_error_reaches_every_caller_with_its_traceback() -> None:
    raised: list[DownstreamDown] = []
    frames: dict[str, list[str]] = {}
    caught: dict[str, DownstreamDown] = {}

    async def failing_batch_fn(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        error = DownstreamDown(f"down while fetching {sorted(items)}")
        raised.append(error)
        raise error

    async def first_caller(batcher: mcs.Batcher[int, int]) -> None:
        try:
            await batcher(1)
        except DownstreamDown as exc:
            caught["first"] = exc
            frames["first"] = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]

    async def second_caller(batcher: mcs.Batcher[int, int]) -> None:
        try:
            await batcher(2)
        except DownstreamDown as exc:
            caught["second"] = exc
            frames["second"] = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]

    async with trio.open_nursery() as nursery, mcs.open_batcher(failing_batch_fn) as batcher:
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(first_caller, batcher)
        nursery.start_soon(second_caller, batcher)
        await trio.testing.wait_all_tasks_blocked()
    assert len(raised) == 1
    assert caught["first"] is raised[0]
    assert caught["second"] is raised[0]
    assert str(raised[0]) == "down while fetching [1, 2]"
    # Each caller sees batch_fn's frame under its own frames, never under the other caller's.
    assert frames["first"][0] == "first_caller"
    assert frames["first"][-1] == "failing_batch_fn"
    assert "second_caller" not in frames["first"]
    assert frames["second"][0] == "second_caller"
    assert frames["second"][-1] == "failing_batch_fn"
    assert "first_caller" not in frames["second"]


async def test_batch_fn_errors_do_not_escape_the_block() -> None:
    async def failing_batch_fn(items: list[int]) -> list[int]:
        raise DownstreamDown("down")

    async with mcs.open_batcher(failing_batch_fn) as batcher:
        with pytest.raises(DownstreamDown, match=r"^down$"):
            await batcher(1)
        with pytest.raises(DownstreamDown, match=r"^down$"):
            await batcher(2)
    statistics = batcher.statistics()
    assert (statistics.callers_served, statistics.failed_batches) == (2, 2)


# ---------------------------------------------------------------------------- overload


async def test_block_makes_callers_wait_for_room(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=1, queue_size=2) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order(range(5))
        assert occupancy(batcher.statistics()) == (2, 2, 1)
        await trio.sleep(1.5)
        assert occupancy(batcher.statistics()) == (2, 1, 1)
        await trio.sleep(5)
    assert downstream.calls == [(float(i), [i]) for i in range(5)]
    assert callers.results == {i: i * 10 for i in range(5)}
    assert callers.done_at == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0}


async def test_reject_raises_overloaded_at_once_and_queues_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, queue_size=2, overload="reject", name="db") as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1, 2])
        with (
            trio.testing.assert_checkpoints(),
            pytest.raises(mcs.Overloaded, match=r"^batcher 'db' is full \(2 items queued\)$"),
        ):
            await batcher(3)
        assert trio.current_time() == 0.0
        statistics = batcher.statistics()
        assert (statistics.rejected, statistics.queued, statistics.waiting_for_room) == (1, 2, 0)
    assert downstream.calls == [(0.0, [0]), (1.0, [1, 2])]
    assert callers.results == {0: 0, 1: 10, 2: 20}
    assert batcher.statistics().rejected == 1


async def test_overloaded_names_the_full_queue_even_if_it_drains_meanwhile() -> None:
    # Two callers in one scheduler pass: the first is queued, the second is refused at once.
    # The dispatcher may take the queued item during the refusal's checkpoint; the message must
    # still describe the full queue that caused the refusal. Which task runs first is up to
    # trio's scheduler, so the scenario is repeated.
    refusals: set[object] = set()
    for _ in range(20):
        async with trio.open_nursery() as nursery:
            async with mcs.open_batcher(
                fetch_rows, queue_size=1, overload="reject", name="db"
            ) as batcher:
                callers = Callers(nursery, batcher)
                await trio.testing.wait_all_tasks_blocked()
                callers.start(1)
                callers.start(2)
                await trio.testing.wait_all_tasks_blocked()
        outcomes = sorted(callers.results.values(), key=repr)
        assert outcomes[0] in (10, 20)
        refusals.add(outcomes[1])
        assert batcher.statistics().rejected == 1
    assert refusals == {Raised(mcs.Overloaded, "batcher 'db' is full (1 items queued)")}


# ---------------------------------------------------------------------------- cancellation


async def test_cancelled_while_queued_never_reaches_batch_fn(
    autojump_clock: trio.testing.MockClock, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, name="db") as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1, 2])
        callers.cancel(1)
        await trio.testing.wait_all_tasks_blocked()
        assert callers.results == {1: CANCELLED}
        assert callers.done_at == {1: 0.0}
        statistics = batcher.statistics()
        assert occupancy(statistics) == (1, 0, 1)
        assert statistics.withdrawn == 1
        await trio.sleep(3)
        statistics = batcher.statistics()
        assert occupancy(statistics) == (0, 0, 0)
        assert (statistics.withdrawn, statistics.dropped, statistics.callers_served) == (1, 0, 2)
        assert mcs_tasks() == ["mcs.Batcher(db).dispatcher"]
    assert downstream.calls == [(0.0, [0]), (1.0, [2])]
    assert callers.results == {0: 0, 1: CANCELLED, 2: 20}


async def test_a_batch_whose_items_were_all_withdrawn_is_never_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery, mcs.open_batcher(downstream) as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1, 2])
        callers.cancel(1)
        callers.cancel(2)
        await trio.sleep(5)
        statistics = batcher.statistics()
        assert occupancy(statistics) == (0, 0, 0)
        assert (statistics.batches, statistics.items, statistics.withdrawn) == (1, 1, 2)
    assert downstream.calls == [(0.0, [0])]
    assert callers.results == {0: 0, 1: CANCELLED, 2: CANCELLED}


async def test_items_withdrawn_while_waiting_for_max_wait_are_never_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_wait=1.0) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([1, 2])
        await trio.sleep(0.5)
        callers.cancel(1)
        callers.cancel(2)
        await trio.sleep(5)
        statistics = batcher.statistics()
        assert occupancy(statistics) == (0, 0, 0)
        assert (statistics.batches, statistics.withdrawn) == (0, 2)
    assert downstream.calls == []
    assert callers.done_at == {1: 0.5, 2: 0.5}


async def test_cancelled_in_flight_drops_that_result_only(
    autojump_clock: trio.testing.MockClock, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery, mcs.open_batcher(downstream) as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2])
        await trio.sleep(0.5)
        callers.cancel(1)
        await trio.testing.wait_all_tasks_blocked()
        assert callers.results == {1: CANCELLED}
        assert callers.done_at == {1: 0.5}
        assert batcher.statistics().dropped == 1
        await trio.sleep(1)
        statistics = batcher.statistics()
        assert occupancy(statistics) == (0, 0, 0)
        assert (statistics.dropped, statistics.withdrawn, statistics.callers_served) == (1, 0, 1)
        assert len(mcs_tasks()) == 1
    assert downstream.cancelled == 0
    assert [sorted(items) for _, items in downstream.calls] == [[1, 2]]
    assert callers.results == {1: CANCELLED, 2: 20}
    assert callers.done_at == {1: 0.5, 2: 1.0}


async def test_a_batch_whose_callers_all_left_still_runs_to_completion(
    autojump_clock: trio.testing.MockClock, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery, mcs.open_batcher(downstream) as batcher:
        callers = Callers(nursery, batcher)
        await callers.start_together([1, 2])
        await trio.sleep(0.5)
        callers.cancel(1)
        callers.cancel(2)
        await trio.testing.wait_all_tasks_blocked()
        assert len(mcs_tasks()) == 2  # the dispatcher and the batch
        assert batcher.statistics().in_flight == 1
        await trio.sleep(1)
        assert len(mcs_tasks()) == 1
        statistics = batcher.statistics()
        assert occupancy(statistics) == (0, 0, 0)
        assert (statistics.dropped, statistics.callers_served) == (2, 0)
    assert downstream.cancelled == 0


async def test_a_call_already_cancelled_withdraws_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with mcs.open_batcher(downstream) as batcher:
        with trio.CancelScope() as scope:
            scope.cancel()
            await batcher(1)
        assert scope.cancelled_caught
        await trio.sleep(1)
        statistics = batcher.statistics()
        assert occupancy(statistics) == (0, 0, 0)
        assert (statistics.withdrawn, statistics.batches) == (1, 0)
        assert await batcher(2) == 20
    assert downstream.calls == [(1.0, [2])]


async def test_cancelling_callers_in_every_state_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, queue_size=5, name="db") as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order(range(12))
        assert occupancy(batcher.statistics()) == (5, 6, 1)
        for key in range(12):
            callers.cancel(key)
        await trio.testing.wait_all_tasks_blocked()
        assert callers.results == dict.fromkeys(range(12), CANCELLED)
        assert occupancy(batcher.statistics()) == (0, 0, 1)
        await trio.sleep(2)
        statistics = batcher.statistics()
        assert occupancy(statistics) == (0, 0, 0)
        assert (statistics.withdrawn, statistics.dropped, statistics.callers_served) == (11, 1, 0)
        assert mcs_tasks() == ["mcs.Batcher(db).dispatcher"]
        assert await batcher(20) == 200
    assert downstream.calls == [(0.0, [0]), (2.0, [20])]


async def test_cancelling_a_caller_waiting_for_room(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, queue_size=1) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1, 2, 3])
        assert occupancy(batcher.statistics()) == (1, 2, 1)
        callers.cancel(2)
        await trio.testing.wait_all_tasks_blocked()
        assert occupancy(batcher.statistics()) == (1, 1, 1)
        assert batcher.statistics().withdrawn == 1
        await trio.sleep(5)
    assert downstream.calls == [(0.0, [0]), (1.0, [1]), (2.0, [3])]
    assert callers.results == {0: 0, 1: 10, 2: CANCELLED, 3: 30}


async def test_a_withdrawn_item_makes_room_for_a_waiting_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, queue_size=1) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1, 2])
        assert occupancy(batcher.statistics()) == (1, 1, 1)
        callers.cancel(1)
        await trio.testing.wait_all_tasks_blocked()
        assert occupancy(batcher.statistics()) == (1, 0, 1)


async def test_a_caller_waiting_for_room_is_served_after_the_queue_is_withdrawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    with trio.fail_after(100):
        async with mcs.open_batcher(downstream, queue_size=1) as batcher:
            async with trio.open_nursery() as nursery:
                callers = Callers(nursery, batcher)
                await callers.start_in_order([0, 1, 2])
                callers.cancel(1)
    assert callers.results == {0: 0, 1: CANCELLED, 2: 20}
    assert downstream.calls == [(0.0, [0]), (1.0, [2])]
    assert callers.done_at == {0: 1.0, 1: 0.0, 2: 2.0}


# ---------------------------------------------------------------------------- dedupe


async def test_dedupe_sends_equal_items_once_and_fans_out_results(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, dedupe=True) as batcher,
    ):
        callers = Callers(nursery, batcher)
        for key, item in [("busy", 1), ("a", 7), ("b", 7), ("c", 8), ("d", 7), ("e", 8)]:
            callers.start(key, item)
            await trio.testing.wait_all_tasks_blocked()
    assert downstream.calls == [(0.0, [1]), (1.0, [7, 8])]
    assert callers.results == {"busy": 10, "a": 70, "b": 70, "c": 80, "d": 70, "e": 80}
    statistics = batcher.statistics()
    assert (statistics.batches, statistics.items, statistics.callers_served) == (2, 3, 6)
    assert (statistics.peak_batch_size, statistics.mean_batch_size) == (2, 1.5)


async def test_dedupe_fans_out_per_item_errors_and_mapping_results() -> None:
    sent: list[list[int]] = []

    async def lookup(items: list[int]) -> dict[int, int | Exception]:
        sent.append(items)
        return {item: ItemFailed(f"no row {item}") if item == 8 else item * 10 for item in items}

    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(lookup, dedupe=True) as batcher,
    ):
        callers = Callers(nursery, batcher)
        await trio.testing.wait_all_tasks_blocked()
        for key, item in [("a", 7), ("b", 8), ("c", 7), ("d", 8)]:
            callers.start(key, item)
        await trio.testing.wait_all_tasks_blocked()
    assert [sorted(items) for items in sent] == [[7, 8]]
    failed = Raised(ItemFailed, "no row 8")
    assert callers.results == {"a": 70, "b": failed, "c": 70, "d": failed}


async def test_dedupe_sends_unhashable_items_one_by_one() -> None:
    sent: list[list[list[int]]] = []

    async def total(items: list[list[int]]) -> list[int]:
        sent.append(items)
        return [sum(item) for item in items]

    async with trio.open_nursery() as nursery, mcs.open_batcher(total, dedupe=True) as batcher:
        callers = Callers(nursery, batcher)
        await trio.testing.wait_all_tasks_blocked()
        callers.start("a", [1, 2])
        callers.start("b", [1, 2])
        await trio.testing.wait_all_tasks_blocked()
    assert sent == [[[1, 2], [1, 2]]]
    assert callers.results == {"a": 3, "b": 3}


async def test_without_dedupe_equal_items_are_all_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery, mcs.open_batcher(downstream) as batcher:
        callers = Callers(nursery, batcher)
        for key, item in [("busy", 1), ("a", 7), ("b", 7)]:
            callers.start(key, item)
            await trio.testing.wait_all_tasks_blocked()
    assert downstream.calls == [(0.0, [1]), (1.0, [7, 7])]
    assert callers.results == {"busy": 10, "a": 70, "b": 70}


async def test_dedupe_keeps_serving_a_duplicate_whose_twin_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, dedupe=True) as batcher,
    ):
        callers = Callers(nursery, batcher)
        for key, item in [("busy", 1), ("a", 7), ("b", 7), ("c", 7)]:
            callers.start(key, item)
            await trio.testing.wait_all_tasks_blocked()
        callers.cancel("a")  # while queued
        await trio.sleep(1.5)
        callers.cancel("b")  # while in flight
    assert downstream.calls == [(0.0, [1]), (1.0, [7])]
    assert callers.results == {"busy": 10, "a": CANCELLED, "b": CANCELLED, "c": 70}
    statistics = batcher.statistics()
    assert (statistics.withdrawn, statistics.dropped, statistics.callers_served) == (1, 1, 2)


# ---------------------------------------------------------------------------- lifecycle


async def test_normal_exit_drains_every_accepted_item(
    autojump_clock: trio.testing.MockClock, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery:
        async with mcs.open_batcher(downstream, max_batch_size=2, name="db") as batcher:
            callers = Callers(nursery, batcher)
            await callers.start_in_order(range(5))
            tasks = mcs_tasks()
            assert len(tasks) == 2  # the dispatcher and the running batch
            assert "mcs.Batcher(db).dispatcher" in tasks
        assert trio.current_time() == 3.0
        assert mcs_tasks() == []
        assert repr(batcher) == "<mcs.Batcher 'db' closed: queued=0 in_flight=0/1>"
    assert downstream.calls == [(0.0, [0]), (1.0, [1, 2]), (2.0, [3, 4])]
    assert callers.results == {i: i * 10 for i in range(5)}


async def test_a_call_after_close_raises_closed_resource_error() -> None:
    async with mcs.open_batcher(fetch_rows, name="db") as batcher:
        assert await batcher(1) == 10
    with (
        trio.testing.assert_checkpoints(),
        pytest.raises(trio.ClosedResourceError, match=r"^batcher 'db' is closed$"),
    ):
        await batcher(2)
    assert batcher.statistics().rejected == 0


async def test_callers_waiting_for_room_at_normal_exit_are_turned_away(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery:
        async with mcs.open_batcher(downstream, queue_size=1, name="db") as batcher:
            callers = Callers(nursery, batcher)
            await callers.start_in_order([0, 1, 2])
        assert trio.current_time() == 2.0
    closed = Raised(trio.ClosedResourceError, "batcher 'db' closed before this item was accepted")
    assert callers.results == {0: 0, 1: 10, 2: closed}
    assert callers.done_at == {0: 1.0, 1: 2.0, 2: 0.0}
    assert downstream.calls == [(0.0, [0]), (1.0, [1])]


class BlockFailed(Exception):
    pass


async def test_a_failing_block_breaks_every_pending_caller_at_once(
    autojump_clock: trio.testing.MockClock, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream(delay=10.0)
    error = BlockFailed("boom")
    async with trio.open_nursery() as nursery:
        with pytest.raises(BlockFailed, match=r"^boom$") as excinfo:  # noqa: PT012 - the block is what raises
            async with mcs.open_batcher(downstream, max_batch_size=2, name="db") as batcher:
                callers = Callers(nursery, batcher)
                await callers.start_in_order([0, 1, 2])
                await trio.sleep(1)
                raise error
        assert excinfo.value is error
        assert trio.current_time() == 1.0
        assert mcs_tasks() == []
    in_flight = Raised(
        trio.BrokenResourceError, "batcher 'db' was shut down while this item was in flight"
    )
    queued = Raised(
        trio.BrokenResourceError, "batcher 'db' was shut down before this item was processed"
    )
    assert callers.results == {0: in_flight, 1: queued, 2: queued}
    assert callers.done_at == {0: 1.0, 1: 1.0, 2: 1.0}
    assert downstream.calls == [(0.0, [0])]
    assert downstream.cancelled == 1
    with pytest.raises(trio.ClosedResourceError, match=r"^batcher 'db' is closed$"):
        await batcher(3)


async def test_a_failing_block_breaks_callers_waiting_for_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=10.0)
    async with trio.open_nursery() as nursery:
        with pytest.raises(BlockFailed):  # noqa: PT012 - the block is what raises
            async with mcs.open_batcher(downstream, queue_size=1, name="db") as batcher:
                callers = Callers(nursery, batcher)
                await callers.start_in_order([0, 1, 2])
                assert occupancy(batcher.statistics()) == (1, 1, 1)
                raise BlockFailed
    queued = Raised(
        trio.BrokenResourceError, "batcher 'db' was shut down before this item was processed"
    )
    assert callers.results[1] == queued
    assert callers.results[2] == queued
    assert callers.done_at == {0: 0.0, 1: 0.0, 2: 0.0}


async def test_a_cancelled_block_breaks_every_pending_caller_at_once(
    autojump_clock: trio.testing.MockClock, mcs_tasks: TaskLister
) -> None:
    downstream = Downstream(delay=10.0)
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1) as scope:
            async with mcs.open_batcher(downstream, name="db") as batcher:
                callers = Callers(nursery, batcher)
                await callers.start_in_order([0, 1])
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert trio.current_time() == 1.0
        assert mcs_tasks() == []
    assert callers.results == {
        0: Raised(
            trio.BrokenResourceError, "batcher 'db' was shut down while this item was in flight"
        ),
        1: Raised(
            trio.BrokenResourceError, "batcher 'db' was shut down before this item was processed"
        ),
    }
    assert callers.done_at == {0: 1.0, 1: 1.0}
    assert downstream.cancelled == 1


async def test_the_block_error_propagates_unwrapped_when_idle(mcs_tasks: TaskLister) -> None:
    with pytest.raises(BlockFailed, match=r"^idle$"):  # noqa: PT012 - the block is what raises
        async with mcs.open_batcher(fetch_rows) as batcher:
            assert await batcher(1) == 10
            raise BlockFailed("idle")
    assert mcs_tasks() == []


async def test_a_keyboard_interrupt_in_the_block_propagates_unwrapped() -> None:
    with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the block is what raises
        async with mcs.open_batcher(fetch_rows) as batcher:
            assert await batcher(1) == 10
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------- statistics


async def test_statistics_of_a_fresh_batcher() -> None:
    async with mcs.open_batcher(fetch_rows, max_in_flight=4) as batcher:
        nothing = mcs.Percentiles(count=0, p50=0.0, p90=0.0, p99=0.0, max=0.0)
        assert batcher.statistics() == mcs.BatcherStatistics(
            name="fetch_rows",
            queued=0,
            waiting_for_room=0,
            in_flight=0,
            max_in_flight=4,
            batches=0,
            items=0,
            callers_served=0,
            mean_batch_size=0.0,
            peak_batch_size=0,
            queue_wait=nothing,
            batch_time=nothing,
            busy_time=0.0,
            failed_batches=0,
            timed_out_batches=0,
            cancelled_batches=0,
            rejected=0,
            withdrawn=0,
            dropped=0,
            rate_limit_waits=0,
            rate_limit_wait_time=0.0,
            saturation=0.0,
        )


async def test_statistics_are_exact_on_the_virtual_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=3, name="db") as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0])
        await trio.sleep(0.5)
        await callers.start_in_order([1, 2, 3, 4])
        during = batcher.statistics()
        await trio.sleep(3)
        after = batcher.statistics()
    assert trio.current_time() == 3.5
    assert during == mcs.BatcherStatistics(
        name="db",
        queued=4,
        waiting_for_room=0,
        in_flight=1,
        max_in_flight=1,
        batches=1,
        items=1,
        callers_served=0,
        mean_batch_size=1.0,
        peak_batch_size=1,
        queue_wait=mcs.Percentiles(count=1, p50=0.0, p90=0.0, p99=0.0, max=0.0),
        batch_time=mcs.Percentiles(count=0, p50=0.0, p90=0.0, p99=0.0, max=0.0),
        busy_time=0.0,
        failed_batches=0,
        timed_out_batches=0,
        cancelled_batches=0,
        rejected=0,
        withdrawn=0,
        dropped=0,
        rate_limit_waits=0,
        rate_limit_wait_time=0.0,
        saturation=1.0,
    )
    assert downstream.calls == [(0.0, [0]), (1.0, [1, 2, 3]), (2.0, [4])]
    assert after == mcs.BatcherStatistics(
        name="db",
        queued=0,
        waiting_for_room=0,
        in_flight=0,
        max_in_flight=1,
        batches=3,
        items=5,
        callers_served=5,
        mean_batch_size=5 / 3,
        peak_batch_size=3,
        queue_wait=mcs.Percentiles(count=5, p50=0.5, p90=1.5, p99=1.5, max=1.5),
        batch_time=mcs.Percentiles(count=3, p50=1.0, p90=1.0, p99=1.0, max=1.0),
        busy_time=3.0,
        failed_batches=0,
        timed_out_batches=0,
        cancelled_batches=0,
        rejected=0,
        withdrawn=0,
        dropped=0,
        rate_limit_waits=0,
        rate_limit_wait_time=0.0,
        saturation=0.5,
    )


async def test_percentiles_use_the_nearest_rank(autojump_clock: trio.testing.MockClock) -> None:
    durations = iter(range(1, 11))

    async def uneven(items: list[int]) -> list[int]:
        await trio.sleep(next(durations))
        return items

    async with mcs.open_batcher(uneven) as batcher:
        for item in range(10):
            await batcher(item)
        assert batcher.statistics().batch_time == mcs.Percentiles(
            count=10, p50=5.0, p90=9.0, p99=10.0, max=10.0
        )
        assert trio.current_time() == 55.0


async def test_saturation_counts_only_time_with_every_slot_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, max_batch_size=1, max_in_flight=2) as batcher,
    ):
        callers = Callers(nursery, batcher)
        callers.start(1, at=0.0)
        callers.start(2, at=0.5)
        await trio.sleep(0.25)
        assert batcher.statistics().saturation == 0.0
        await trio.sleep_until(1.5)
        # Both slots were busy from 0.5 to 1.0: half of the last second.
        assert batcher.statistics().saturation == 0.5
        await trio.sleep_until(2.5)
        assert batcher.statistics().saturation == 0.0


async def test_statistics_are_frozen() -> None:
    async with mcs.open_batcher(fetch_rows) as batcher:
        statistics = batcher.statistics()
        with pytest.raises(AttributeError):
            setattr(statistics, "batches", 3)  # noqa: B010 - the point is to try
        assert statistics.batches == 0


# ---------------------------------------------------------------------------- checkpoints


async def test_every_call_is_a_checkpoint_on_every_path() -> None:
    async def scripted(items: list[int]) -> dict[int, int | Exception]:
        if 3 in items:
            raise DownstreamDown("down")
        return {item: ItemFailed("no") if item == 2 else item * 10 for item in items if item != 4}

    async with mcs.open_batcher(scripted, name="db") as batcher:
        with trio.testing.assert_checkpoints():
            assert await batcher(1) == 10
        with trio.testing.assert_checkpoints(), pytest.raises(ItemFailed):
            await batcher(2)
        with trio.testing.assert_checkpoints(), pytest.raises(DownstreamDown):
            await batcher(3)
        with trio.testing.assert_checkpoints(), pytest.raises(mcs.BatchResultError):
            await batcher(4)
    with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
        await batcher(1)


async def test_a_call_broken_by_shutdown_is_a_checkpoint() -> None:
    checked: list[bool] = []

    async def caller(batcher: mcs.Batcher[int, int]) -> None:
        with trio.testing.assert_checkpoints(), pytest.raises(trio.BrokenResourceError):
            await batcher(1)
        checked.append(True)

    async with trio.open_nursery() as nursery:
        with pytest.raises(BlockFailed):  # noqa: PT012 - the block is what raises
            async with mcs.open_batcher(Downstream(delay=1.0)) as batcher:
                nursery.start_soon(caller, batcher)
                await trio.testing.wait_all_tasks_blocked()
                raise BlockFailed
    assert checked == [True]


async def test_a_cancelled_caller_is_cancelled_rather_than_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream(delay=1.0)
    async with (
        trio.open_nursery() as nursery,
        mcs.open_batcher(downstream, queue_size=1, overload="reject") as batcher,
    ):
        callers = Callers(nursery, batcher)
        await callers.start_in_order([0, 1])
        with trio.CancelScope() as scope:
            scope.cancel()
            await batcher(2)
        assert scope.cancelled_caught
        assert batcher.statistics().rejected == 0
    with trio.CancelScope() as scope:
        scope.cancel()
        await batcher(3)
    assert scope.cancelled_caught
    assert downstream.calls == [(0.0, [0]), (1.0, [1])]


async def test_a_batcher_that_was_never_opened_refuses_calls() -> None:
    batcher = mcs.Batcher(fetch_rows, name="db")
    message = r"^batcher 'db' is not open: use 'async with mcs\.open_batcher\(\.\.\.\)'$"
    with trio.testing.assert_checkpoints(), pytest.raises(RuntimeError, match=message):
        await batcher(1)
    assert batcher.statistics().rejected == 0


# ---------------------------------------------------------------------------- repr and names


async def test_repr_shows_name_and_state(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream(delay=1.0)
    async with trio.open_nursery() as nursery:
        async with mcs.open_batcher(downstream, max_in_flight=2, max_batch_size=1, name="db") as b:
            assert repr(b) == "<mcs.Batcher 'db' open: queued=0 in_flight=0/2>"
            callers = Callers(nursery, b)
            await callers.start_in_order(range(5))
            assert repr(b) == "<mcs.Batcher 'db' open: queued=3 in_flight=2/2>"
        assert repr(b) == "<mcs.Batcher 'db' closed: queued=0 in_flight=0/2>"


async def test_the_name_defaults_to_the_batch_fn_name() -> None:
    async with mcs.open_batcher(fetch_rows) as batcher:
        assert batcher.name == "fetch_rows"
        assert batcher.rate is None
        assert batcher.statistics().name == "fetch_rows"
        assert repr(batcher) == "<mcs.Batcher 'fetch_rows' open: queued=0 in_flight=0/1>"
    async with mcs.open_batcher(fetch_rows, name="rows") as batcher:
        assert batcher.name == "rows"
