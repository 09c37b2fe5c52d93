"""Tests of :class:`mcs.RateLimit` and of batchers that obey one, on trio's virtual clock.

The bound ``units <= burst + count * T / per`` over every window is checked exactly, with
:class:`fractions.Fraction`, on the ``trio.current_time()`` stamps of batch_fn starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import pytest
import trio
import trio.testing

import mcs
from mcs._rate import _Gcra

RateOracle = Callable[[Sequence[tuple[float, int]], mcs.RateLimit], list[str]]


class Downstream:
    """A fake batch_fn that records when each call started and with which items."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[float, list[int]]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append((trio.current_time(), list(items)))
        await trio.sleep(self.delay)
        return [item * 10 for item in items]

    def starts(self, unit: str = "call") -> list[tuple[float, int]]:
        return [(at, len(items) if unit == "item" else 1) for at, items in self.calls]


async def call_all(
    batcher: mcs.Batcher[int, int], items: Sequence[int], *, in_order: bool = True
) -> dict[int, tuple[int, float]]:
    """Call with every item (one task each, in order unless told), and wait for all results."""
    results: dict[int, tuple[int, float]] = {}

    async def call(item: int) -> None:
        value = await batcher(item)
        results[item] = (value, trio.current_time())

    async with trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        for item in items:
            nursery.start_soon(call, item)
            if in_order:
                await trio.testing.wait_all_tasks_blocked()
    return results


def ceil_float(value: Fraction) -> float:
    """The smallest float at or above ``value``."""
    as_float = float(value)
    return as_float if Fraction(as_float) >= value else math.nextafter(as_float, math.inf)


# ---------------------------------------------------------------------------- RateLimit


def test_defaults() -> None:
    limit = mcs.RateLimit(10)
    assert (limit.count, limit.per, limit.burst, limit.unit) == (10, 1.0, 1, "call")
    assert limit == mcs.RateLimit(10, per=1.0, burst=1, unit="call")
    assert hash(limit) == hash(mcs.RateLimit(10, per=1.0, burst=1, unit="call"))
    assert repr(limit) == "RateLimit(count=10, per=1.0, burst=1, unit='call')"


def test_is_frozen() -> None:
    limit = mcs.RateLimit(10)
    with pytest.raises(AttributeError):
        setattr(limit, "count", 20)  # noqa: B010 - the point is to try
    assert limit.count == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param({"count": 0}, ValueError, r"count must be > 0, got 0"),
        pytest.param({"count": -2.5}, ValueError, r"count must be > 0, got -2\.5"),
        pytest.param({"count": "5"}, TypeError, r"count must be a finite number, got '5'"),
        pytest.param({"count": None}, TypeError, r"count must be a finite number, got None"),
        pytest.param({"count": True}, TypeError, r"count must be a finite number, got True"),
        pytest.param({"count": math.inf}, ValueError, r"count must be a finite number, got inf"),
        pytest.param({"count": math.nan}, ValueError, r"count must be a finite number, got nan"),
        pytest.param({"count": 1, "per": 0}, ValueError, r"per must be > 0, got 0"),
        pytest.param({"count": 1, "per": -1.0}, ValueError, r"per must be > 0, got -1\.0"),
        pytest.param({"count": 1, "per": "1"}, TypeError, r"per must be a finite number, got '1'"),
        pytest.param(
            {"count": 1, "per": math.inf}, ValueError, r"per must be a finite number, got inf"
        ),
        pytest.param({"count": 1, "burst": 0}, ValueError, r"burst must be >= 1, got 0"),
        pytest.param({"count": 1, "burst": -1}, ValueError, r"burst must be >= 1, got -1"),
        pytest.param({"count": 1, "burst": 2.0}, TypeError, r"burst must be an int, got 2\.0"),
        pytest.param({"count": 1, "burst": 2.5}, TypeError, r"burst must be an int, got 2\.5"),
        pytest.param({"count": 1, "burst": True}, TypeError, r"burst must be an int, got True"),
        pytest.param(
            {"count": 1, "unit": "items"}, ValueError, r"unit must be 'call' or 'item', got 'items'"
        ),
        pytest.param(
            {"count": 1, "unit": None}, ValueError, r"unit must be 'call' or 'item', got None"
        ),
        pytest.param(
            {"count": 10**400}, ValueError, r"count must be a finite number, got 10{400}", id="huge"
        ),
        pytest.param(
            {"count": 1, "per": 10**400},
            ValueError,
            r"per must be a finite number, got 10{400}",
            id="huge-per",
        ),
        pytest.param(
            {"count": Fraction(10**400)},
            ValueError,
            r"count must be a finite number, got Fraction\(10{400}, 1\)",
            id="huge-fraction",
        ),
        pytest.param(
            {"count": 10**5000},
            ValueError,
            r"count must be a finite number, got an int of 16610 bits",
            id="too-long-to-print",
        ),
        pytest.param(
            {"count": -(10**400)},
            ValueError,
            r"count must be a finite number, got -10{400}",
            id="huge-negative",
        ),
        pytest.param(
            {"count": 1e308, "per": 1e-308},
            ValueError,
            r"per / count must be within the range of a float, got 1e-308 / 1e\+308",
            id="interval-too-small",
        ),
        pytest.param(
            {"count": 1e-308, "per": 1e308},
            ValueError,
            r"per / count must be within the range of a float, got 1e\+308 / 1e-308",
            id="interval-too-large",
        ),
        pytest.param(
            {"count": 3, "per": 5e-324},
            ValueError,
            r"per / count must be within the range of a float, got 5e-324 / 3",
            id="interval-below-the-smallest-float",
        ),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"^{message}$"):
        mcs.RateLimit(**kwargs)


@pytest.mark.parametrize(
    ("count", "per"),
    [
        (1e308, 1.0),
        (1.0, 1e308),
        (1e-300, 1e8),
        (1e300, 1e-8),
        (Fraction(1, 10**300), 1e-10),
        (10**300, 1.0),
        (1, 5e-324),
    ],
)
def test_extreme_limits_that_a_float_can_hold_are_accepted(count: float, per: float) -> None:
    limit = mcs.RateLimit(count, per=per, burst=10**400)
    assert (limit.count, limit.per, limit.burst) == (count, per, 10**400)


async def test_a_start_beyond_the_largest_float_never_comes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # T = 1e308 s: two items take the whole burst, and two more may start at 2e308 s
    limit = mcs.RateLimit(1e-300, per=1e8, burst=2, unit="item")
    downstream = Downstream()
    with trio.move_on_after(1e6) as scope:
        async with mcs.open_batcher(downstream, rate=limit) as batcher:
            await call_all(batcher, [1, 2], in_order=False)  # one batch of two
            await call_all(batcher, [3, 4], in_order=False)
    assert scope.cancelled_caught
    assert [(at, sorted(items)) for at, items in downstream.calls] == [(0.0, [1, 2])]
    assert trio.current_time() == 1e6


def test_the_deadline_of_a_start_beyond_the_largest_float_is_inf() -> None:
    gcra = _Gcra(mcs.RateLimit(1e-300, per=1e8, burst=2, unit="item"))
    assert gcra.ready_at(2, 5.0) == 5.0
    gcra.take(2, 5.0)
    assert gcra.ready_at(1, 5.0) == 1e308  # 5 + 2e308 - 1e308, rounded up
    assert gcra.ready_at(2, 5.0) == math.inf


def test_the_rate_oracle_catches_a_violation(rate_bound_violations: RateOracle) -> None:
    limit = mcs.RateLimit(2, burst=2)
    assert rate_bound_violations([(0.0, 1), (0.0, 1), (0.5, 1), (1.0, 1)], limit) == []
    assert rate_bound_violations([(0.0, 1), (0.0, 1), (0.25, 1)], limit) == [
        "3 units in [0.0, 0.25], at most 5/2 allowed"
    ]
    assert rate_bound_violations([(0.0, 3)], limit) == ["3 units in [0.0, 0.0], at most 2 allowed"]


