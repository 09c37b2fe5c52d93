"""Limits shared across processes and hosts, kept on a Redis server (extra ``mcs[redis]``).

Every limit of a batcher is per process: N worker processes with ``RateLimit(100)`` send up to
100·N calls a second. Here the budget lives in Redis, and every process draws from it::

    async with mcs.redis.open_shared_rate(url, "search-api", mcs.RateLimit(100, burst=5)) as rate:
        async with mcs.open_batcher(search, rate=rate) as batcher:
            ...

- :func:`open_shared_rate`: GCRA in one Lua script on the server's clock, reserve-then-wait,
  one round trip per *batch* (never per item); exact in integer microseconds.
- :func:`open_shared_in_flight`: a budget of concurrent batch_fn calls, held as leases that
  expire (``lease`` seconds, renewed while held), so the slots of a crashed process come back.

When Redis is down, slow or gone mid-run, every Redis operation ends within ``timeout`` and
``on_unavailable`` decides: ``"fail"`` (the default) gives the callers of the batch that needed
Redis a :exc:`trio.BrokenResourceError` naming the batcher and the Redis limit (nothing hangs,
nothing else is lost); ``"local"`` falls back to this process's share of the budget (the budget
divided by ``processes``) and tries Redis again every second. :attr:`RedisRate.available` and
:attr:`RedisRate.failures` (and the same on :class:`RedisInFlight`) make it visible.

The scripts and the reasoning behind their arithmetic are in ``mcs/_redis_scripts.py``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from fractions import Fraction
from typing import Any, Literal, TypeVar, cast

import trio

from . import _redis_scripts as scripts
from ._limits import SharedInFlight, SharedRate
from ._log import resource_available, resource_unavailable
from ._rate import RateLimit, _Gcra
from ._util import check_int, check_seconds

try:
    import coredis
except ImportError as _missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mcs.redis needs coredis: pip install 'trio-mcs[redis]'", name=_missing.name
    ) from _missing

__all__ = ["RedisInFlight", "RedisRate", "open_shared_in_flight", "open_shared_rate"]

_T = TypeVar("_T")

_RETRY_AFTER = 1.0  # seconds on the local fallback before trying Redis again
_POLL = 0.05  # longest wait between two tries for a slot held in another process


def _check_common(
    url: object, key: object, on_unavailable: object, processes: object, timeout: object
) -> float:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {url!r}")
    if not isinstance(key, str) or not key:
        raise TypeError(f"key must be a non-empty str, got {key!r}")
    if on_unavailable not in ("fail", "local"):
        raise ValueError(f"on_unavailable must be 'fail' or 'local', got {on_unavailable!r}")
    if processes is None:
        if on_unavailable == "local":
            raise ValueError(
                "on_unavailable='local' needs processes=, the number of processes that share "
                "the limit, got processes=None"
            )
    else:
        check_int("processes", processes, 1)
    return check_seconds("timeout", timeout, positive=True)


class _Store:
    """One limit's Redis client: every operation bounded in time, failures told apart."""

    __slots__ = ("available", "client", "failures", "name", "retry_at", "timeout")

    def __init__(self, client: Any, name: str, timeout: float) -> None:
        self.client = client
        self.name = name  # e.g. "shared rate limit 'api' on Redis at redis://..."
        self.timeout = timeout
        self.available = True
        self.failures = 0
        self.retry_at = -math.inf  # on the local fallback: when to try Redis again

    def script(self, source: str) -> Callable[..., Awaitable[Any]]:
        return self.client.register_script(source)  # type: ignore[no-any-return]

    async def run(self, operation: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        """Run one Redis operation to its end (shielded: a booking is never half made), within
        ``timeout``.

        Raises:
            trio.BrokenResourceError: Redis refused, failed or did not answer in time.
        """
        cause: BaseException | None = None
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.timeout):
                try:
                    result = await operation(*args, **kwargs)
                except Exception as exc:  # refused, reset, a protocol error: all "unavailable"
                    cause = exc
                else:
                    if not self.available:
                        resource_available(self.name)  # logged on the transition only
                    self.available = True
                    return result
        problem = f"{cause!r}" if cause is not None else f"no answer within {self.timeout} s"
        if self.available:
            resource_unavailable(self.name, problem, "batches follow on_unavailable meanwhile")
        self.available = False
        self.failures += 1
        self.retry_at = trio.current_time() + _RETRY_AFTER
        error = trio.BrokenResourceError(f"the {self.name} is unavailable: {problem}")
        raise error from cause

    def use_redis(self) -> bool:
        """False while on the local fallback and not yet time to retry Redis."""
        return self.available or trio.current_time() >= self.retry_at


