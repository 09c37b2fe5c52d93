"""A batcher's dispatcher: the one task that starts batches, and the tasks that run them.

The dispatcher loops: do the upkeep that withdrawals left (``_intake.py``), ask
:func:`mcs._dispatch.next_step` what to do, then either start a batch or park until the event it
waits for. Every event that can unblock it (an item arrives, a slot frees, a limit changes, a
caller leaves) wakes it only when it is waiting for exactly that, so an idle or saturated
batcher costs nothing per item.

Before it takes a batch, a dispatcher that was woken (or has just started) yields one scheduler
pass: the task that woke it may be the first of many that run in the same pass (callers started
together, callers woken by the previous batch), and all of their items belong in the same batch.
Once settled, it starts every batch it may without yielding again. At most one extra pass per
wake-up, never per item.

Each batch runs in a task of its own, started in the batcher's nursery. Its batch_fn call runs
in a cancel scope only when ``batch_timeout`` or ``cancel_abandoned`` needs one (one scope per
batch, never per item). Whatever batch_fn does, the batch task ends normally and every caller of
the batch gets one outcome; only a KeyboardInterrupt or SystemExit out of batch_fn (after the
callers were told) and the batcher's own cancellation leave it.

Shared limits (a ``trio.CapacityLimiter``, a limit on Redis) and ``on_batch_error="split"``
are described in ``_gates.py``, which holds the dispatcher's side of them.
"""

from __future__ import annotations

import contextvars
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio
from trio.lowlevel import (
    Abort,
    RaiseCancelT,
    Task,
    cancel_shielded_checkpoint,
    current_task,
    enable_ki_protection,
)

from ._counters import _Counters
from ._dispatch import Step, next_step
from ._gates import _RUNNING, _Gates
from ._intake import _Intake
from ._limits import SharedInFlight, SharedRate
from ._log import batch_failed
from ._park import park, raised_traceback, wake
from ._rate import _Gcra
from ._requests import _IN_FLIGHT, _Request
from ._shared import extra_callers
from ._split import deliver_error, deliver_results
from ._tracing import active_tracer, traced

if TYPE_CHECKING:
    from ._batcher import Batcher

__all__ = ["_CURRENT_BATCH", "_Batch", "_Dispatcher", "call_from_batch"]

K = TypeVar("K")
V = TypeVar("V")

_UNBOUNDED: Final = 2**62  # the local in-flight bound when a shared one decides
_FOR_SLOT: Final = Step.FOR_SLOT
_FOR_ITEMS: Final = Step.FOR_ITEMS
_FOR_FILL: Final = Step.FOR_FILL
_FOR_RATE: Final = Step.FOR_RATE
_SEND: Final = Step.SEND
_STOP: Final = Step.STOP


class _Batch:
    """One running batch_fn call: its records, and what abandonment and nested calls need."""

    __slots__ = (
        "dispatcher",
        "live",
        "nested_waits",
        "part",
        "records",
        "running",
        "scope",
        "token",
    )

    def __init__(
        self,
        dispatcher: _Dispatcher[Any, Any],
        records: list[_Request[Any, Any]],
        part: bool = False,
        token: object = None,
    ):
        self.dispatcher = dispatcher
        self.part = part  # a part of a split batch: its items were sent before
        self.token = token  # the shared in-flight slot it holds, if any
        self.records = records
        self.live = len(records)  # callers that have not left
        self.scope: trio.CancelScope | None = None
        self.nested_waits = 0  # calls its batch_fn is waiting for on its own batcher
        self.running = True


# The batch whose batch_fn the current task runs (set in each batch task's own context, so
# tasks that batch_fn starts inherit it): how a call from inside batch_fn is recognised.
_CURRENT_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "mcs.current_batch", default=None
)


