"""mcs.autoscale: max_in_flight follows the downstream's measured capacity (virtual time)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing

import mcs

BatchFn = Callable[[list[int]], Awaitable[list[int]]]


def downstream(capacity: float, base: float = 0.01) -> tuple[BatchFn, list[int]]:
    """A batch_fn whose calls slow down once more than ``capacity`` of them overlap."""
    active = 0
    seen: list[int] = []

    async def batch_fn(items: list[int]) -> list[int]:
        nonlocal active
        active += 1
        seen.append(active)
        try:
            await trio.sleep(base * max(1.0, active / capacity))
        finally:
            active -= 1
        return items

    return batch_fn, seen


async def drive(
    batcher: mcs.Batcher[int, int], clients: int, seconds: float, **options: float
) -> list[int]:
    """Run ``clients`` closed-loop callers and autoscale; the limit sampled every 0.1 s."""
    limits: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(mcs.autoscale, batcher, **options))  # type: ignore[arg-type]

        async def client() -> None:
            while True:
                await batcher(1)

        for _ in range(clients):
            nursery.start_soon(client)
        for _ in range(round(seconds / 0.1)):
            await trio.sleep(0.1)
            limits.append(batcher.max_in_flight)
        nursery.cancel_scope.cancel()
    return limits


async def test_grows_to_the_maximum_while_latency_stays_flat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn, seen = downstream(capacity=1_000)
    async with mcs.open_batcher(batch_fn, max_batch_size=10) as batcher:
        limits = await drive(batcher, clients=2_000, seconds=2.0, max_in_flight=32)
    assert limits[0] < 32
    assert limits[-1] == 32
    assert max(seen) <= 32
    assert limits == sorted(limits)  # flat latency: it never had a reason to shrink


async def test_settles_near_the_downstream_capacity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch_fn, seen = downstream(capacity=8)
    async with mcs.open_batcher(batch_fn, max_batch_size=10) as batcher:
        limits = await drive(batcher, clients=2_000, seconds=5.0, max_in_flight=64)
    settled = limits[-20:]
    # tolerance 1.5 lets calls get 50% slower than at no load: about 1.5x the capacity
    assert all(8 <= limit <= 24 for limit in settled), settled
    assert max(seen) <= 64


async def test_does_not_grow_while_slots_idle(autojump_clock: trio.testing.MockClock) -> None:
    batch_fn, _ = downstream(capacity=1_000)
    async with mcs.open_batcher(batch_fn, max_batch_size=10) as batcher:
        limits: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(mcs.autoscale, batcher, max_in_flight=32))

            async def client() -> None:  # keeps the one slot busy a fifth of the time
                while True:
                    await batcher(1)
                    await trio.sleep(0.04)

            nursery.start_soon(client)
            for _ in range(20):
                await trio.sleep(0.1)
                limits.append(batcher.max_in_flight)
            nursery.cancel_scope.cancel()
    assert set(limits) == {1}


async def test_failures_shrink_the_limit_to_the_minimum(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def failing(items: list[int]) -> list[int]:
        await trio.sleep(0.01)
        raise OSError("downstream unavailable")

    async with mcs.open_batcher(failing, max_in_flight=20) as batcher:
        limits: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(mcs.autoscale, batcher, min_in_flight=2))

            async def client() -> None:
                while True:
                    with pytest.raises(OSError, match=r"^downstream unavailable$"):
                        await batcher(1)

            for _ in range(100):
                nursery.start_soon(client)
            await trio.sleep(0.05)  # sample between adjustments, not at the same instant
            for _ in range(40):
                await trio.sleep(0.1)
                limits.append(batcher.max_in_flight)
            nursery.cancel_scope.cancel()
    assert limits[0] == 18  # 20 * 0.9, rounded
    assert limits == sorted(limits, reverse=True)
    assert limits[-1] == 2


async def test_interval_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    batch_fn, _ = downstream(capacity=1_000)
    async with mcs.open_batcher(batch_fn) as batcher:
        with trio.move_on_after(0.35):
            await mcs.autoscale(batcher, interval=0.1)
        assert trio.current_time() == pytest.approx(0.35, abs=0)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"min_in_flight": 0}, ValueError, r"^min_in_flight must be >= 1, got 0$"),
        ({"min_in_flight": 1.5}, TypeError, r"^min_in_flight must be an int, got 1\.5$"),
        (
            {"min_in_flight": 4, "max_in_flight": 2},
            ValueError,
            r"^max_in_flight must be >= 4, got 2$",
        ),
        ({"interval": 0}, ValueError, r"^interval must be > 0 and finite, got 0$"),
        ({"interval": -0.1}, ValueError, r"^interval must be > 0 and finite, got -0\.1$"),
        ({"interval": math.inf}, ValueError, r"^interval must be > 0 and finite, got inf$"),
        ({"interval": 10**400}, ValueError, r"^interval must be > 0 and finite, got 10{400}$"),
        ({"interval": "1"}, TypeError, r"^interval must be a number of seconds, got '1'$"),
        ({"tolerance": 0.5}, ValueError, r"^tolerance must be >= 1\.0, got 0\.5$"),
        ({"tolerance": math.nan}, ValueError, r"^tolerance must be a finite number, got nan$"),
        ({"tolerance": 10**400}, ValueError, r"^tolerance must be a finite number, got 10{400}$"),
        ({"tolerance": "2"}, TypeError, r"^tolerance must be a finite number, got '2'$"),
        ({"tolerance": True}, TypeError, r"^tolerance must be a finite number, got True$"),
        ({"saturated_at": 2}, ValueError, r"^saturated_at must be <= 1, got 2$"),
        ({"saturated_at": -0.5}, ValueError, r"^saturated_at must be >= 0\.0, got -0\.5$"),
        (
            {"saturated_at": math.inf},
            ValueError,
            r"^saturated_at must be a finite number, got inf$",
        ),
    ],
)
async def test_bad_arguments(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    batch_fn, _ = downstream(capacity=1)
    async with mcs.open_batcher(batch_fn) as batcher:
        with pytest.raises(error, match=message):
            await mcs.autoscale(batcher, **options)  # type: ignore[arg-type]


async def test_rejects_a_non_batcher() -> None:
    with pytest.raises(TypeError, match=r"^batcher must be a mcs\.Batcher, got 3$"):
        await mcs.autoscale(3)  # type: ignore[arg-type]