class _OnRedis:
    """What a shared limit on Redis tells of its server's health."""

    _store: _Store

    @property
    def available(self) -> bool:
        """False after a Redis operation failed, until one succeeds again."""
        return self._store.available

    @property
    def failures(self) -> int:
        """How many Redis operations failed or timed out so far."""
        return self._store.failures


class RedisRate(_OnRedis, SharedRate):
    """A :class:`mcs.RateLimit` shared through Redis; made by :func:`open_shared_rate`.

    Attributes:
        key: the Redis key that holds the limit's state (``mcs:rate:<key>``).
    """

    def __init__(
        self,
        store: _Store,
        key: str,
        limit: RateLimit,
        on_unavailable: Literal["fail", "local"],
        processes: int | None,
    ) -> None:
        self._store = store
        self.key = key
        self._limit = limit
        self._fallback = on_unavailable == "local"
        self._script = store.script(scripts.RESERVE)
        # T in microseconds, t_us + t_num / t_den exactly, or rounded up to a picosecond.
        interval = Fraction(limit.per) * 10**6 / Fraction(limit.count)
        whole = math.floor(interval)
        fraction = interval - whole
        if fraction.denominator > 10**6:
            fraction = Fraction(math.ceil(fraction * 10**6), 10**6)
        if (whole + 1) * limit.burst >= 2**50:
            raise ValueError(f"limit's interval per / count is too long for Redis, got {limit!r}")
        self._args = (whole, fraction.numerator, fraction.denominator, limit.burst)
        local = None
        if processes is not None:
            share = Fraction(limit.count) / processes
            local = RateLimit(
                cast(float, share), limit.per, max(1, limit.burst // processes), limit.unit
            )
        self._local = _Gcra(local) if local is not None else None

    @property
    def limit(self) -> RateLimit:
        """The shared budget, summed over every process."""
        return self._limit

    async def reserve(self, units: int) -> float:
        store = self._store
        if not self._fallback or store.use_redis():
            book = [units, *self._args]
            try:
                wait_us = int(await store.run(self._script, keys=[self.key], args=book))
            except trio.BrokenResourceError:
                if not self._fallback:
                    raise
            else:
                # Never a hair early: the float of a whole number of microseconds, rounded up.
                return math.nextafter(wait_us / 1e6, math.inf) if wait_us > 0 else 0.0
        await trio.lowlevel.checkpoint()
        assert self._local is not None
        now = trio.current_time()
        ready = self._local.ready_at(units, now)
        self._local.take(units, ready)
        return ready - now

    def __repr__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"<mcs.redis.RedisRate {self.key!r} {self._limit!r} ({state})>"


class _LocalSlot:
    """A slot taken on the local fallback, not in Redis."""

    __slots__ = ()


class RedisInFlight(_OnRedis, SharedInFlight):
    """A budget of concurrent batch_fn calls shared through Redis leases; made by
    :func:`open_shared_in_flight`.

    Attributes:
        key: the Redis key of the sorted set of leases (``mcs:in_flight:<key>``).
        lease: seconds a slot stays taken if its holder stops renewing it (crashes).
        lost: leases this process held that had expired when it came to renew them (the
            process was paused for longer than ``lease``, or Redis lost its data); their slots
            may have gone to others meanwhile.
    """

    def __init__(
        self,
        store: _Store,
        key: str,
        total: int,
        lease: float,
        on_unavailable: Literal["fail", "local"],
        processes: int | None,
    ) -> None:
        self._store = store
        self.key = key
        self._total = total
        self.lease = lease
        self._fallback = on_unavailable == "local"
        self._acquire = store.script(scripts.ACQUIRE)
        self._renew = store.script(scripts.RENEW)
        self._prefix = uuid.uuid4().hex
        self._next = 0
        self._held: set[str] = set()  # lease ids this process holds in Redis
        self._to_release: list[str] = []
        self._released = trio.Event()  # set when slots were given back; then replaced
        self._release_wanted = trio.Event()
        share = max(1, total // processes) if processes is not None else 1
        self._local = trio.CapacityLimiter(share)
        self.lost = 0  # leases found expired when renewed

    @property
    def total(self) -> int:
        """The shared budget, summed over every process."""
        return self._total

    async def acquire(self) -> object:
        store = self._store
        while True:
            if self._fallback and not store.use_redis():
                slot = _LocalSlot()
                with trio.move_on_at(store.retry_at):
                    await self._local.acquire_on_behalf_of(slot)
                    return slot
                continue
            lease_id = f"{self._prefix}:{self._next}"
            self._next += 1
            args = [self._total, round(self.lease * 1e6), lease_id]
            try:
                granted, wait_us = await store.run(self._acquire, keys=[self.key], args=args)
            except trio.BrokenResourceError:
                if not self._fallback:
                    raise
                continue
            if granted:
                self._held.add(lease_id)
                return lease_id
            # Full: try again when a slot of ours is given back, the earliest lease expires,
            # or after a short poll for slots given back by other processes.
            with trio.move_on_after(min(max(int(wait_us), 0) / 1e6, _POLL)):
                await self._released.wait()

    def release(self, token: object) -> None:
        if isinstance(token, _LocalSlot):
            self._local.release_on_behalf_of(token)
            return
        assert isinstance(token, str)
        self._held.discard(token)
        self._to_release.append(token)
        self._release_wanted.set()

    async def _give_back(self) -> None:
        """Return released leases to Redis, all that piled up in one round trip."""
        while True:
            await self._release_wanted.wait()
            self._release_wanted = trio.Event()
            lease_ids, self._to_release = self._to_release, []
            try:
                await self._store.run(self._store.client.zrem, self.key, lease_ids)
            except trio.BrokenResourceError:
                pass  # the leases expire on their own within `lease`
            self._released.set()
            self._released = trio.Event()

    async def _keep_alive(self) -> None:
        """Renew held leases three times per lease period, in one round trip."""
        while True:
            await trio.sleep(self.lease / 3)
            if not self._held:
                continue
            lease_ids = sorted(self._held)
            args = [round(self.lease * 1e6), *lease_ids]
            try:
                missing = await self._store.run(self._renew, keys=[self.key], args=args)
            except trio.BrokenResourceError:
                continue
            for lease_id in missing:  # counted once: no longer ours to renew or give back
                lease_id = lease_id.decode() if isinstance(lease_id, bytes) else lease_id
                if lease_id in self._held:
                    self._held.discard(lease_id)
                    self.lost += 1

    async def _close(self) -> None:
        lease_ids = sorted(self._held) + self._to_release
        if not lease_ids:
            return
        try:
            await self._store.run(self._store.client.zrem, self.key, lease_ids)
        except trio.BrokenResourceError:
            pass  # they expire within `lease`

    def __repr__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"<mcs.redis.RedisInFlight {self.key!r} total={self._total} ({state})>"


def _client(url: str, timeout: float) -> Any:
    return coredis.Redis.from_url(url, connect_timeout=timeout, stream_timeout=timeout)


@asynccontextmanager
async def open_shared_rate(
    url: str,
    key: str,
    limit: RateLimit,
    *,
    on_unavailable: Literal["fail", "local"] = "fail",
    processes: int | None = None,
    timeout: float = 0.5,  # noqa: ASYNC109 (bounds each Redis operation, not the block)
) -> AsyncIterator[RedisRate]:
    """A rate limit shared by every process that opens it with the same Redis ``url`` and
    ``key``; pass the result as ``rate=`` to :func:`mcs.open_batcher` (any number of batchers).

    Args:
        url: the Redis server, e.g. ``"redis://127.0.0.1:6379/0"``.
        key: names the limit; the state is kept under ``mcs:rate:<key>``.
        limit: the budget of all processes together. ``unit="item"`` books a batch's item
            count and caps batches at ``limit.burst`` items.
        on_unavailable: ``"fail"``: when Redis cannot be reached (or does not answer within
            ``timeout``), the callers of the batch that needed it get
            :exc:`trio.BrokenResourceError`. ``"local"``: the process falls back to a local
            limit of ``count / processes`` (burst ``burst // processes``, at least 1) and tries
            Redis again every second.
        processes: how many processes share the limit; required with ``"local"``.
        timeout: seconds any Redis operation may take before it counts as unavailable.

    Redis need not be up when the block is entered.

    Raises:
        TypeError, ValueError: at once, for a bad argument; the message names it.
    """
    timeout = _check_common(url, key, on_unavailable, processes, timeout)
    if not isinstance(limit, RateLimit):
        raise TypeError(f"limit must be a mcs.RateLimit, got {limit!r}")
    async with _client(url, timeout) as client:
        store = _Store(client, f"shared rate limit {key!r} on Redis at {url}", timeout)
        yield RedisRate(store, f"mcs:rate:{key}", limit, on_unavailable, processes)


@asynccontextmanager
async def open_shared_in_flight(
    url: str,
    key: str,
    max_in_flight: int,
    *,
    lease: float = 10.0,
    on_unavailable: Literal["fail", "local"] = "fail",
    processes: int | None = None,
    timeout: float = 0.5,  # noqa: ASYNC109 (bounds each Redis operation, not the block)
) -> AsyncIterator[RedisInFlight]:
    """A budget of ``max_in_flight`` concurrent batch_fn calls shared by every process that
    opens it with the same Redis ``url`` and ``key``; pass the result as ``max_in_flight=`` to
    :func:`mcs.open_batcher` (any number of batchers).

    Each running batch holds a lease in Redis, renewed every ``lease / 3`` seconds while it
    runs. If the process dies, its leases expire within ``lease`` seconds and the slots come
    back. A batcher waiting for a slot held elsewhere tries again when the earliest lease
    expires, and at least every 50 ms.

    Args:
        url: the Redis server, e.g. ``"redis://127.0.0.1:6379/0"``.
        key: names the budget; the leases are kept under ``mcs:in_flight:<key>``.
        max_in_flight: the budget of all processes together.
        lease: seconds a slot stays taken when its holder stops renewing it.
        on_unavailable: ``"fail"`` or ``"local"`` (a local budget of
            ``max_in_flight // processes``, at least 1), as for :func:`open_shared_rate`.
        processes: how many processes share the budget; required with ``"local"``.
        timeout: seconds any Redis operation may take before it counts as unavailable.

    On exit, the leases still held are given back.

    Raises:
        TypeError, ValueError: at once, for a bad argument; the message names it.
    """
    timeout = _check_common(url, key, on_unavailable, processes, timeout)
    check_int("max_in_flight", max_in_flight, 1)
    lease = check_seconds("lease", lease, positive=True)
    if lease <= timeout:
        raise ValueError(f"lease must be longer than timeout={timeout}, got {lease!r}")
    async with _client(url, timeout) as client:
        store = _Store(client, f"shared in-flight limit {key!r} on Redis at {url}", timeout)
        slots = RedisInFlight(
            store, f"mcs:in_flight:{key}", max_in_flight, lease, on_unavailable, processes
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slots._give_back)
            nursery.start_soon(slots._keep_alive)
            try:
                yield slots
            finally:
                nursery.cancel_scope.cancel()
                await slots._close()
