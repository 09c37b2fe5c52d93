"""Batchers: the items of many concurrent callers, one downstream call.

The problem: thousands of live requests each need one row from the same database. Issued one by
one, those lookups dominate cost and latency; issued as one ``WHERE id IN (...)`` they are cheap.
A batcher sits in front of such a downstream, collects the items of all callers, calls the user's
``batch_fn`` once per batch, and hands each caller exactly its own result or error.

This module is the batcher's public face and its intake of callers. The parts it is made of:
``_intake.py`` (the queues, no awaiting), ``_dispatch.py`` (when the next batch leaves, a plain
function), ``_dispatcher.py`` (the task that starts batches and the tasks that run them),
``_split.py`` (results back to callers), ``_shared.py`` (dedupe across batches), ``_many.py``
(``many``), ``_counters.py`` (statistics), ``_park.py`` (parking and waking tasks) and
``_open_batcher.py`` (the block that owns a batcher's tasks).

How, and what it costs. The obvious design (a memory channel in, a task and a ``trio.Event`` per
caller out) pays a channel hand-off, an event and often a task per item. Here a call costs one
small slotted record appended to a deque (``_intake.py``) and one park of the caller's own task
(``_park.py``). There is no task, no cancel scope and no limiter token per item. One dispatcher
task per batcher asks :func:`mcs._dispatch.next_step` when a batch may leave and starts one task
per *batch* to run batch_fn; ``_split.py`` hands the results back.

Batches are cut after the scheduler pass. Before it takes a batch, the dispatcher yields once,
so that every task that runs in the same scheduler pass as the call that woke it (callers
started together, callers woken by the previous batch) gets its item into the same batch. That
is at most one extra pass each time the dispatcher wakes, never one per item.

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

import math
from collections.abc import (
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from threading import get_ident
from typing import Generic, Literal, TypeAlias, TypeVar

import trio
from trio.lowlevel import current_task, enable_ki_protection

from ._counters import _Counters
from ._dispatch import Step
from ._dispatcher import _CURRENT_BATCH, _FOR_FILL, _FOR_ITEMS, _Dispatcher, call_from_batch
from ._exceptions import BatchResultError, Overloaded
from ._histogram import BatcherHistograms
from ._intake import _Intake
from ._limits import SharedInFlight, SharedRate, _CapacitySlots
from ._many import call_many
from ._park import park
from ._rate import RateLimit, _Gcra
from ._requests import (
    _DROPPED,
    _IN_FLIGHT,
    _JOINED,
    _QUEUED,
    _ROOM,
    _WITHDRAWN,
    _Caller,
    _Request,
)
from ._shared import _Shared
from ._split import deliver_error
from ._stats import BatcherStatistics, _Saturation
from ._util import (
    check_int,
    check_seconds,
    describe,
    is_async_callable,
    safe_repr,
)

__all__ = ["BatchFn", "Batcher"]

K = TypeVar("K")
V = TypeVar("V")

BatchFn: TypeAlias = Callable[
    [list[K]], Awaitable[Sequence[V | BaseException] | Mapping[K, V | BaseException]]
]
"""An async function from a list of items to their results, aligned or keyed by item."""


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
        "_clock",
        "_counts",
        "_dedupe",
        "_dispatcher",
        "_intake",
        "_key",
        "_queue_size",
        "_rate",
        "_reject",
        "_shared",
        "_thread",
        "name",
    )

    def __init__(
        self,
        batch_fn: BatchFn[K, V],
        *,
        max_batch_size: int = 100,
        max_wait: float = 0.0,
        max_in_flight: int | trio.CapacityLimiter | SharedInFlight = 1,
        rate: RateLimit | SharedRate | None = None,
        queue_size: int | float = 100_000,
        overload: Literal["block", "reject"] = "block",
        dedupe: bool = False,
        key: Callable[[K], Hashable] | None = None,
        batch_timeout: float | None = None,
        cancel_abandoned: bool = False,
        on_batch_error: Literal["fail", "split"] = "fail",
        name: str | None = None,
    ) -> None:
        if not callable(batch_fn) or not is_async_callable(batch_fn):
            raise TypeError(f"batch_fn must be an async function, got {batch_fn!r}")
        check_int("max_batch_size", max_batch_size, 1)
        max_wait = check_seconds("max_wait", max_wait)
        slots: SharedInFlight | None = None
        if isinstance(max_in_flight, trio.CapacityLimiter):
            slots = _CapacitySlots(max_in_flight)
        elif isinstance(max_in_flight, SharedInFlight):
            slots = max_in_flight
        else:  # (the message says "an int": the shared kinds are documented)
            check_int("max_in_flight", max_in_flight, 1)
        shared_rate: SharedRate | None = None
        if isinstance(rate, SharedRate):
            shared_rate, rate = rate, rate.limit
        elif rate is not None and not isinstance(rate, RateLimit):
            raise TypeError(f"rate must be a mcs.RateLimit or None, got {rate!r}")
        if on_batch_error not in ("fail", "split"):
            raise ValueError(f"on_batch_error must be 'fail' or 'split', got {on_batch_error!r}")
        if queue_size != math.inf:
            check_int("queue_size", queue_size, 1)
        if overload not in ("block", "reject"):
            raise ValueError(f"overload must be 'block' or 'reject', got {overload!r}")
        if not isinstance(dedupe, bool):
            raise TypeError(f"dedupe must be a bool, got {dedupe!r}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function or None, got {key!r}")
        if key is not None and not dedupe:
            raise ValueError("key needs dedupe=True, got dedupe=False")
        if batch_timeout is not None:
            batch_timeout = check_seconds("batch_timeout", batch_timeout, positive=True)
        if not isinstance(cancel_abandoned, bool):
            raise TypeError(f"cancel_abandoned must be a bool, got {cancel_abandoned!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")

        self.name: str = name if name is not None else describe(batch_fn, "batcher")
        # trio names a task after its function: `nursery.start_soon(batcher, item)` would
        # otherwise call repr() on every spawn.
        self.__qualname__ = f"Batcher({self.name})"
        self._rate = rate
        self._queue_size = queue_size
        self._reject = overload == "reject"
        self._clock: trio.abc.Clock | None = None
        self._thread: int | None = None  # the thread of the trio run that owns the batcher
        self._intake: _Intake[K, V] = _Intake(queue_size)
        self._counts = _Counters()
        self._dedupe = dedupe
        self._key = key
        self._shared: dict[Hashable, _Shared] = {}  # dedupe: items queued or in flight, by key
        # With an item-counted rate, one call may never carry more than the burst.
        counts_items = rate is not None and rate.unit == "item"
        self._dispatcher: _Dispatcher[K, V] = _Dispatcher(
            self.name,
            batch_fn,
            self._intake,
            self._counts,
            batch_cap=min(max_batch_size, rate.burst) if rate and counts_items else max_batch_size,
            max_wait=max_wait,
            max_in_flight=max_in_flight if isinstance(max_in_flight, int) else 1,
            gcra=_Gcra(rate) if rate is not None and shared_rate is None else None,
            rate_counts_items=counts_items,
            shares=dedupe,
            batch_timeout=batch_timeout,
            cancel_abandoned=cancel_abandoned,
            slots=slots,
            shared_rate=shared_rate,
            split=on_batch_error == "split",
        )

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
        intake = self._intake
        if (
            intake.closed
            or get_ident() != self._thread
            or (self._reject and intake.queued >= self._queue_size)
        ):
            await self._refuse()
        if _CURRENT_BATCH.get() is not None:
            return await call_from_batch(self, item)
        request: _Caller[K, V] = _Caller(self, item, current_task(), self._clock.current_time())  # type: ignore[union-attr]
        if self._dedupe:
            try:
                self._enter_shared(request)
            except BatchResultError:
                await trio.lowlevel.checkpoint()
                raise
        elif intake.accept(request):
            dispatcher = self._dispatcher  # _Dispatcher.item_arrived, inlined: once per item
            waiting_for = dispatcher.waiting_for
            if waiting_for == _FOR_ITEMS or (
                waiting_for == _FOR_FILL and intake.queued >= dispatcher.batch_cap
            ):
                dispatcher.wake()
        await park(request.abort)
        return request.unwrap()

    @enable_ki_protection
    async def many(self, items: Iterable[K]) -> list[V | BaseException]:
        """Send several items and return their results in order, a failing item's entry being
        its exception (DataLoader's ``loadMany``): one item's failure fails nothing else.

        The items are batched, shared (``dedupe``) and withdrawn like separate calls, and the
        caller is woken once, when the last one is settled. With ``overload="reject"``, an item
        that finds the queue full gets :exc:`mcs.Overloaded` as its entry.

        Raises:
            trio.ClosedResourceError: if the batcher is closed.
            RuntimeError: if called from another trio run or thread than the batcher's.
        """
        return await call_many(self, items)

    @property
    def max_in_flight(self) -> int:
        """How many batch_fn calls may run at once. Settable at any time: raising it lets
        queued batches leave at once; lowering it never cancels a running batch.

        With a shared in-flight limit (a ``trio.CapacityLimiter`` or one on Redis), this is
        the shared total, and it is set on the shared limit, not here.

        Raises:
            AttributeError: when set on a batcher whose in-flight limit is shared.
        """
        slots = self._dispatcher.slots
        return self._dispatcher.max_in_flight if slots is None else slots.total

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        slots = self._dispatcher.slots
        if slots is not None:
            raise AttributeError(
                f"batcher {self.name!r}: max_in_flight is shared ({slots!r}); "
                "change the shared limit instead"
            )
        check_int("max_in_flight", value, 1)
        now = self._clock.current_time() if self._clock is not None else 0.0
        self._dispatcher.set_max_in_flight(value, now)

    @property
    def rate(self) -> RateLimit | None:
        """The rate limit on downstream calls, if any."""
        return self._rate

    def statistics(self) -> BatcherStatistics:
        """A frozen snapshot of the batcher's counters; see :class:`mcs.BatcherStatistics`.

        Cheap, and safe to call from any thread (a metrics exporter's) and after the run ended;
        read from another thread, each counter is exact but two may be a moment apart.
        """
        dispatcher, clock = self._dispatcher, self._clock
        return self._counts.snapshot(
            name=self.name,
            queued=self._intake.queued,
            waiting_for_room=self._intake.waiting_for_room,
            in_flight=dispatcher.in_flight,
            max_in_flight=self.max_in_flight,
            now=clock.current_time() if clock is not None else None,
        )

    def histograms(self) -> BatcherHistograms:
        """Cumulative histograms of queue waits, batch times and batch sizes since the batcher
        opened, in fixed buckets; see :class:`mcs.BatcherHistograms`. Unlike the percentiles of
        :meth:`statistics`, they add up across processes (Prometheus's ``histogram_quantile``).
        Safe to call from any thread."""
        return self._counts.histograms(self.name)

    def __repr__(self) -> str:
        state = "closed" if self._intake.closed else "open"
        dispatcher = self._dispatcher
        return (
            f"<mcs.Batcher {self.name!r} {state}: queued={self._intake.queued} "
            f"in_flight={dispatcher.in_flight}/{self.max_in_flight}>"
        )

    # ------------------------------------------------------------------ intake

    def _refusal(self) -> Exception:
        """The error for a call that cannot be accepted now."""
        if self._clock is None:
            return RuntimeError(
                f"batcher {self.name!r} is not open: use 'async with mcs.open_batcher(...)'"
            )
        if get_ident() != self._thread:
            return RuntimeError(
                f"batcher {self.name!r} belongs to another trio run: a batcher can only be "
                "used from the run (and thread) that opened it"
            )
        if self._intake.closed:
            return trio.ClosedResourceError(f"batcher {self.name!r} is closed")
        return Overloaded(f"batcher {self.name!r} is full ({self._intake.queued} items queued)")

    async def _refuse(self) -> None:
        refusal = self._refusal()  # decided now, raised after the checkpoint
        try:
            if self._thread is None or get_ident() == self._thread:
                await trio.lowlevel.checkpoint()  # a cancelled caller is cancelled, not refused
            if isinstance(refusal, Overloaded):
                self._counts.rejected += 1
            raise refusal
        finally:
            del refusal  # no frame -> traceback -> frame cycle

    @enable_ki_protection
    def _submit_nowait(self, request: _Request[K, V]) -> None:
        """Accept a record without parking anyone (the graph's entry point).

        Raises the same errors as a call that is refused, synchronously.
        """
        intake = self._intake
        if (
            intake.closed
            or get_ident() != self._thread
            or (self._reject and intake.queued >= self._queue_size)
        ):
            refusal = self._refusal()
            try:
                if isinstance(refusal, Overloaded):
                    self._counts.rejected += 1
                raise refusal
            finally:
                del refusal
        if self._dedupe:
            self._enter_shared(request)
        elif intake.queued < intake.queue_size and not intake.waiting_for_room:
            request.state = _QUEUED  # _Intake.accept, inlined: once per item
            intake.queue.append(request)
            intake.queued += 1
            dispatcher = self._dispatcher  # _Dispatcher.item_arrived, inlined
            waiting_for = dispatcher.waiting_for
            if waiting_for == _FOR_ITEMS or (
                waiting_for == _FOR_FILL and intake.queued >= dispatcher.batch_cap
            ):
                dispatcher.wake()
        else:
            intake.accept(request)  # to the room queue

    def _enter_shared(self, request: _Request[K, V]) -> None:
        """dedupe: join the equal item already queued or in flight, or queue a new shared one.

        Raises:
            mcs.BatchResultError: if the item's key cannot be computed or compared.
        """
        item = request.item
        try:
            key = item if self._key is None else self._key(item)
            shared = self._shared.get(key)
        except TypeError:  # unhashable: it cannot be shared, and is sent on its own
            queued: _Request[K, V] = request
        except Exception as exc:
            raise BatchResultError(
                f"batcher {self.name!r}: dedupe could not compare item {safe_repr(item)}: {exc!r}"
            ) from exc
        else:
            if shared is not None:
                shared.join(request)
                return
            queued = _Shared(key, request, self._shared)
        if self._intake.accept(queued):
            self._dispatcher.item_arrived()

    def _withdraw(self, request: _Request[K, V]) -> None:
        """The caller of ``request`` went away (cancelled): mark it, O(1). Called from abort
        callbacks, so any work it implies is left to the dispatcher."""
        state = request.state
        if state == _JOINED:  # dedupe: only this caller leaves its shared item
            request.state = _WITHDRAWN
            shared = request.batch
            if shared.state == _IN_FLIGHT:
                self._counts.dropped += 1
                shared.dropped += 1
            else:
                self._counts.withdrawn += 1
            shared.live -= 1
            if shared.live == 0:  # the last caller left: so does the item
                shared.forget()
                self._let_go(shared)
        elif state == _QUEUED or state == _ROOM:
            self._counts.withdrawn += 1
            self._let_go(request)
        elif state == _IN_FLIGHT:
            self._counts.dropped += 1
            self._let_go(request)

    def _let_go(self, request: _Request[K, V]) -> None:
        """Take a record out of the intake, or drop it from its batch; counts nothing."""
        state = request.state
        if state == _QUEUED or state == _ROOM:
            self._intake.withdraw(request)
            if self._intake.needs_upkeep or not self._intake.queued:
                self._dispatcher.wake()  # upkeep to do, or nothing left to wait for
        elif state == _IN_FLIGHT:
            request.state = _DROPPED
            batch = request.batch
            if batch is not None:
                batch.live -= 1
                if batch.live == 0:
                    self._dispatcher.abandon(batch)

    @enable_ki_protection
    async def _call_plain(self, item: K) -> V:
        request: _Caller[K, V] = _Caller(self, item, current_task(), self._clock.current_time())  # type: ignore[union-attr]
        self._admit(request)
        await park(request.abort)
        return request.unwrap()

    def _admit(self, request: _Request[K, V]) -> None:
        """Queue ``request``, or with dedupe share it (raises as :meth:`_enter_shared`)."""
        if self._dedupe:
            self._enter_shared(request)
        elif self._intake.accept(request):
            self._dispatcher.item_arrived()

    # ------------------------------------------------------------------ lifecycle

    def _start(self, nursery: trio.Nursery) -> None:
        self._clock = clock = trio.lowlevel.current_clock()
        self._thread = get_ident()
        self._intake.closed = False
        self._counts.saturation = _Saturation(clock.current_time())
        self._dispatcher.start(nursery, clock)

    @enable_ki_protection
    def _close_intake(self) -> None:
        """Stop accepting items; what is queued still drains."""
        self._intake.closed = True
        error = trio.ClosedResourceError(
            f"batcher {self.name!r} closed before this item was accepted"
        )
        self._fail_all(self._intake.clear_room(), error)
        if self._dispatcher.waiting_for in (Step.FOR_ITEMS, Step.FOR_FILL):
            self._dispatcher.wake()

    @enable_ki_protection
    def _abort(self) -> None:
        """The batcher's block failed or was cancelled: fail everything not yet in flight."""
        self._intake.closed = True
        error = trio.BrokenResourceError(
            f"batcher {self.name!r} was shut down before this item was processed"
        )
        self._fail_all(self._intake.clear_room(), error)
        self._fail_all(self._intake.clear(), error)

    def _fail_all(self, requests: list[_Request[K, V]], error: BaseException) -> None:
        assert self._clock is not None
        for request in requests:
            request.state = _IN_FLIGHT  # so that deliver_error settles it
        deliver_error(requests, error, None, self._clock.current_time())