# ---------------------------------------------------------------------------- unit="call"


async def test_calls_are_spaced_exactly(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    limit = mcs.RateLimit(2)
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=limit, max_batch_size=1) as batcher:
        assert batcher.rate is limit
        results = await call_all(batcher, range(5))
        statistics = batcher.statistics()
    assert downstream.calls == [(0.0, [0]), (0.5, [1]), (1.0, [2]), (1.5, [3]), (2.0, [4])]
    assert results == {i: (i * 10, i / 2) for i in range(5)}
    assert (statistics.rate_limit_waits, statistics.rate_limit_wait_time) == (4, 2.0)
    assert rate_bound_violations(downstream.starts(), limit) == []


async def test_a_burst_goes_out_at_once_then_the_rate_applies(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    limit = mcs.RateLimit(2, burst=3)
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=limit, max_batch_size=1) as batcher:
        await call_all(batcher, range(6))
        statistics = batcher.statistics()
    assert downstream.calls == [
        (0.0, [0]),
        (0.0, [1]),
        (0.0, [2]),
        (0.5, [3]),
        (1.0, [4]),
        (1.5, [5]),
    ]
    assert (statistics.rate_limit_waits, statistics.rate_limit_wait_time) == (3, 1.5)
    assert rate_bound_violations(downstream.starts(), limit) == []


async def test_a_call_rate_counts_calls_not_items(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=mcs.RateLimit(1)) as batcher:
        await call_all(batcher, range(6))
    assert downstream.calls == [(0.0, [0]), (1.0, [1, 2, 3, 4, 5])]


async def test_the_burst_refills_after_idle_time(autojump_clock: trio.testing.MockClock) -> None:
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=mcs.RateLimit(4, burst=2), max_batch_size=1) as b:
        await call_all(b, [0, 1, 2])
        await trio.sleep_until(10.0)
        await call_all(b, [3, 4, 5])
    assert downstream.calls == [
        (0.0, [0]),
        (0.0, [1]),
        (0.25, [2]),
        (10.0, [3]),
        (10.0, [4]),
        (10.25, [5]),
    ]


async def test_callers_are_served_first_come_first_served_and_none_dropped(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    limit = mcs.RateLimit(1, per=0.5)
    downstream = Downstream()
    served: list[int] = []

    async def call(batcher: mcs.Batcher[int, int], item: int, at: float) -> None:
        await trio.sleep_until(at)
        assert await batcher(item) == item * 10
        served.append(item)

    async with mcs.open_batcher(downstream, rate=limit, max_batch_size=1) as batcher:
        async with trio.open_nursery() as nursery:
            for item in range(10):
                nursery.start_soon(call, batcher, item, item / 8)
    assert served == list(range(10))
    assert downstream.calls == [(item / 2, [item]) for item in range(10)]
    assert rate_bound_violations(downstream.starts(), limit) == []


async def test_the_bound_holds_exactly_for_rates_that_are_not_binary_fractions(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    limit = mcs.RateLimit(10, burst=3)
    downstream = Downstream()
    async with mcs.open_batcher(
        downstream, rate=limit, max_batch_size=1, max_in_flight=4
    ) as batcher:
        await call_all(batcher, range(50), in_order=False)
    starts = [at for at, _ in downstream.calls]
    # Three at once, then one every tenth of a second, each at the first float not too early.
    expected = [0.0, 0.0, 0.0] + [ceil_float(Fraction(k, 10)) for k in range(1, 48)]
    assert starts == expected
    assert rate_bound_violations(downstream.starts(), limit) == []


async def test_each_call_starts_at_the_first_instant_the_bound_allows(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    # A third of a second is no float: each start is the first float at least a third after the
    # previous start, so the bound holds exactly between the recorded stamps themselves.
    limit = mcs.RateLimit(3)
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=limit, max_batch_size=1) as batcher:
        await call_all(batcher, range(7))
    expected = [0.0]
    for _ in range(6):
        expected.append(ceil_float(Fraction(expected[-1]) + Fraction(1, 3)))
    assert [at for at, _ in downstream.calls] == expected
    assert expected[3] > 1.0
    assert rate_bound_violations(downstream.starts(), limit) == []


async def test_max_in_flight_and_rate_both_hold(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    limit = mcs.RateLimit(4, burst=4)
    downstream = Downstream(delay=1.0)
    async with mcs.open_batcher(
        downstream, rate=limit, max_batch_size=1, max_in_flight=2
    ) as batcher:
        await call_all(batcher, range(6))
    # Two slots: the burst is never the limit, the slots are.
    assert [at for at, _ in downstream.calls] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert rate_bound_violations(downstream.starts(), limit) == []


async def test_a_caller_cancelled_while_waiting_for_the_rate_is_withdrawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = Downstream()
    async with trio.open_nursery() as nursery:
        async with mcs.open_batcher(downstream, rate=mcs.RateLimit(1)) as batcher:

            async def call(item: int, at: float, give_up: float = math.inf) -> None:
                await trio.sleep_until(at)
                with trio.CancelScope(deadline=give_up):
                    assert await batcher(item) == item * 10

            nursery.start_soon(call, 0, 0.0)
            nursery.start_soon(call, 1, 0.25, 0.5)
            nursery.start_soon(call, 2, 0.75)
            await trio.sleep(5)
            statistics = batcher.statistics()
    assert downstream.calls == [(0.0, [0]), (1.0, [2])]
    assert (statistics.withdrawn, statistics.batches) == (1, 2)


# ---------------------------------------------------------------------------- unit="item"


async def test_an_item_rate_caps_each_batch_at_the_burst(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    limit = mcs.RateLimit(4, burst=4, unit="item")
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=limit, max_batch_size=100) as batcher:
        results = await call_all(batcher, range(10), in_order=False)
        statistics = batcher.statistics()
    assert [(at, len(items)) for at, items in downstream.calls] == [(0.0, 4), (1.0, 4), (1.5, 2)]
    assert sorted(item for _, items in downstream.calls for item in items) == list(range(10))
    assert results == {item: (item * 10, at) for at, items in downstream.calls for item in items}
    assert statistics.peak_batch_size == 4
    assert (statistics.rate_limit_waits, statistics.rate_limit_wait_time) == (2, 1.5)
    assert rate_bound_violations(downstream.starts("item"), limit) == []


async def test_max_batch_size_still_applies_under_an_item_rate(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    limit = mcs.RateLimit(8, burst=8, unit="item")
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=limit, max_batch_size=3) as batcher:
        await call_all(batcher, range(10), in_order=False)
    assert [(at, len(items)) for at, items in downstream.calls] == [
        (0.0, 3),
        (0.0, 3),
        (0.125, 3),
        (0.25, 1),
    ]
    assert rate_bound_violations(downstream.starts("item"), limit) == []


async def test_each_batch_that_waits_for_the_rate_counts_once(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    # Item 4 must wait for the rate; while it waits, more items arrive and join its batch, which
    # then waits longer. That is still one batch that waited.
    limit = mcs.RateLimit(4, burst=4, unit="item")
    downstream = Downstream()
    async with mcs.open_batcher(downstream, rate=limit, max_batch_size=100) as batcher:
        await call_all(batcher, range(10))
        statistics = batcher.statistics()
    assert downstream.calls == [
        (0.0, [0]),
        (0.0, [1]),
        (0.0, [2]),
        (0.0, [3]),
        (1.0, [4, 5, 6, 7]),
        (1.5, [8, 9]),
    ]
    assert statistics.rate_limit_wait_time == 1.5
    assert statistics.rate_limit_waits == 2
    assert rate_bound_violations(downstream.starts("item"), limit) == []
