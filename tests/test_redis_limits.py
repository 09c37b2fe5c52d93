"""mcs.redis against a real redis-server: shared rate and in-flight limits across processes,
their arithmetic, and what happens when Redis is down, stopped or hung.

These tests use real time (a real server and real processes); each is bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, redis_server

import mcs
import mcs.prometheus
import mcs.redis

__all__ = ["redis_server"]  # the fixture, imported for the tests below

# coredis 6.9 drops a connection's anyio memory streams unclosed when connecting fails (Redis
# down): a ResourceWarning when they are collected, from coredis, not from mcs.
_COREDIS_LEAK = "Unclosed <MemoryObject(Send|Receive)Stream"
pytestmark = pytest.mark.filterwarnings(f"ignore:{_COREDIS_LEAK}:ResourceWarning")


@pytest.fixture(autouse=True)
def _collect_coredis_leaks() -> Iterator[None]:
    yield
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _COREDIS_LEAK, ResourceWarning)
        gc.collect()


WORKER = Path(__file__).with_name("redis_worker.py")


def start_worker(url: str, kind: str, duration: float) -> subprocess.Popen[str]:
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), url, kind, str(duration)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    assert json.loads(worker.stdout.readline()) == "ready"  # imported, connected, open
    return worker


def run_workers(url: str, kind: str, count: int, duration: float) -> list[dict[str, Any]]:
    workers = [start_worker(url, kind, duration) for _ in range(count)]
    start_at = time.time() + 0.2
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(f"{start_at}\n")
        worker.stdin.flush()
    outputs = [worker.communicate(timeout=duration + 60)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * count
    return [json.loads(output) for output in outputs]


# ---------------------------------------------------------------- across processes


def test_four_processes_share_one_rate_limit(redis_server: RedisServer) -> None:
    rate = mcs.RateLimit(100, per=1, burst=5)
    duration = 5.0
    workers = run_workers(redis_server.url, "rate", 4, duration)
    starts = sorted(start for worker in workers for start, _ in worker["calls"])
    # Over every window [a, b] of batch_fn starts (wall clock, which Redis's TIME also reads:
    # one host, no skew allowance), calls <= burst + 100 (b - a + L). The limit holds exactly
    # for the moments Redis lets batches go; a call starts a little after its moment (a timer
    # wake-up, a scheduler pass), so a window that opens on a late call and closes on a
    # punctual one looks that much shorter. L is that lateness: at most the worst timer
    # lateness the workers measured in themselves during the run (0-5 ms on a quiet 2-core
    # host, tens of ms when it is overloaded), plus 2 ms for the scheduler passes.
    lateness = needed_lateness(starts, rate)
    stall = max(worker["stall"] for worker in workers)
    assert lateness <= stall + 0.002, (lateness, stall)
    # Together they use the budget: >= 90% of 100 calls a second over the run.
    assert len(starts) >= 0.9 * rate.count * duration
    assert all(worker["calls"] for worker in workers)  # nobody starved


def needed_lateness(starts: Sequence[float], rate: mcs.RateLimit) -> float:
    """The smallest ``L`` with ``calls <= burst + count * (b - a + L) / per`` on every window
    ``[a, b]`` whose ends are starts (the worst windows), exactly."""
    interval = Fraction(rate.per) / Fraction(rate.count)
    exact = [Fraction(start) for start in starts]
    worst = Fraction(0)
    for i, first in enumerate(exact):
        for j in range(i + rate.burst, len(exact)):  # windows of more than `burst` calls
            calls = j - i + 1
            worst = max(worst, (calls - rate.burst) * interval - (exact[j] - first))
    return float(worst)


def test_four_processes_never_exceed_a_shared_in_flight_budget(
    redis_server: RedisServer,
) -> None:
    workers = run_workers(redis_server.url, "in_flight", 4, 3.0)
    per_worker = [worker["calls"] for worker in workers]
    events = sorted(
        (moment, change)
        for calls in per_worker
        for start, end in calls
        for moment, change in ((start, 1), (end, -1))
    )  # an end sorts before a start at the same moment
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 3  # used to the full, never above
    assert running == 0
    # The budget is used: slot-seconds busy over 3 slots for the run (0.86-0.88 measured).
    span = events[-1][0] - events[0][0]
    busy = sum(end - start for calls in per_worker for start, end in calls)
    assert busy / (3 * span) >= 0.6
    assert all(per_worker)  # every process got slots


async def test_a_killed_process_slots_come_back_within_the_lease(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(30):
        worker = await trio.to_thread.run_sync(
            start_worker, redis_server.url, "hold", 60.0, abandon_on_cancel=True
        )
    try:
        assert worker.stdin is not None
        assert worker.stdout is not None
        worker.stdin.write(f"{time.time()}\n")
        worker.stdin.flush()
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(worker.stdout.readline, abandon_on_cancel=True)
        assert json.loads(line) == "held"
        assert redis_server.command("ZCARD", "mcs:in_flight:workers") == b":3\r\n"
        os.kill(worker.pid, signal.SIGKILL)
        killed = trio.current_time()
    finally:
        worker.kill()
        worker.communicate()  # reaps it and closes its pipes
    async with mcs.redis.open_shared_in_flight(redis_server.url, "workers", 3, lease=2.0) as slots:
        with trio.fail_after(10):
            token = await slots.acquire()
        waited = trio.current_time() - killed
        slots.release(token)
    # Not before the lease the dead worker last renewed ran out (renewed every 2/3 s), and
    # not much after it.
    assert 2.0 - 2.0 / 3 - 0.1 <= waited <= 2.0 + 0.5


async def test_held_leases_are_renewed_and_a_lost_one_is_counted(
    redis_server: RedisServer,
) -> None:
    async with mcs.redis.open_shared_in_flight(redis_server.url, "renew", 2, lease=0.9) as slots:
        with trio.fail_after(10):
            token = await slots.acquire()
            await trio.sleep(1.5)  # past the lease: only renewals (every 0.3 s) keep it
            assert redis_server.command("ZCARD", "mcs:in_flight:renew") == b":1\r\n"
            assert slots.lost == 0
            redis_server.command("FLUSHALL")  # Redis forgets the lease
            await trio.sleep(0.5)
            assert slots.lost == 1
            slots.release(token)
            await trio.sleep(0.1)
    assert redis_server.command("EXISTS", "mcs:in_flight:renew") == b":0\r\n"


# ---------------------------------------------------------------- the arithmetic


async def test_reservations_add_up_exactly_in_microseconds(redis_server: RedisServer) -> None:
    # T = 1/3 s = 333333 + 1/3 µs: three reservations advance the TAT by exactly 1 s.
    async with mcs.redis.open_shared_rate(
        redis_server.url, "thirds", mcs.RateLimit(3, per=1, burst=10)
    ) as rate:
        with trio.fail_after(5):
            assert await rate.reserve(1) == 0.0  # within the burst: no wait
            first = state(redis_server, "mcs:rate:thirds")
            for _ in range(3):
                await rate.reserve(1)
        last = state(redis_server, "mcs:rate:thirds")
    assert first[1:] == [1, 3]
    assert last == [first[0] + 1_000_000, 1, 3]


async def test_sub_millisecond_intervals_are_not_truncated(redis_server: RedisServer) -> None:
    # 4000 a second: T = 250 µs (redis-cell #50 truncated such intervals to whole ms).
    async with mcs.redis.open_shared_rate(
        redis_server.url, "fast", mcs.RateLimit(4000, per=1, burst=1000)
    ) as rate:
        with trio.fail_after(5):
            await rate.reserve(1000)  # the TAT is now 250 ms ahead, and keeps its state
            first = state(redis_server, "mcs:rate:fast")
            await rate.reserve(7)
        last = state(redis_server, "mcs:rate:fast")
    assert last[0] - first[0] == 7 * 250


async def test_the_wait_is_rounded_up_and_counts_the_whole_batch(
    redis_server: RedisServer,
) -> None:
    # burst 1 of T = 1/3 s: right after a first unit, the next may start 333333.33 µs after
    # the first; the wait says at least that, rounded up to the microsecond.
    async with mcs.redis.open_shared_rate(
        redis_server.url, "round", mcs.RateLimit(3, per=1, burst=1)
    ) as rate:
        with trio.fail_after(5):
            before = time.time()
            await rate.reserve(1)
            wait = await rate.reserve(1)
            after = time.time()
    assert 1 / 3 - (after - before) <= wait <= 1 / 3 + 1e-6


def state(server: RedisServer, key: str) -> list[int]:
    reply = server.command("HMGET", key, "tat", "rem", "den").decode().split("\r\n")
    return [int(reply[i]) for i in (2, 4, 6)]


# ---------------------------------------------------------------- Redis unavailable


async def echo(items: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return items


async def call_all(batcher: mcs.Batcher[int, int], items: range) -> dict[int, Any]:
    outcomes: dict[int, Any] = {}

    async def one(item: int) -> None:
        try:
            outcomes[item] = await batcher(item)
        except Exception as exc:
            outcomes[item] = exc

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(one, item)
    return outcomes


@pytest.mark.parametrize("kind", ["rate", "in_flight"])
async def test_redis_down_at_start_fails_the_callers_clearly(
    redis_server: RedisServer, kind: str
) -> None:
    redis_server.stop()
    with trio.fail_after(10):
        async with (
            open_limit(redis_server.url, kind, "fail") as limit,
            mcs.open_batcher(echo, name="users", max_batch_size=5, **limit) as batcher,
        ):
            outcomes = await call_all(batcher, range(12))
    assert sorted(outcomes) == list(range(12))
    for outcome in outcomes.values():
        assert isinstance(outcome, trio.BrokenResourceError)
        assert str(outcome).startswith(f"batcher 'users': the shared {LIMIT_NAMES[kind]} 'k' ")
        assert f"on Redis at {redis_server.url} is unavailable" in str(outcome)
    stats = batcher.statistics()
    assert stats.limit_errors == 3  # one per batch that needed Redis
    assert stats.batches == 0
    assert not next(iter(limit.values())).available


@pytest.mark.parametrize("kind", ["rate", "in_flight"])
async def test_redis_down_at_start_with_local_fallback_serves_everyone(
    redis_server: RedisServer, kind: str
) -> None:
    redis_server.stop()
    with trio.fail_after(10):
        async with (
            open_limit(redis_server.url, kind, "local") as limit,
            mcs.open_batcher(echo, max_batch_size=5, **limit) as batcher,
        ):
            outcomes = await call_all(batcher, range(12))
            shared = next(iter(limit.values()))
            assert not shared.available
            assert shared.failures >= 1
    assert outcomes == {i: i for i in range(12)}


@pytest.mark.parametrize("on_unavailable", ["fail", "local"])
@pytest.mark.parametrize("kind", ["rate", "in_flight"])
async def test_redis_stopped_mid_run_loses_nothing_and_comes_back(
    redis_server: RedisServer, kind: str, on_unavailable: str
) -> None:
    with trio.fail_after(20):
        async with (
            open_limit(redis_server.url, kind, on_unavailable) as limit,
            mcs.open_batcher(echo, max_batch_size=5, **limit) as batcher,
        ):
            shared = next(iter(limit.values()))
            assert await call_all(batcher, range(10)) == {i: i for i in range(10)}
            assert shared.available
            redis_server.stop()
            during = await call_all(batcher, range(10, 20))
            assert not shared.available
            redis_server.start()
            await trio.sleep(1.1)  # the local fallback tries Redis again after a second
            after = await call_all(batcher, range(20, 30))
            assert shared.available
    assert sorted(during) == list(range(10, 20))
    if on_unavailable == "local":
        assert during == {i: i for i in range(10, 20)}
    else:
        assert all(isinstance(o, trio.BrokenResourceError) for o in during.values())
    assert after == {i: i for i in range(20, 30)}


@pytest.mark.parametrize("kind", ["rate", "in_flight"])
async def test_prometheus_shows_redis_going_away_and_coming_back(
    redis_server: RedisServer, kind: str
) -> None:
    registry = CollectorRegistry()
    gauge = ("mcs_batcher_shared_limit_available", (("batcher", "users"), ("limit", kind)))

    def available() -> float:
        families = text_string_to_metric_families(generate_latest(registry).decode())
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
        }[gauge]

    with trio.fail_after(20):
        async with (
            open_limit(redis_server.url, kind, "local") as limit,
            mcs.open_batcher(echo, name="users", max_batch_size=5, **limit) as batcher,
        ):
            registry.register(mcs.prometheus.BatcherCollector([batcher]))
            await call_all(batcher, range(5))
            assert available() == 1
            redis_server.stop()
            await call_all(batcher, range(5, 10))
            assert available() == 0
            redis_server.start()
            await trio.sleep(1.1)  # the local fallback tries Redis again after a second
            await call_all(batcher, range(10, 15))
            assert available() == 1


@pytest.mark.parametrize("kind", ["rate", "in_flight"])
async def test_a_hung_redis_costs_one_timeout_per_batch_not_a_hang(
    redis_server: RedisServer, kind: str
) -> None:
    redis_server.pause()
    with trio.fail_after(10):
        async with (
            open_limit(redis_server.url, kind, "fail", timeout=0.2) as limit,
            mcs.open_batcher(echo, max_batch_size=10, **limit) as batcher,
        ):
            started = trio.current_time()
            outcomes = await call_all(batcher, range(10))
            took = trio.current_time() - started
    redis_server.resume()
    assert all(isinstance(o, trio.BrokenResourceError) for o in outcomes.values())
    assert "no answer within 0.2 s" in str(outcomes[0])
    assert 0.2 <= took < 2.0


LIMIT_NAMES = {"rate": "rate limit", "in_flight": "in-flight limit"}


def open_limit(url: str, kind: str, on_unavailable: Any, timeout: float = 0.5) -> Any:
    """A context manager whose value is the batcher keyword for a shared limit of ``kind``."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[dict[str, Any]]:
        if kind == "rate":
            async with mcs.redis.open_shared_rate(
                url,
                "k",
                mcs.RateLimit(1000, burst=10),
                on_unavailable=on_unavailable,
                processes=2,
                timeout=timeout,
            ) as rate:
                yield {"rate": rate}
        else:
            async with mcs.redis.open_shared_in_flight(
                url, "k", 4, on_unavailable=on_unavailable, processes=2, timeout=timeout
            ) as slots:
                yield {"max_in_flight": slots}

    return opened()


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"url": None}, TypeError, r"url must be a str, got None"),
        ({"key": ""}, TypeError, r"key must be a non-empty str, got ''"),
        ({"limit": 100}, TypeError, r"limit must be a mcs\.RateLimit, got 100"),
        (
            {"on_unavailable": "retry"},
            ValueError,
            r"on_unavailable must be 'fail' or 'local', got 'retry'",
        ),
        (
            {"on_unavailable": "local"},
            ValueError,
            r"on_unavailable='local' needs processes=, the number of processes that share the "
            r"limit, got processes=None",
        ),
        ({"processes": 0}, ValueError, r"processes must be >= 1, got 0"),
        ({"timeout": 0}, ValueError, r"timeout must be > 0 and finite, got 0"),
    ],
)
async def test_bad_shared_rate_arguments_are_refused_before_connecting(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    arguments: dict[str, Any] = {
        "url": "redis://127.0.0.1:1/0",
        "key": "k",
        "limit": mcs.RateLimit(10),
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=f"^{message}$"):
        async with mcs.redis.open_shared_rate(**arguments):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_in_flight": 0}, ValueError, r"max_in_flight must be >= 1, got 0"),
        ({"max_in_flight": 2.5}, TypeError, r"max_in_flight must be an int, got 2\.5"),
        ({"lease": -1}, ValueError, r"lease must be > 0 and finite, got -1"),
        (
            {"lease": 0.5, "timeout": 1.0},
            ValueError,
            r"lease must be longer than timeout=1\.0, got 0\.5",
        ),
    ],
)
async def test_bad_shared_in_flight_arguments_are_refused_before_connecting(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    arguments: dict[str, Any] = {"url": "redis://127.0.0.1:1/0", "key": "k", "max_in_flight": 2}
    arguments.update(kwargs)
    with pytest.raises(error, match=f"^{message}$"):
        async with mcs.redis.open_shared_in_flight(**arguments):
            pass  # pragma: no cover
