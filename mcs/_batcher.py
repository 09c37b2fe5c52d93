"""Batchers: the items of many concurrent callers, one downstream call.

The problem: thousands of live requests each need one row from the same database. Issued one by
one, those lookups dominate cost and latency; issued as one ``WHERE id IN (...)`` they are cheap.
A batcher sits in front of such a downstream, collects the items of all callers, calls the user's
``batch_fn`` once per batch, and hands each caller exactly its own result or error.

How, and what it costs. The obvious design (a memory channel in, a task and a ``trio.Event`` per
caller out) pays a channel hand-off, an event and often a task per item. Here a call costs one
small slotted record appended to a deque and one park of the caller's own task
(``wait_task_rescheduled``); the result is handed back with ``reschedule``. There is no task, no
cancel scope and no limiter token per item. One dispatcher task per batcher decides when a batch
leaves (a free in-flight slot, something queued, the optional ``max_wait`` fill, the rate limit)
and spawns one task per *batch* to run batch_fn, so per-item work is a few attribute writes.

Batching is opportunistic: when a slot is free, everything queued (up to ``max_batch_size``)
leaves at once, so a lone call is sent within a scheduler pass and batches grow by themselves
while all slots are busy.

Cancellation never disturbs other callers. Each caller owns its record: cancelled while queued,
the record is marked withdrawn (removed lazily, so withdrawal is O(1)) and never reaches
batch_fn; cancelled while its batch is in flight, the record is marked dropped and its result is
discarded when the batch returns. Graph nodes (see ``_node.py``) are records too: they receive
their result by callback instead of by waking a task, which is how a batched graph node costs no
task at all.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule
from trio.lowlevel import wait_task_rescheduled as _park

from ._exceptions import BatchResultError, Overloaded
from ._rate import RateLimit, _Gcra
from ._requests import (
    _DONE,
    _DROPPED,
    _IN_FLIGHT,
    _QUEUED,
    _ROOM,
    _WITHDRAWN,
    _Caller,
    _Request,
)
from ._stats import BatcherStatistics, _Samples, _Saturation

__all__ = ["BatchFn", "Batcher", "open_batcher"]

K = TypeVar("K")
V = TypeVar("V")

BatchFn: TypeAlias = Callable[
    [list[K]], Awaitable[Sequence[V | BaseException] | Mapping[K, V | BaseException]]
]
"""An async function from a list of items to their results, aligned or keyed by item."""

# What the parked dispatcher waits for, so that events wake it only when it can make progress.
_RUNNING: Final = 0
_FOR_SLOT: Final = 1
_FOR_ITEMS: Final = 2
_FOR_FILL: Final = 3
_FOR_RATE: Final = 4


def _is_async_callable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _describe(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or "batcher"


class Batcher(Generic[K, V]):
    """A stage that coalesces the items of concurrent callers into batched downstream calls.

    Create one with :func:`mcs.open_batcher`; share it between all requests; call it with one
    item to get that item's result::

        user = await users(42)

    Attributes:
        name: the name used in statistics, reprs and error messages.
    """

    __slots__ = (
        "__qualname__",
        "_batch_cap",
        "_batch_fn",
        "_batch_times",
        "_batches",
        "_busy_time",
        "_callers_served",
        "_clock",
        "_dead",
        "_dedupe",
        "_dispatcher",
        "_dropped",
        "_failed_batches",
        "_gcra",
        "_in_flight",
        "_intake_closed",
        "_items",
        "_max_in_flight",
        "_max_wait",
        "_nursery",
        "_peak_batch",
        "_queue",
        "_queue_size",
        "_queue_waits",
        "_queued",
        "_rate",
        "_rate_unit_items",
        "_rate_wait_time",
        "_rate_waits",
        "_reject",
        "_rejected",
        "_room",
        "_room_dead",
        "_room_waiting",
        "_saturation",
        "_waiting_for",
        "_withdrawn",
        "name",
    )

    def __init__(
        self,
        batch_fn: BatchFn[K, V],
        *,
        max_batch_size: int = 100,
        max_wait: float = 0.0,
        max_in_flight: int = 1,
        rate: RateLimit | None = None,
        queue_size: int | float = 10_000,
        overload: Literal["block", "reject"] = "block",
        dedupe: bool = False,
        name: str | None = None,
    ) -> None:
        if not callable(batch_fn) or not _is_async_callable(batch_fn):
            raise TypeError(f"batch_fn must be an async function, got {batch_fn!r}")
        _check_int("max_batch_size", max_batch_size, 1)
        if isinstance(max_wait, bool) or not isinstance(max_wait, int | float):
            raise TypeError(f"max_wait must be a number of seconds, got {max_wait!r}")
        if not (0 <= max_wait < math.inf):
            raise ValueError(f"max_wait must be >= 0 and finite, got {max_wait!r}")
        _check_int("max_in_flight", max_in_flight, 1)
        if rate is not None and not isinstance(rate, RateLimit):
            raise TypeError(f"rate must be a mcs.RateLimit or None, got {rate!r}")
        if queue_size != math.inf:
            _check_int("queue_size", queue_size, 1)
        if overload not in ("block", "reject"):
            raise ValueError(f"overload must be 'block' or 'reject', got {overload!r}")
        if not isinstance(dedupe, bool):
            raise TypeError(f"dedupe must be a bool, got {dedupe!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")

        self._batch_fn = batch_fn
        self.name: str = name if name is not None else _describe(batch_fn)
        # trio names a task after its function: `nursery.start_soon(batcher, item)` would
        # otherwise call repr() on every spawn.
        self.__qualname__ = f"Batcher({self.name})"
        self._max_wait = float(max_wait)
        self._max_in_flight = max_in_flight
        self._rate = rate
        self._gcra = _Gcra(rate) if rate is not None else None
        self._rate_unit_items = rate is not None and rate.unit == "item"
        # With an item-counted rate, one call may never carry more than the burst.
        self._batch_cap = max_batch_size
        if rate is not None and rate.unit == "item":
            self._batch_cap = min(max_batch_size, rate.burst)
        self._queue_size = queue_size
        self._reject = overload == "reject"
        self._dedupe = dedupe

        self._queue: deque[_Request[K, V]] = deque()
        self._queued = 0  # live records in _queue (withdrawn ones are removed lazily)
        self._dead = 0  # withdrawn records still sitting in _queue
        self._room: deque[_Request[K, V]] = deque()
        self._room_waiting = 0
        self._room_dead = 0
        self._in_flight = 0
        self._intake_closed = True  # until the batcher is started
        self._clock: trio.abc.Clock | None = None
        self._nursery: trio.Nursery | None = None
        self._dispatcher: Task | None = None  # set while the dispatcher is parked
        self._waiting_for = _RUNNING

        self._batches = 0
        self._busy_time = 0.0
        self._failed_batches = 0
        self._items = 0
        self._callers_served = 0
        self._peak_batch = 0
        self._rejected = 0
        self._withdrawn = 0
        self._dropped = 0
        self._rate_waits = 0
        self._rate_wait_time = 0.0
        self._queue_waits = _Samples()
        self._batch_times = _Samples()
        self._saturation: _Saturation | None = None

    # ------------------------------------------------------------------ public API

    async def __call__(self, item: K) -> V:
        """Send ``item`` through the batcher and return its own result.

        Raises:
            trio.ClosedResourceError: if the batcher is closed (or closes while this call waits
                for room in a full queue).
            trio.BrokenResourceError: if the batcher is shut down (its block raised or was
                cancelled) before the result arrived.
            mcs.Overloaded: if the queue is full and ``overload="reject"``.
            mcs.BatchResultError: if batch_fn's result has no well-formed entry for this item.
            Exception: the item's own error, or whatever batch_fn raised for its batch.
        """
        if self._intake_closed or (self._reject and self._queued >= self._queue_size):
            refusal = self._refusal()  # decided now, raised after the checkpoint
            await trio.lowlevel.checkpoint()  # a cancelled caller is cancelled, not refused
            if isinstance(refusal, Overloaded):
                self._rejected += 1
            raise refusal
        assert self._clock is not None
        request: _Caller[K, V] = _Caller(self, item, current_task(), self._clock.current_time())
        self._accept(request)
        await _park(request.abort)
        return request.unwrap()

    @property
    def max_in_flight(self) -> int:
        """How many batch_fn calls may run at once. Settable at any time: raising it lets
        queued batches leave at once; lowering it never cancels a running batch."""
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self._max_in_flight = _check_int("max_in_flight", value, 1)
        if self._saturation is not None:
            self._saturation.update(self._in_flight >= value, trio.current_time())
        if self._waiting_for == _FOR_SLOT and self._in_flight < value:
            self._wake_dispatcher()

    @property
    def rate(self) -> RateLimit | None:
        """The rate limit on downstream calls, if any."""
        return self._rate

    def statistics(self) -> BatcherStatistics:
        """A frozen snapshot of the batcher's counters; see :class:`mcs.BatcherStatistics`."""
        now = trio.current_time() if self._saturation is not None else 0.0
        return BatcherStatistics(
            name=self.name,
            queued=self._queued,
            waiting_for_room=self._room_waiting,
            in_flight=self._in_flight,
            max_in_flight=self._max_in_flight,
            batches=self._batches,
            items=self._items,
            callers_served=self._callers_served,
            mean_batch_size=self._items / self._batches if self._batches else 0.0,
            peak_batch_size=self._peak_batch,
            queue_wait=self._queue_waits.summary(),
            batch_time=self._batch_times.summary(),
            busy_time=self._busy_time,
            failed_batches=self._failed_batches,
            rejected=self._rejected,
            withdrawn=self._withdrawn,
            dropped=self._dropped,
            rate_limit_waits=self._rate_waits,
            rate_limit_wait_time=self._rate_wait_time,
            saturation=self._saturation.share(now) if self._saturation is not None else 0.0,
        )

    def __repr__(self) -> str:
        state = "closed" if self._intake_closed else "open"
        return (
            f"<mcs.Batcher {self.name!r} {state}: queued={self._queued} "
            f"in_flight={self._in_flight}/{self._max_in_flight}>"
        )

    # ------------------------------------------------------------------ intake (sync)

    def _refusal(self) -> Exception:
        """The error for a call that cannot be accepted now."""
        if self._clock is None:
            return RuntimeError(
                f"batcher {self.name!r} is not open: use 'async with mcs.open_batcher(...)'"
            )
        if self._intake_closed:
            return trio.ClosedResourceError(f"batcher {self.name!r} is closed")
        return Overloaded(f"batcher {self.name!r} is full ({self._queued} items queued)")

    def _submit_nowait(self, request: _Request[K, V]) -> None:
        """Accept a record without parking anyone (the graph's entry point).

        Raises the same errors as a call that is refused, synchronously.
        """
        if self._intake_closed or (self._reject and self._queued >= self._queue_size):
            refusal = self._refusal()
            if isinstance(refusal, Overloaded):
                self._rejected += 1
            raise refusal
        self._accept(request)

    def _accept(self, request: _Request[K, V]) -> None:
        if self._queued < self._queue_size and not self._room_waiting:
            request.state = _QUEUED
            self._queue.append(request)
            self._queued += 1
            waiting_for = self._waiting_for
            if waiting_for == _FOR_ITEMS or (
                waiting_for == _FOR_FILL and self._queued >= self._batch_cap
            ):
                self._wake_dispatcher()
        else:
            request.state = _ROOM
            self._room.append(request)
            self._room_waiting += 1

    def _withdraw(self, request: _Request[K, V]) -> None:
        """The caller of ``request`` went away (cancelled); O(1), nothing else is touched."""
        state = request.state
        if state == _QUEUED:
            request.state = _WITHDRAWN
            self._queued -= 1
            self._withdrawn += 1
            self._dead += 1
            if self._dead > 64 and self._dead > self._queued:
                self._queue = deque(r for r in self._queue if r.state == _QUEUED)
                self._dead = 0
            if self._room_waiting:
                self._admit_from_room()
                if self._waiting_for == _FOR_ITEMS:
                    self._wake_dispatcher()
        elif state == _ROOM:
            request.state = _WITHDRAWN
            self._room_waiting -= 1
            self._withdrawn += 1
            self._room_dead += 1
            if self._room_dead > 64 and self._room_dead > self._room_waiting:
                self._room = deque(r for r in self._room if r.state == _ROOM)
                self._room_dead = 0
        elif state == _IN_FLIGHT:
            request.state = _DROPPED
            self._dropped += 1

    def _take(self, limit: int, now: float) -> list[_Request[K, V]]:
        """Move up to ``limit`` live records from the queue into a new batch."""
        batch: list[_Request[K, V]] = []
        queue = self._queue
        while queue and len(batch) < limit:
            request = queue.popleft()
            if request.state == _QUEUED:
                request.state = _IN_FLIGHT
                batch.append(request)
            else:
                self._dead -= 1
        self._queued -= len(batch)
        self._queue_waits.extend([now - request.t0 for request in batch])
        if self._room_waiting:
            self._admit_from_room()
        return batch

    def _admit_from_room(self) -> None:
        """Room freed up: admit callers blocked on a full queue, oldest first."""
        room = self._room
        while room and self._queued < self._queue_size:
            request = room.popleft()
            if request.state == _ROOM:
                request.state = _QUEUED
                self._queue.append(request)
                self._queued += 1
                self._room_waiting -= 1
            else:
                self._room_dead -= 1

    def _oldest_queued(self) -> _Request[K, V]:
        queue = self._queue
        while queue[0].state != _QUEUED:
            queue.popleft()
            self._dead -= 1
        return queue[0]

    # ------------------------------------------------------------------ lifecycle

    def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._clock = trio.lowlevel.current_clock()
        self._intake_closed = False
        self._saturation = _Saturation(trio.current_time())
        nursery.start_soon(self._dispatch_loop, name=f"mcs.Batcher({self.name}).dispatcher")

    def _close_intake(self) -> None:
        """Stop accepting items; what is queued still drains."""
        self._intake_closed = True
        self._fail_room(
            trio.ClosedResourceError(f"batcher {self.name!r} closed before this item was accepted")
        )
        if self._waiting_for in (_FOR_ITEMS, _FOR_FILL):
            self._wake_dispatcher()

    def _abort(self) -> None:
        """The batcher's block failed or was cancelled: fail everything not yet in flight."""
        self._intake_closed = True
        error = trio.BrokenResourceError(
            f"batcher {self.name!r} was shut down before this item was processed"
        )
        self._fail_room(error)
        queue, self._queue = self._queue, deque()
        self._queued = self._dead = 0
        now = trio.current_time()
        for request in queue:
            if request.state == _QUEUED:
                request.state = _DONE
                request._deliver_error(error, None, now)

    def _fail_room(self, error: BaseException) -> None:
        room, self._room = self._room, deque()
        self._room_waiting = self._room_dead = 0
        now = trio.current_time()
        for request in room:
            if request.state == _ROOM:
                request.state = _DONE
                request._deliver_error(error, None, now)

    # ------------------------------------------------------------------ the dispatcher

    def _wake_dispatcher(self) -> None:
        task = self._dispatcher
        if task is not None:
            self._dispatcher = None
            self._waiting_for = _RUNNING
            reschedule(task)

    def _abort_park(self, _: RaiseCancelT) -> Abort:
        self._dispatcher = None
        self._waiting_for = _RUNNING
        return Abort.SUCCEEDED

    async def _park_dispatcher(self, waiting_for: int, deadline: float = math.inf) -> None:
        self._waiting_for = waiting_for
        self._dispatcher = current_task()
        if deadline == math.inf:
            await _park(self._abort_park)
        else:
            with trio.move_on_at(deadline):
                await _park(self._abort_park)

    async def _dispatch_loop(self) -> None:
        nursery = self._nursery
        assert nursery is not None
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            self._in_flight += 1
            self._batches += 1
            if self._in_flight >= self._max_in_flight:
                assert self._saturation is not None
                self._saturation.update(True, trio.current_time())
            nursery.start_soon(self._run_batch, batch)

    async def _next_batch(self) -> list[_Request[K, V]] | None:
        """Wait until a batch may leave, then take it; None once closed and drained."""
        waited_for_rate = False
        while True:
            if self._in_flight >= self._max_in_flight:
                await self._park_dispatcher(_FOR_SLOT)
                continue
            if not self._queued:
                if self._intake_closed:
                    return None
                await self._park_dispatcher(_FOR_ITEMS)
                continue
            now = trio.current_time()
            cap = self._batch_cap
            if self._max_wait and self._queued < cap and not self._intake_closed:
                deadline = self._oldest_queued().t0 + self._max_wait
                if now < deadline:
                    await self._park_dispatcher(_FOR_FILL, deadline)
                    continue
            gcra = self._gcra
            if gcra is not None:
                # Counting items, wait until the whole queued batch fits: under load the
                # downstream then sees full batches at the limited rate, not single items.
                units = min(self._queued, cap) if self._rate_unit_items else 1
                ready = gcra.ready_at(units, now)
                if ready > now:
                    if not waited_for_rate:  # one wait per batch, however often it re-waits
                        waited_for_rate = True
                        self._rate_waits += 1
                    await self._park_dispatcher(_FOR_RATE, ready)
                    self._rate_wait_time += trio.current_time() - now
                    continue
            batch = self._take(cap, now)
            if batch:
                if gcra is not None:
                    gcra.take(len(batch) if self._rate_unit_items else 1, now)
                return batch

    def _items_of(self, batch: list[_Request[K, V]]) -> tuple[list[K], list[int] | None]:
        """The items to send, and with ``dedupe`` each record's index into them."""
        if not self._dedupe:
            return [request.item for request in batch], None
        items: list[K] = []
        index: list[int] = []
        seen: dict[Any, int] = {}
        for request in batch:
            try:
                position = seen.setdefault(request.item, len(items))
            except TypeError:  # unhashable: cannot be shared, send it on its own
                position = len(items)
            if position == len(items):
                items.append(request.item)
            index.append(position)
        return items, index

    async def _run_batch(self, batch: list[_Request[K, V]]) -> None:
        if any(request.state != _IN_FLIGHT for request in batch):
            # Callers who left between the dispatcher taking the batch and this task starting:
            # their items have not reached batch_fn, so they count as withdrawn, not dropped.
            live = [request for request in batch if request.state == _IN_FLIGHT]
            self._dropped -= len(batch) - len(live)
            self._withdrawn += len(batch) - len(live)
            batch = live
            if not batch:  # nothing left to send: this was never a batch
                self._batches -= 1
                self._release_slot(trio.current_time())
                return
        items, index = self._items_of(batch)
        size = len(items)
        self._items += size
        if size > self._peak_batch:
            self._peak_batch = size
        started = trio.current_time()
        try:
            results = await self._batch_fn(items)
        except Exception as exc:
            self._failed_batches += 1
            self._fail_batch(batch, exc, exc.__traceback__, self._batch_done(started))
        except BaseException as exc:
            # Cancelled (the batcher is shutting down) or KeyboardInterrupt: the callers must
            # not hang, and must not receive a Cancelled that is not theirs.
            broken = trio.BrokenResourceError(
                f"batcher {self.name!r} was shut down while this item was in flight"
            )
            broken.__cause__ = exc
            self._fail_batch(batch, broken, None, self._batch_done(started))
            raise
        else:
            self._deliver(batch, items, index, results, self._batch_done(started))

    def _batch_done(self, started: float) -> float:
        """Free the batch's slot; returns the time, which is also each result's time."""
        now = trio.current_time()
        self._batch_times.add(now - started)
        self._busy_time += now - started
        self._release_slot(now)
        return now

    def _release_slot(self, now: float) -> None:
        was_saturated = self._in_flight >= self._max_in_flight
        self._in_flight -= 1
        if was_saturated:
            assert self._saturation is not None
            self._saturation.update(self._in_flight >= self._max_in_flight, now)
        if self._waiting_for == _FOR_SLOT:
            self._wake_dispatcher()

    def _fail_batch(
        self,
        batch: list[_Request[K, V]],
        error: BaseException,
        tb: TracebackType | None,
        now: float,
    ) -> None:
        for request in batch:
            if request.state == _IN_FLIGHT:
                request.state = _DONE
                self._callers_served += 1
                request._deliver_error(error, tb, now)

    def _deliver(
        self,
        batch: list[_Request[K, V]],
        items: list[K],
        index: list[int] | None,
        results: object,
        now: float,
    ) -> None:
        if isinstance(results, Mapping):
            for request in batch:
                if request.state == _IN_FLIGHT:
                    try:
                        value = results[request.item]
                    except (KeyError, TypeError):
                        value = BatchResultError(
                            f"batcher {self.name!r}: batch_fn's result has no entry for item "
                            f"{request.item!r}"
                        )
                    self._settle(request, value, now)
            return
        if not isinstance(results, Sequence) or isinstance(results, str | bytes):
            problem = f"must return a sequence or a mapping, got {type(results).__name__}"
        elif len(results) != len(items):
            problem = f"returned {len(results)} results for {len(items)} items"
        elif index is None:  # the hot path: the loop of _settle, inlined
            served = 0
            for request, value in zip(batch, results, strict=True):
                if request.state == _IN_FLIGHT:
                    request.state = _DONE
                    served += 1
                    if isinstance(value, BaseException):
                        request._deliver_error(value, value.__traceback__, now)
                    else:
                        request._deliver_value(value, now)
            self._callers_served += served
            return
        else:
            for request, position in zip(batch, index, strict=True):
                if request.state == _IN_FLIGHT:
                    self._settle(request, results[position], now)
            return
        self._fail_batch(
            batch, BatchResultError(f"batcher {self.name!r}: batch_fn {problem}"), None, now
        )

    def _settle(self, request: _Request[K, V], value: Any, now: float) -> None:
        request.state = _DONE
        self._callers_served += 1
        if isinstance(value, BaseException):
            request._deliver_error(value, value.__traceback__, now)
        else:
            request._deliver_value(value, now)