class _Dispatcher(_Gates[K, V]):
    """The batch-starting half of a batcher; the batcher owns the intake and the callers."""

    __slots__ = (
        "_abandoned",
        "_batch_fn",
        "_clock",
        "_nursery",
        "_task",
        "batch_cap",
        "batch_timeout",
        "blocked",
        "cancel_abandoned",
        "counts",
        "gcra",
        "in_flight",
        "intake",
        "max_in_flight",
        "max_wait",
        "name",
        "rate_counts_items",
        "shares",
        "split",
    )

    def __init__(
        self,
        name: str,
        batch_fn: Any,
        intake: _Intake[K, V],
        counts: _Counters,
        *,
        batch_cap: int,
        max_wait: float,
        max_in_flight: int,
        gcra: _Gcra | None,
        rate_counts_items: bool,
        shares: bool,
        batch_timeout: float | None,
        cancel_abandoned: bool,
        slots: SharedInFlight | None = None,
        shared_rate: SharedRate | None = None,
        split: bool = False,
    ) -> None:
        self.name = name
        self._batch_fn = batch_fn
        self.intake = intake
        self.counts = counts
        self.batch_cap = batch_cap
        self.max_wait = max_wait
        # With shared slots, the shared budget is the only in-flight bound.
        self.max_in_flight = max_in_flight if slots is None else _UNBOUNDED
        self.slots = slots
        self.shared_rate = shared_rate
        self.split = split
        self.gcra = gcra
        self.rate_counts_items = rate_counts_items
        self.shares = shares  # dedupe: records may be shared items with several callers
        self.batch_timeout = batch_timeout
        self.cancel_abandoned = cancel_abandoned
        self.in_flight = 0
        self.blocked = 0  # running batches waiting for a call of their own to this batcher
        self.waiting_for: int = _RUNNING
        self._task: Task | None = None  # set while the dispatcher is parked
        self._abandoned: list[_Batch] = []  # batches to cancel (cancel_abandoned)
        self._clock: trio.abc.Clock | None = None
        self._nursery: trio.Nursery | None = None
        self._gate_scope: trio.CancelScope | None = None  # while waiting in a shared limit
        self._token: object = None  # a shared slot taken for the next batch
        self._reserved: tuple[float, int] | None = None  # (ready at, units) for the next batch
        self._splits: deque[list[_Request[K, V]]] = deque()  # parts of split batches, to send

    def start(self, nursery: trio.Nursery, clock: trio.abc.Clock) -> None:
        self._nursery = nursery
        self._clock = clock
        nursery.start_soon(self._loop, name=f"mcs.Batcher({self.name}).dispatcher")

    # ------------------------------------------------------------------ events

    def wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            self.waiting_for = _RUNNING
            wake(task)
        elif self._gate_scope is not None:
            self._gate_scope.cancel()

    def item_arrived(self) -> None:
        waiting_for = self.waiting_for
        if waiting_for == _FOR_ITEMS or (
            waiting_for == _FOR_FILL and self.intake.queued >= self.batch_cap
        ):
            self.wake()

    def set_max_in_flight(self, value: int, now: float) -> None:
        self.max_in_flight = value
        if self.counts.saturation is not None:
            self.counts.saturation.update(self.in_flight >= value, now)
        if self.waiting_for == _FOR_SLOT and self.in_flight < value:
            self.wake()

    def abandon(self, batch: _Batch) -> None:
        """Every caller of ``batch`` left (called from an abort callback: only marks)."""
        if batch.running and self.cancel_abandoned:
            self._abandoned.append(batch)
            self.wake()

    # ------------------------------------------------------------------ the loop

    def _abort_park(self, _: RaiseCancelT) -> Abort:
        self._task = None
        self.waiting_for = _RUNNING
        return Abort.SUCCEEDED

    @enable_ki_protection
    async def _park(self, waiting_for: Step, deadline: float) -> None:
        self.waiting_for = waiting_for
        self._task = current_task()
        if deadline == math.inf:
            await park(self._abort_park)
        else:
            with trio.move_on_at(deadline):
                await park(self._abort_park)

    def _upkeep(self) -> None:
        """The work that withdrawals left: room to hand out, queues to compact, abandoned
        batches to cancel."""
        if self.intake.needs_upkeep:
            self.intake.upkeep()
        if self._abandoned:
            abandoned, self._abandoned = self._abandoned, []
            for batch in abandoned:
                if batch.running and batch.live == 0 and batch.scope is not None:
                    batch.scope.cancel()

    async def _loop(self) -> None:
        try:
            await self._dispatch()
        finally:
            if self._token is not None:  # a shared slot taken for a batch that never left
                token, self._token = self._token, None
                assert self.slots is not None
                self.slots.release(token)
            if self._splits:  # shut down with parts of split batches still to send
                self._fail_splits()

    async def _dispatch(self) -> None:
        clock, intake, counts, splits = self._clock, self.intake, self.counts, self._splits
        assert clock is not None
        gated = self.slots is not None or self.shared_rate is not None
        settled = False  # a scheduler pass has gone by since the dispatcher last woke
        rate_wait_started: float | None = None
        while True:
            if intake.needs_upkeep or self._abandoned:
                self._upkeep()
            now = clock.current_time()
            step, until = next_step(
                intake,  # type: ignore[arg-type]
                in_flight=self.in_flight,
                max_in_flight=self.max_in_flight,
                closed=intake.closed,
                batch_cap=self.batch_cap,
                max_wait=self.max_wait,
                gcra=self.gcra,
                rate_counts_items=self.rate_counts_items,
                now=now,
                split_units=len(splits[0]) if splits else 0,
            )
            if step == _SEND:
                if not settled:
                    settled = True  # let every task of this scheduler pass add its items
                    await cancel_shielded_checkpoint()
                    continue
                if gated and not self._gates_open():
                    if not await self._pass_gates():
                        continue
                    now = clock.current_time()
                if rate_wait_started is not None:
                    counts.rate_wait_time += now - rate_wait_started
                    rate_wait_started = None
                self._start_batch(now)
            elif step == _STOP and not (self.split and self.in_flight):
                return  # (a running batch may still split: wait for it)
            else:
                if step == _STOP:
                    step = _FOR_ITEMS
                if step == _FOR_ITEMS:
                    rate_wait_started = None  # the waiting items left
                    if self._token is not None:  # nothing to send: let others have the slot
                        token, self._token = self._token, None
                        assert self.slots is not None
                        self.slots.release(token)
                elif step == _FOR_RATE and rate_wait_started is None:
                    rate_wait_started = now  # one wait per batch, however often it re-waits
                    counts.rate_waits += 1
                settled = False
                await self._park(step, until)

    # ------------------------------------------------------------------ starting a batch

    def _start_batch(self, now: float) -> None:
        part = bool(self._splits)
        if part:
            records = self._splits.popleft()
        else:
            cap = self.batch_cap
            if self._reserved is not None and self.rate_counts_items:
                cap = min(cap, self._reserved[1])  # no more items than were booked
            records = self.intake.take(cap)
            if not records:
                return
        self._reserved = None
        token, self._token = self._token, None
        counts = self.counts
        if self.gcra is not None:
            self.gcra.take(len(records) if self.rate_counts_items else 1, now)
        if not part:
            waits = [now - request.t0 for request in records]
            counts.queue_waits.extend(waits)
            counts.queue_wait_buckets.extend(waits)
        batch = _Batch(self, records, part, token)
        if self.batch_timeout is not None or self.cancel_abandoned:
            timeout = self.batch_timeout
            batch.scope = trio.CancelScope(deadline=math.inf if timeout is None else now + timeout)
        if self.cancel_abandoned:
            for request in records:
                request.batch = batch
        self.in_flight += 1
        counts.batches += 1
        if self.in_flight >= self.max_in_flight:
            assert counts.saturation is not None
            counts.saturation.update(True, now)
        assert self._nursery is not None
        self._nursery.start_soon(self._run, batch)

    # ------------------------------------------------------------------ running a batch

    async def _run(self, batch: _Batch) -> None:
        clock, counts = self._clock, self.counts
        assert clock is not None
        records: list[_Request[K, V]] = batch.records
        if batch.live != len(records) or any(r.state != _IN_FLIGHT for r in records):
            # Callers who left between the dispatcher taking the batch and this task starting:
            # their items have not reached batch_fn, so they count as withdrawn, not dropped.
            live = [request for request in records if request.state == _IN_FLIGHT]
            if not batch.part:  # (a part's items were sent before: its callers dropped them)
                gone = sum(
                    getattr(request, "dropped", 1)
                    for request in records
                    if request.state != _IN_FLIGHT
                )
                counts.dropped -= gone
                counts.withdrawn += gone
            records = batch.records = live
            batch.live = len(live)
        items = [request.item for request in records]
        if not items:  # nothing left to send: this was never a batch
            batch.running = False
            counts.batches -= 1
            self._release_slot(batch, clock.current_time())
            return
        size = len(items)
        counts.items += size
        if size > counts.peak_batch:
            counts.peak_batch = size
        counts.batch_size_buckets.add(size)
        _CURRENT_BATCH.set(batch)  # this task's own context: seen by calls from batch_fn
        started = clock.current_time()
        batch_fn, tracer = self._batch_fn, active_tracer()  # tracer: None unless tracing is on
        if tracer is not None:
            batch_fn = traced(tracer, batch_fn, self.name, records, started)
        scope = batch.scope
        results: object = None
        try:
            if scope is None:
                results = await batch_fn(items)
            else:
                with scope:
                    results = await batch_fn(items)
                if scope.cancelled_caught:
                    self._cut_short(batch, records, started)
                    return
        except Exception as exc:
            counts.failed_batches += 1
            if self.split and len(records) > 1:
                self._split(records)
                self._batch_done(batch, started)
                return
            now = self._batch_done(batch, started)
            tb = raised_traceback(exc)
            served = deliver_error(records, exc, tb, now)
            if self.split:  # (only single items get here)
                counts.failed_alone += served
            counts.callers_served += served + (extra_callers(records) if self.shares else 0)
            batch_failed(self.name, exc, size, tb)
            del tb
        except BaseException as exc:
            # Cancelled (the batcher is shutting down) or KeyboardInterrupt: the callers must
            # not hang, and must not receive a Cancelled that is not theirs.
            broken = trio.BrokenResourceError(
                f"batcher {self.name!r} was shut down while this item was in flight"
            )
            broken.__cause__ = exc
            try:
                now = self._batch_done(batch, started)
                served = deliver_error(records, broken, None, now)
                counts.callers_served += served + (extra_callers(records) if self.shares else 0)
                raise
            finally:
                del broken, exc
        else:
            now = self._batch_done(batch, started)
            served = deliver_results(self.name, records, size, results, now)
            counts.callers_served += served + (extra_callers(records) if self.shares else 0)
        finally:
            # This frame outlives the task on the traceback of any error an apply function
            # raised during delivery: it must not keep the records (see _split.py).
            records = batch.records = items = results = None  # type: ignore[assignment]

    def _split(self, records: list[_Request[K, V]]) -> None:
        """batch_fn raised for several items: send each half again, ahead of the queue."""
        self.counts.split_batches += 1
        live = [request for request in records if request.state == _IN_FLIGHT]
        half = (len(live) + 1) // 2
        self._splits.extend(part for part in (live[:half], live[half:]) if part)
        if self.waiting_for == _FOR_ITEMS or self.waiting_for == _FOR_FILL:
            self.wake()

    def _cut_short(self, batch: _Batch, records: list[_Request[K, V]], started: float) -> None:
        """batch_fn was cancelled: by ``batch_timeout``, or because all its callers left."""
        now = self._batch_done(batch, started)
        if batch.live == 0:  # abandoned: nobody is waiting for an answer
            self.counts.cancelled_batches += 1
            return
        self.counts.failed_batches += 1
        self.counts.timed_out_batches += 1
        error = trio.TooSlowError(
            f"batcher {self.name!r}: batch_fn did not return within "
            f"batch_timeout={self.batch_timeout} s"
        )
        served = deliver_error(records, error, None, now)
        self.counts.callers_served += served + (extra_callers(records) if self.shares else 0)
        batch_failed(self.name, error, len(records), None)

    def _batch_done(self, batch: _Batch, started: float) -> float:
        """Free the batch's slot; returns the time, which is also each result's time."""
        assert self._clock is not None
        batch.running = False
        now = self._clock.current_time()
        self.counts.batch_times.add(now - started)
        self.counts.batch_time_buckets.add(now - started)
        self.counts.busy_time += now - started
        self.counts.ended_items += len(batch.records)
        self._release_slot(batch, now)
        return now

    def _release_slot(self, batch: _Batch, now: float) -> None:
        if batch.token is not None:
            token, batch.token = batch.token, None
            assert self.slots is not None
            self.slots.release(token)
        was_saturated = self.in_flight >= self.max_in_flight
        self.in_flight -= 1
        if was_saturated:
            assert self.counts.saturation is not None
            self.counts.saturation.update(self.in_flight >= self.max_in_flight, now)
        waiting_for = self.waiting_for
        if waiting_for == _FOR_SLOT or (
            # closed and drained, but the dispatcher waited in case this batch split
            waiting_for == _FOR_ITEMS and self.split and self.intake.closed
        ):
            self.wake()


async def call_from_batch(batcher: Batcher[K, V], item: K) -> V:
    """A call made from inside a batch_fn: fine, unless every in-flight slot is held by a
    batch waiting for such a call, which would wait forever."""
    batch = _CURRENT_BATCH.get()
    dispatcher = batcher._dispatcher
    if batch is None or batch.dispatcher is not dispatcher or not batch.running:
        return await batcher._call_plain(item)
    if batch.nested_waits == 0:
        dispatcher.blocked += 1
    batch.nested_waits += 1
    try:
        if dispatcher.blocked >= dispatcher.in_flight >= dispatcher.max_in_flight:
            raise RuntimeError(
                f"batcher {batcher.name!r}: batch_fn called its own batcher while all "
                f"{dispatcher.max_in_flight} in-flight slots are held by batches waiting "
                "for such calls; this would deadlock"
            )
        return await batcher._call_plain(item)
    finally:
        batch.nested_waits -= 1
        if batch.nested_waits == 0:
            dispatcher.blocked -= 1
