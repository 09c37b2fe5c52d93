"""Limits shared by several batchers of one process, on trio's virtual clock.

A ``trio.CapacityLimiter`` as ``max_in_flight`` (one token per batch), and the
:class:`mcs.SharedRate` / :class:`mcs.SharedInFlight` protocols that ``mcs.redis`` implements,
here with in-process implementations so every time is exact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import arrival_patterns

import mcs
from mcs._rate import _Gcra

RateOracle = Callable[[Sequence[tuple[float, int]], mcs.RateLimit], list[str]]


class Pool:
    """Three tables behind one pool: records how many calls run at once across them."""

    def __init__(self, duration: float = 1.0) -> None:
        self.duration = duration
        self.running = self.peak = 0
        self.calls: list[tuple[str, float, list[int]]] = []

    def table(self, name: str) -> Callable[[list[int]], Awaitable[list[int]]]:
        async def batch_fn(items: list[int]) -> list[int]:
            self.calls.append((name, trio.current_time(), list(items)))
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await trio.sleep(self.duration)
            finally:
                self.running -= 1
            return [item + 1000 for item in items]

        batch_fn.__name__ = batch_fn.__qualname__ = name
        return batch_fn


async def test_three_batchers_share_one_capacity_limiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool, limiter = Pool(), trio.CapacityLimiter(2)
    results: list[tuple[str, int]] = []
    async with (
        mcs.open_batcher(pool.table("users"), max_in_flight=limiter) as users,
        mcs.open_batcher(pool.table("posts"), max_in_flight=limiter) as posts,
        mcs.open_batcher(pool.table("tags"), max_in_flight=limiter) as tags,
    ):

        async def call(batcher: mcs.Batcher[int, int], item: int) -> None:
            results.append((batcher.name, await batcher(item)))

        async with trio.open_nursery() as nursery:
            for batcher in (users, posts, tags):
                for item in range(3):
                    nursery.start_soon(call, batcher, item)
            await trio.testing.wait_all_tasks_blocked()
            # Two of the three tables hold the pool's two tokens, one token per batch.
            assert limiter.borrowed_tokens == 2
            assert sum(b.statistics().in_flight for b in (users, posts, tags)) == 2
            assert users.max_in_flight == 2
            assert users.statistics().max_in_flight == 2
    assert pool.peak == 2
    assert sorted(time for _, time, _ in pool.calls) == [0.0, 0.0, 1.0]
    assert len(results) == 9
    assert limiter.borrowed_tokens == 0  # every token given back


async def test_max_in_flight_is_read_only_when_shared(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = trio.CapacityLimiter(3)
    async with mcs.open_batcher(Pool().table("users"), max_in_flight=limiter) as users:
        assert users.max_in_flight == 3
        limiter.total_tokens = 5  # the shared limit is changed on the limiter
        assert users.max_in_flight == 5
        with pytest.raises(
            AttributeError, match=r"^batcher 'users': max_in_flight is shared \(<in-flight slots"
        ):
            users.max_in_flight = 4
    assert "in_flight=0/5" in repr(users)


async def test_a_waiting_batcher_gives_up_its_wait_when_its_callers_leave(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool, limiter = Pool(duration=10.0), trio.CapacityLimiter(1)
    async with (
        mcs.open_batcher(pool.table("users"), max_in_flight=limiter) as users,
        mcs.open_batcher(pool.table("posts"), max_in_flight=limiter) as posts,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(users, 1)  # holds the only token until 10.0
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1.0):
                await posts(2)  # waits for the token, then leaves
            await trio.testing.wait_all_tasks_blocked()
            # posts is not holding (or queued for) a token it has nothing to send with.
            assert limiter.statistics().tasks_waiting == 0
            assert posts.statistics().withdrawn == 1
    assert [name for name, _, _ in pool.calls] == ["users"]
    assert limiter.borrowed_tokens == 0


async def test_cancel_abandoned_frees_a_shared_token_for_a_waiting_batcher(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool, limiter = Pool(duration=10.0), trio.CapacityLimiter(1)
    async with (
        mcs.open_batcher(
            pool.table("users"), max_in_flight=limiter, cancel_abandoned=True
        ) as users,
        mcs.open_batcher(pool.table("posts"), max_in_flight=limiter) as posts,
    ):
        with trio.move_on_after(1.0):
            await users(1)  # its batch is cancelled at 1.0: the token comes back
        assert await posts(2) == 1002
    assert [(name, time) for name, time, _ in pool.calls] == [("users", 0.0), ("posts", 1.0)]
    assert users.statistics().cancelled_batches == 1


@settings(max_examples=100, deadline=None)
@given(
    total=st.integers(1, 4),
    arrivals=st.lists(arrival_patterns(max_calls=10), min_size=3, max_size=3),
    sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    duration=st.sampled_from([0.0, 0.125, 1.0]),
)
def test_a_capacity_limiter_shared_by_three_batchers_is_never_exceeded(
    total: int,
    arrivals: list[tuple[float, ...]],
    sizes: list[int],
    duration: float,
    mcs_tasks: Callable[[], list[str]],
) -> None:
    pool, results = Pool(duration), {}

    async def main() -> None:
        limiter = trio.CapacityLimiter(total)

        async def arrive(batcher: mcs.Batcher[int, int], item: int, at: float) -> None:
            await trio.sleep_until(at)
            results[batcher.name, item] = await batcher(item)

        with trio.fail_after(10_000):
            async with (
                mcs.open_batcher(
                    pool.table("a"), max_in_flight=limiter, max_batch_size=sizes[0]
                ) as a,
                mcs.open_batcher(
                    pool.table("b"), max_in_flight=limiter, max_batch_size=sizes[1]
                ) as b,
                mcs.open_batcher(
                    pool.table("c"), max_in_flight=limiter, max_batch_size=sizes[2]
                ) as c,
                trio.open_nursery() as nursery,
            ):
                for batcher, times in zip((a, b, c), arrivals, strict=True):
                    for item, at in enumerate(times):
                        nursery.start_soon(arrive, batcher, item, at)
        assert limiter.borrowed_tokens == 0
        assert mcs_tasks() == []

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert pool.peak <= total
    expected = {
        (name, item): item + 1000
        for name, times in zip("abc", arrivals, strict=True)
        for item in range(len(times))
    }
    assert results == expected


# ---------------------------------------------------------------- the shared-limit protocols


class LocalSharedRate(mcs.SharedRate):
    """A SharedRate kept in-process (as Redis keeps it), counting its round trips."""

    def __init__(self, limit: mcs.RateLimit, round_trip: float = 0.0) -> None:
        self._limit = limit
        self._gcra = _Gcra(limit)
        self.round_trip = round_trip
        self.reservations: list[tuple[float, int]] = []
        self.down = False

    @property
    def limit(self) -> mcs.RateLimit:
        return self._limit

    async def reserve(self, units: int) -> float:
        await trio.sleep(self.round_trip)
        if self.down:
            raise trio.BrokenResourceError("the shared rate limit 'test' is unavailable")
        now = trio.current_time()
        ready = self._gcra.ready_at(units, now)
        self._gcra.take(units, ready)
        self.reservations.append((now, units))
        return ready - now


async def test_a_shared_rate_is_booked_once_per_batch_while_the_queue_fills(
    autojump_clock: trio.testing.MockClock, rate_bound_violations: RateOracle
) -> None:
    rate = LocalSharedRate(mcs.RateLimit(2, per=1, burst=1), round_trip=0.25)
    pool = Pool(duration=0.0)
    async with mcs.open_batcher(pool.table("api"), rate=rate, max_batch_size=100) as api:
        async with trio.open_nursery() as nursery:
            for item in range(3):
                nursery.start_soon(api, item)
            await trio.sleep(0.1)  # these arrive during the first round trip: same batch
            for item in range(3, 5):
                nursery.start_soon(api, item)
            await trio.sleep(0.3)  # these wait for the next booking, at 0.5
            for item in range(5, 7):
                nursery.start_soon(api, item)
    assert [(time, sorted(items)) for _, time, items in pool.calls] == [
        (0.25, [0, 1, 2, 3, 4]),
        (0.75, [5, 6]),  # booked at 0.5 (round trip from 0.25), allowed at 0.75
    ]
    assert len(rate.reservations) == 2  # one per batch, never per item
    assert rate_bound_violations([(t, 1) for _, t, _ in pool.calls], rate.limit) == []
    assert api.rate == rate.limit


async def test_an_item_counted_shared_rate_books_the_batch_and_sends_no_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate = LocalSharedRate(mcs.RateLimit(10, per=1, burst=4, unit="item"), round_trip=0.25)
    pool = Pool(duration=0.0)
    async with mcs.open_batcher(pool.table("api"), rate=rate, max_batch_size=100) as api:
        async with trio.open_nursery() as nursery:
            for item in range(2):
                nursery.start_soon(api, item)
            await trio.sleep(0.1)
            for item in range(2, 6):  # arrive during the round trip: not booked, not sent
                nursery.start_soon(api, item)
    sizes = [len(items) for _, _, items in pool.calls]
    assert sizes[0] == 2
    assert [units for _, units in rate.reservations] == sizes
    assert max(sizes) <= 4  # batches capped at the burst


async def test_an_unavailable_shared_rate_fails_that_batch_with_the_batcher_named(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate = LocalSharedRate(mcs.RateLimit(100, burst=10), round_trip=0.25)
    rate.down = True
    async with mcs.open_batcher(Pool().table("api"), rate=rate, max_batch_size=2) as api:
        outcomes = await api.many(range(3))
        rate.down = False
        assert await api(9) == 1009  # back: the next batch goes
    assert [str(error) for error in outcomes] == [
        "batcher 'api': the shared rate limit 'test' is unavailable"
    ] * 3
    assert all(isinstance(error, trio.BrokenResourceError) for error in outcomes)
    assert api.statistics().limit_errors == 2  # two batches of at most 2


def test_bad_shared_limits_are_refused_at_construction() -> None:
    async def batch_fn(items: list[int]) -> list[int]:
        return items

    with pytest.raises(TypeError, match=r"^max_in_flight must be an int, got 'pool'$"):
        mcs.Batcher(batch_fn, max_in_flight="pool")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^rate must be a mcs\.RateLimit or None, got 'fast'$"):
        mcs.Batcher(batch_fn, rate="fast")  # type: ignore[arg-type]


async def test_split_parts_take_shared_slots_and_bookings_like_any_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate = LocalSharedRate(mcs.RateLimit(10, per=1, burst=4, unit="item"), round_trip=0.25)
    limiter = trio.CapacityLimiter(1)
    calls: list[list[int]] = []

    async def flaky(items: list[int]) -> list[int]:
        calls.append(list(items))
        await trio.sleep(1.0)
        if 1 in items:
            raise ValueError(f"{len(items)} items with 1 in them")
        return items

    async with mcs.open_batcher(
        flaky, rate=rate, max_in_flight=limiter, on_batch_error="split"
    ) as api:
        results = await api.many(range(4))
    assert results[0::2] == [0, 2]
    assert results[3] == 3
    assert str(results[1]) == "1 items with 1 in them"
    assert calls == [[0, 1, 2, 3], [0, 1], [2, 3], [0], [1]]
    assert [units for _, units in rate.reservations] == [4, 2, 2, 1, 1]
    assert limiter.borrowed_tokens == 0