Batcher.__module__ = "mcs"


@asynccontextmanager
async def open_batcher(
    batch_fn: BatchFn[K, V],
    *,
    max_batch_size: int = 100,
    max_wait: float = 0.0,
    max_in_flight: int = 1,
    rate: RateLimit | None = None,
    queue_size: int | float = 10_000,
    overload: Literal["block", "reject"] = "block",
    dedupe: bool = False,
    name: str | None = None,
) -> AsyncIterator[Batcher[K, V]]:
    """Open a batcher in front of ``batch_fn`` for the duration of the block.

    ``batch_fn`` is an async function that takes a ``list`` of items and returns either a
    sequence of results aligned with them or a mapping from item to result. A result that is an
    exception instance is raised to that item's caller alone; if batch_fn raises, every caller
    of that batch gets the exception.

    Args:
        batch_fn: the downstream call.
        max_batch_size: the most items in one batch_fn call. 1 gives a plain worker pool.
        max_wait: seconds a dispatcher may wait after the oldest queued item for a batch to
            fill; 0 (the default) sends whatever is queued as soon as a slot is free.
        max_in_flight: how many batch_fn calls may run at once; settable later on the batcher.
        rate: a :class:`mcs.RateLimit` on batch_fn calls (or items), or None.
        queue_size: how many accepted items may wait for a batch (``math.inf`` for no bound).
        overload: what a call does when the queue is full: ``"block"`` waits for room,
            ``"reject"`` raises :exc:`mcs.Overloaded` at once and queues nothing.
        dedupe: send equal (hashable) items of one batch once and fan the result out.
        name: a name for statistics, reprs and errors; defaults to batch_fn's name.

    The block owns the batcher's tasks. On normal exit, intake stops (later calls raise
    :exc:`trio.ClosedResourceError`) and every accepted item is processed before the block
    ends. If the block raises or is cancelled, every caller still waiting gets
    :exc:`trio.BrokenResourceError` at once, running batches are cancelled, and the block's own
    exception propagates unchanged (never wrapped in an exception group: the batcher's tasks
    deliver batch_fn's errors to callers instead of raising them).

    Raises:
        TypeError, ValueError: at once, for a bad argument; the message names it.
    """
    batcher: Batcher[K, V] = Batcher(
        batch_fn,
        max_batch_size=max_batch_size,
        max_wait=max_wait,
        max_in_flight=max_in_flight,
        rate=rate,
        queue_size=queue_size,
        overload=overload,
        dedupe=dedupe,
        name=name,
    )
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        batcher._start(nursery)
        try:
            yield batcher
        except BaseException as exc:
            body_error = exc
            batcher._abort()
            nursery.cancel_scope.cancel()
        else:
            batcher._close_intake()
    if body_error is not None:
        try:
            raise body_error
        finally:
            del body_error
