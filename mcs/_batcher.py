"""Batchers: the items of many concurrent callers, one downstream call.

The problem: thousands of live requests each need one row from the same database. Issued one by
one, those lookups dominate cost and latency; issued as one ``WHERE id IN (...)`` they are cheap.
A batcher sits in front of such a downstream, collects the items of all callers, calls the user's
``batch_fn`` once per batch, and hands each caller exactly its own result or error.

How, and what it costs. The obvious design (a memory channel in, a task and a ``trio.Event`` per
caller out) pays a channel hand-off, an event and often a task per item. Here a call costs one
small slotted record appended to a deque (``_intake.py``) and one park of the caller's own task
(``_park.py``). There is no task, no cancel scope and no limiter token per item. One dispatcher
task per batcher asks :func:`mcs._dispatch.next_step` when a batch may leave and starts one task
per *batch* to run batch_fn; ``_split.py`` hands the results back.

Batches are cut after the scheduler pass. Before it takes a batch, the dispatcher yields once,
so that every task that runs in the same scheduler pass as the call that woke it (callers
started together, callers woken by the previous batch) gets its item into the same batch. That
is one extra pass per batch, never per item.

Cancellation never disturbs other callers. Each caller owns its record: cancelled while queued,
the record is marked withdrawn (removed lazily, so withdrawal is O(1)) and never reaches
batch_fn; cancelled while its batch is in flight, it is marked dropped and its result is
discarded. A batch all of whose callers left still runs to completion unless
``cancel_abandoned=True`` (safe for writes); ``batch_timeout`` bounds any batch. Abort callbacks
only mark records; the work a withdrawal implies (handing out room, compacting the queue,
cancelling an abandoned batch) is done by the dispatcher task.

Graph nodes (see ``_node.py``) are records too: they receive their result by callback instead of
by waking a task, which is how a batched graph node costs no task at all.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar

import trio
from trio.lowlevel import (
    Abort,
    RaiseCancelT,
    Task,
    cancel_shielded_checkpoint,
    current_task,
    enable_ki_protection,
)

from ._dispatch import Step, next_step
from ._exceptions import Overloaded
from ._intake import _Intake
from ._park import park, wake
from ._rate import RateLimit, _Gcra
from ._requests import _DROPPED, _IN_FLIGHT, _QUEUED, _ROOM, _Caller, _Request
from ._split import dedupe_items, deliver_error, deliver_results
from ._stats import BatcherStatistics, _Samples, _Saturation
from ._util import check_int, check_seconds, describe, is_async_callable

__all__ = ["BatchFn", "Batcher", "open_batcher"]

K = TypeVar("K")
V = TypeVar("V")

BatchFn: TypeAlias = Callable[
    [list[K]], Awaitable[Sequence[V | BaseException] | Mapping[K, V | BaseException]]
]
"""An async function from a list of items to their results, aligned or keyed by item."""

_RUNNING: Final = -1  # the dispatcher is not parked
_FOR_SLOT: Final = Step.FOR_SLOT
_FOR_ITEMS: Final = Step.FOR_ITEMS
_FOR_FILL: Final = Step.FOR_FILL
_SEND: Final = Step.SEND
_STOP: Final = Step.STOP


class _Batch:
    """One running batch_fn call: its records, and what nested calls and abandonment need."""

    __slots__ = ("batcher", "live", "nested_waits", "records", "running", "scope")

    def __init__(self, batcher: Batcher[Any, Any], records: list[_Request[Any, Any]]) -> None:
        self.batcher = batcher
        self.records = records
        self.live = len(records)  # callers that have not left
        self.scope: trio.CancelScope | None = None
        self.nested_waits = 0  # calls this batch's batch_fn is waiting for on its own batcher
        self.running = True


# The batch whose batch_fn the current task runs in (set in each batch task's own context).
_CURRENT_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "mcs.current_batch", default=None
)


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
        "_abandoned",
        "_batch_cap",
        "_batch_fn",
        "_batch_timeout",
        "_batch_times",
        "_batches",
        "_blocked",
        "_busy_time",
        "_callers_served",
        "_cancel_abandoned",
        "_cancelled_batches",
        "_clock",
        "_dedupe",
        "_dispatcher",
        "_dropped",
        "_failed_batches",
        "_gcra",
        "_in_flight",
        "_intake",
        "_intake_closed",
        "_items",
        "_max_in_flight",
        "_max_wait",
        "_nursery",
        "_peak_batch",
        "_queue_size",
        "_queue_waits",
        "_rate",
        "_rate_unit_items",
        "_rate_wait_time",
        "_rate_waits",
        "_reject",
        "_rejected",
        "_saturation",
        "_thread",
        "_timed_out_batches",
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
        batch_timeout: float | None = None,
        cancel_abandoned: bool = False,
        name: str | None = None,
    ) -> None:
        if not callable(batch_fn) or not is_async_callable(batch_fn):
            raise TypeError(f"batch_fn must be an async function, got {batch_fn!r}")
        check_int("max_batch_size", max_batch_size, 1)
        self._max_wait = check_seconds("max_wait", max_wait)
        check_int("max_in_flight", max_in_flight, 1)
        if rate is not None and not isinstance(rate, RateLimit):
            raise TypeError(f"rate must be a mcs.RateLimit or None, got {rate!r}")
        if queue_size != math.inf:
            check_int("queue_size", queue_size, 1)
        if overload not in ("block", "reject"):
            raise ValueError(f"overload must be 'block' or 'reject', got {overload!r}")
        if not isinstance(dedupe, bool):
            raise TypeError(f"dedupe must be a bool, got {dedupe!r}")
        self._batch_timeout = None
        if batch_timeout is not None:
            self._batch_timeout = check_seconds("batch_timeout", batch_timeout, positive=True)
        if not isinstance(cancel_abandoned, bool):
            raise TypeError(f"cancel_abandoned must be a bool, got {cancel_abandoned!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")

        self._batch_fn = batch_fn
        self.name: str = name if name is not None else describe(batch_fn, "batcher")
        # trio names a task after its function: `nursery.start_soon(batcher, item)` would
        # otherwise call repr() on every spawn.
        self.__qualname__ = f"Batcher({self.name})"
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
        self._cancel_abandoned = cancel_abandoned

        self._intake: _Intake[K, V] = _Intake(queue_size)
        self._in_flight = 0
        self._intake_closed = True  # until the batcher is started
        self._clock: trio.abc.Clock | None = None
        self._thread: int | None = None  # the thread of the trio run that owns the batcher
        self._nursery: trio.Nursery | None = None
        self._dispatcher: Task | None = None  # set while the dispatcher is parked
        self._waiting_for: int = _RUNNING
        self._abandoned: list[_Batch] = []  # batches to cancel (cancel_abandoned)
        self._blocked = 0  # running batches waiting for a call of their own to this batcher

        self._batches = 0
        self._busy_time = 0.0
        self._failed_batches = 0
        self._timed_out_batches = 0
        self._cancelled_batches = 0
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

    @enable_ki_protection
    async def __call__(self, item: K) -> V:
        """Send ``item`` through the batcher and return its own result.

        Raises:
            trio.ClosedResourceError: if the batcher is closed (or closes while this call waits
                for room in a full queue).
            trio.BrokenResourceError: if the batcher is shut down (its block raised or was
                cancelled) before the result arrived.
            trio.TooSlowError: if the item's batch ran longer than ``batch_timeout``.
            mcs.Overloaded: if the queue is full and ``overload="reject"``.
            mcs.BatchResultError: if batch_fn's result has no well-formed entry for this item.
            RuntimeError: if called from another trio run or thread than the batcher's, or from
                the batcher's own batch_fn when that would deadlock.
            Exception: the item's own error, or whatever batch_fn raised for its batch.
        """
        if (
            self._intake_closed
            or threading.get_ident() != self._thread
            or (self._reject and self._intake.queued >= self._queue_size)
        ):
            await self._refuse()
        if _CURRENT_BATCH.get() is not None:
            return await self._call_from_batch(item)
        assert self._clock is not None
        request: _Caller[K, V] = _Caller(self, item, current_task(), self._clock.current_time())
        self._accept(request)
        await park(request.abort)
        return request.unwrap()

    @property
    def max_in_flight(self) -> int:
        """How many batch_fn calls may run at once. Settable at any time: raising it lets
        queued batches leave at once; lowering it never cancels a running batch."""
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self._max_in_flight = check_int("max_in_flight", value, 1)
        if self._saturation is not None and self._clock is not None:
            self._saturation.update(self._in_flight >= value, self._clock.current_time())
        if self._waiting_for == _FOR_SLOT and self._in_flight < value:
            self._wake_dispatcher()

    @property
    def rate(self) -> RateLimit | None:
        """The rate limit on downstream calls, if any."""
        return self._rate

    def statistics(self) -> BatcherStatistics:
        """A frozen snapshot of the batcher's counters; see :class:`mcs.BatcherStatistics`.

        Cheap, and safe to call from any thread (a metrics exporter's) and after the run ended;
        read from another thread, the counters are each exact but may be a moment apart.
        """
        clock, saturation = self._clock, self._saturation
        share = 0.0
        if saturation is not None and clock is not None:
            share = saturation.share(clock.current_time())
        batches = self._batches
        items = self._items
        return BatcherStatistics(
            name=self.name,
            queued=self._intake.queued,
            waiting_for_room=self._intake.waiting_for_room,
            in_flight=self._in_flight,
            max_in_flight=self._max_in_flight,
            batches=batches,
            items=items,
            callers_served=self._callers_served,
            mean_batch_size=items / batches if batches else 0.0,
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
            saturation=share,
        )

    def __repr__(self) -> str:
        state = "closed" if self._intake_closed else "open"
        return (
            f"<mcs.Batcher {self.name!r} {state}: queued={self._intake.queued} "
            f"in_flight={self._in_flight}/{self._max_in_flight}>"
        )

    # ------------------------------------------------------------------ intake

    def _refusal(self) -> Exception:
        """The error for a call that cannot be accepted now."""
        if self._clock is None:
            return RuntimeError(
                f"batcher {self.name!r} is not open: use 'async with mcs.open_batcher(...)'"
            )
        if threading.get_ident() != self._thread:
            return RuntimeError(
                f"batcher {self.name!r} belongs to another trio run: a batcher can only be "
                "used from the run (and thread) that opened it"
            )
        if self._intake_closed:
            return trio.ClosedResourceError(f"batcher {self.name!r} is closed")
        return Overloaded(f"batcher {self.name!r} is full ({self._intake.queued} items queued)")

    async def _refuse(self) -> None:
        refusal = self._refusal()  # decided now, raised after the checkpoint
        try:
            if self._thread is None or threading.get_ident() == self._thread:
                await trio.lowlevel.checkpoint()  # a cancelled caller is cancelled, not refused
            if isinstance(refusal, Overloaded):
                self._rejected += 1
            raise refusal
        finally:
            del refusal  # no frame -> traceback -> frame cycle

    def _submit_nowait(self, request: _Request[K, V]) -> None:
        """Accept a record without parking anyone (the graph's entry point).

        Raises the same errors as a call that is refused, synchronously.
        """
        if (
            self._intake_closed
            or threading.get_ident() != self._thread
            or (self._reject and self._intake.queued >= self._queue_size)
        ):
            refusal = self._refusal()
            try:
                if isinstance(refusal, Overloaded):
                    self._rejected += 1
                raise refusal
            finally:
                del refusal
        assert self._clock is not None
        self._accept(request)

    def _accept(self, request: _Request[K, V]) -> None:
        if self._intake.accept(request):
            waiting_for = self._waiting_for
            if waiting_for == _FOR_ITEMS or (
                waiting_for == _FOR_FILL and self._intake.queued >= self._batch_cap
            ):
                self._wake_dispatcher()

    def _withdraw(self, request: _Request[K, V]) -> None:
        """The caller of ``request`` went away (cancelled): mark it, O(1); called from abort
        callbacks, so any work it implies is left to the dispatcher."""
        state = request.state
        if state == _QUEUED or state == _ROOM:
            self._intake.withdraw(request)
            self._withdrawn += 1
            if self._intake.needs_upkeep:
                self._wake_dispatcher()
        elif state == _IN_FLIGHT:
            request.state = _DROPPED
            self._dropped += 1
            batch = request.batch
            if batch is not None:
                batch.live -= 1
                if batch.live == 0 and batch.running:
                    self._abandoned.append(batch)
                    self._wake_dispatcher()

    async def _call_from_batch(self, item: K) -> V:
        """A call made from inside a batch_fn: fine, unless every in-flight slot is held by a
        batch waiting for such a call, which would wait forever."""
        batch = _CURRENT_BATCH.get()
        if batch is None or batch.batcher is not self or not batch.running:
            return await self._call_plain(item)
        if batch.nested_waits == 0:
            self._blocked += 1
        batch.nested_waits += 1
        try:
            if self._blocked >= self._in_flight >= self._max_in_flight:
                raise RuntimeError(
                    f"batcher {self.name!r}: batch_fn called its own batcher while all "
                    f"{self._max_in_flight} in-flight slots are held by batches waiting for such "
                    "calls; this would deadlock"
                )
            return await self._call_plain(item)
        finally:
            batch.nested_waits -= 1
            if batch.nested_waits == 0:
                self._blocked -= 1

    @enable_ki_protection
    async def _call_plain(self, item: K) -> V:
        assert self._clock is not None
        request: _Caller[K, V] = _Caller(self, item, current_task(), self._clock.current_time())
        self._accept(request)
        await park(request.abort)
        return request.unwrap()

    # ------------------------------------------------------------------ lifecycle

    def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._clock = trio.lowlevel.current_clock()
        self._thread = threading.get_ident()
        self._intake_closed = False
        self._saturation = _Saturation(self._clock.current_time())
        nursery.start_soon(self._dispatch_loop, name=f"mcs.Batcher({self.name}).dispatcher")

    @enable_ki_protection
    def _close_intake(self) -> None:
        """Stop accepting items; what is queued still drains."""
        self._intake_closed = True
        error = trio.ClosedResourceError(
            f"batcher {self.name!r} closed before this item was accepted"
        )
        self._fail_all(self._intake.clear_room(), error)
        if self._waiting_for in (_FOR_ITEMS, _FOR_FILL):
            self._wake_dispatcher()

    @enable_ki_protection
    def _abort(self) -> None:
        """The batcher's block failed or was cancelled: fail everything not yet in flight."""
        self._intake_closed = True
        error = trio.BrokenResourceError(
            f"batcher {self.name!r} was shut down before this item was processed"
        )
        self._fail_all(self._intake.clear_room(), error)
        self._fail_all(self._intake.clear(), error)

    def _fail_all(self, requests: list[_Request[K, V]], error: BaseException) -> None:
        assert self._clock is not None
        now = self._clock.current_time()
        for request in requests:
            request.state = _IN_FLIGHT  # so that deliver_error settles it
        deliver_error(requests, error, None, now)

    # ------------------------------------------------------------------ the dispatcher

    def _wake_dispatcher(self) -> None:
        task = self._dispatcher
        if task is not None:
            self._dispatcher = None
            self._waiting_for = _RUNNING
            wake(task)

    def _abort_park(self, _: RaiseCancelT) -> Abort:
        self._dispatcher = None
        self._waiting_for = _RUNNING
        return Abort.SUCCEEDED

    @enable_ki_protection
    async def _park_dispatcher(self, waiting_for: Step, deadline: float) -> None:
        self._waiting_for = waiting_for
        self._dispatcher = current_task()
        if deadline == math.inf:
            await park(self._abort_park)
        else:
            with trio.move_on_at(deadline):
                await park(self._abort_park)

    def _upkeep(self) -> None:
        """The work that withdrawals left: room to hand out, queues to compact, abandoned
        batches to cancel."""
        if self._intake.needs_upkeep:
            self._intake.upkeep()
        if self._abandoned:
            abandoned, self._abandoned = self._abandoned, []
            for batch in abandoned:
                if batch.running and batch.live == 0 and batch.scope is not None:
                    batch.scope.cancel()

    async def _dispatch_loop(self) -> None:
        nursery, clock = self._nursery, self._clock
        assert nursery is not None
        assert clock is not None
        settled = False  # a scheduler pass has gone by since this batch became ready
        rate_wait_started: float | None = None
        while True:
            if self._intake.needs_upkeep or self._abandoned:
                self._upkeep()
            now = clock.current_time()
            step, until = next_step(
                self._intake,  # type: ignore[arg-type]
                in_flight=self._in_flight,
                max_in_flight=self._max_in_flight,
                closed=self._intake_closed,
                batch_cap=self._batch_cap,
                max_wait=self._max_wait,
                gcra=self._gcra,
                rate_counts_items=self._rate_unit_items,
                now=now,
            )
            if step == _SEND:
                if not settled:
                    # Let every task of the current scheduler pass add its items first.
                    settled = True
                    await cancel_shielded_checkpoint()
                    continue
                settled = False
                if rate_wait_started is not None:
                    self._rate_wait_time += now - rate_wait_started
                    rate_wait_started = None
                self._start_batch(nursery, now)
            elif step == _STOP:
                return
            else:
                if step == Step.FOR_RATE and rate_wait_started is None:
                    rate_wait_started = now  # one wait per batch, however often it re-waits
                    self._rate_waits += 1
                await self._park_dispatcher(step, until)

    def _start_batch(self, nursery: trio.Nursery, now: float) -> None:
        records = self._intake.take(self._batch_cap)
        if not records:
            return
        gcra = self._gcra
        if gcra is not None:
            gcra.take(len(records) if self._rate_unit_items else 1, now)
        self._queue_waits.extend([now - request.t0 for request in records])
        batch = _Batch(self, records)
        if self._batch_timeout is not None or self._cancel_abandoned:
            batch.scope = trio.CancelScope(
                deadline=math.inf if self._batch_timeout is None else now + self._batch_timeout
            )
        if self._cancel_abandoned:
            for request in records:
                request.batch = batch
        self._in_flight += 1
        self._batches += 1
        if self._in_flight >= self._max_in_flight:
            assert self._saturation is not None
            self._saturation.update(True, now)
        nursery.start_soon(self._run_batch, batch)

    # ------------------------------------------------------------------ running a batch

    async def _run_batch(self, batch: _Batch) -> None:
        clock = self._clock
        assert clock is not None
        records: list[_Request[K, V]] = batch.records
        if batch.live != len(records) or any(r.state != _IN_FLIGHT for r in records):
            # Callers who left between the dispatcher taking the batch and this task starting:
            # their items have not reached batch_fn, so they count as withdrawn, not dropped.
            live = [request for request in records if request.state == _IN_FLIGHT]
            gone = len(records) - len(live)
            self._dropped -= gone
            self._withdrawn += gone
            records = batch.records = live
            batch.live = len(live)
        index: list[int] | None = None
        if self._dedupe and records:
            items, index, failed = dedupe_items(self.name, records, clock.current_time())
            self._callers_served += failed
        else:
            items = [request.item for request in records]
        if not items:  # nothing left to send: this was never a batch
            batch.running = False
            self._batches -= 1
            self._release_slot(clock.current_time())
            return
        size = len(items)
        self._items += size
        if size > self._peak_batch:
            self._peak_batch = size
        _CURRENT_BATCH.set(batch)  # this task's own context: seen by calls from batch_fn
        started = clock.current_time()
        scope = batch.scope
        try:
            if scope is None:
                results = await self._batch_fn(items)
            else:
                with scope:
                    results = await self._batch_fn(items)
                if scope.cancelled_caught:
                    self._finish_cut_batch(batch, records, started)
                    return
        except Exception as exc:
            self._failed_batches += 1
            self._callers_served += deliver_error(
                records, exc, exc.__traceback__, self._batch_done(batch, started)
            )
        except BaseException as exc:
            # Cancelled (the batcher is shutting down) or KeyboardInterrupt: the callers must
            # not hang, and must not receive a Cancelled that is not theirs.
            broken = trio.BrokenResourceError(
                f"batcher {self.name!r} was shut down while this item was in flight"
            )
            broken.__cause__ = exc
            try:
                now = self._batch_done(batch, started)
                self._callers_served += deliver_error(records, broken, None, now)
                raise
            finally:
                del broken, exc
        else:
            now = self._batch_done(batch, started)
            self._callers_served += deliver_results(self.name, records, size, index, results, now)

    def _finish_cut_batch(
        self, batch: _Batch, records: list[_Request[K, V]], started: float
    ) -> None:
        """batch_fn was cancelled: by ``batch_timeout``, or because all its callers left."""
        now = self._batch_done(batch, started)
        if batch.live == 0:  # abandoned: nobody is waiting for an answer
            self._cancelled_batches += 1
            return
        self._failed_batches += 1
        self._timed_out_batches += 1
        error = trio.TooSlowError(
            f"batcher {self.name!r}: batch_fn did not return within "
            f"batch_timeout={self._batch_timeout} s"
        )
        self._callers_served += deliver_error(records, error, None, now)

    def _batch_done(self, batch: _Batch, started: float) -> float:
        """Free the batch's slot; returns the time, which is also each result's time."""
        assert self._clock is not None
        batch.running = False
        now = self._clock.current_time()
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
    batch_timeout: float | None = None,
    cancel_abandoned: bool = False,
    name: str | None = None,
) -> AsyncIterator[Batcher[K, V]]:
    """Open a batcher in front of ``batch_fn`` for the duration of the block.

    ``batch_fn`` is an async function that takes a ``list`` of items and returns either a
    sequence of results aligned with them or a mapping from item to result. A result that is an
    exception instance is raised to that item's caller alone; if batch_fn raises, every caller
    of that batch gets the exception. batch_fn may sort or filter its list in place: the batcher
    never reads it back.

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
        batch_timeout: seconds a batch_fn call may run; past it the call is cancelled, its slot
            freed, and its callers get :exc:`trio.TooSlowError`. None (the default): no bound.
        cancel_abandoned: cancel a running batch_fn call as soon as every one of its callers
            has left. The default, False, lets it finish (safe for writes).
        name: a name for statistics, reprs and errors; defaults to batch_fn's name.

    The block owns the batcher's tasks. On normal exit, intake stops (later calls raise
    :exc:`trio.ClosedResourceError`) and every accepted item is processed before the block
    ends. If the block raises or is cancelled, every caller still waiting gets
    :exc:`trio.BrokenResourceError` at once, running batches are cancelled, and the block's own
    exception propagates unchanged. The batcher's tasks never raise batch_fn's errors (they
    go to the callers); a KeyboardInterrupt or SystemExit out of batch_fn ends the block with
    that exception itself, never wrapped in an exception group.

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
        batch_timeout=batch_timeout,
        cancel_abandoned=cancel_abandoned,
        name=name,
    )
    body_error: BaseException | None = None
    try:
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
    except BaseExceptionGroup as group:
        # Only a KeyboardInterrupt or SystemExit out of batch_fn gets here (the batcher's tasks
        # hand every other error to callers): raise it as it is, as documented.
        _, rest = group.split(trio.Cancelled)
        leaves = _leaves(rest) if rest is not None else []
        if len(leaves) != 1:
            raise
        leaf = leaves[0]
        try:
            raise leaf from body_error
        finally:
            del leaf, leaves, rest, group, body_error
    if body_error is not None:
        try:
            raise body_error
        finally:
            del body_error


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves
