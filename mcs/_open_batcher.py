"""``async with mcs.open_batcher(...)``: a batcher's block owns its tasks.

On normal exit, intake stops and every accepted item is processed before the block ends. If
the block raises or is cancelled, callers still waiting get :exc:`trio.BrokenResourceError` at
once and running batches are cancelled. The block's own exception propagates unchanged, and
the batcher's tasks never raise batch_fn's errors (they go to the callers): the only exception
they let out is a KeyboardInterrupt or SystemExit from batch_fn, which the block raises as it
is, never wrapped in an exception group, so ``except KeyboardInterrupt`` works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Literal, TypeVar

import trio

from ._batcher import Batcher, BatchFn
from ._limits import SharedInFlight, SharedRate
from ._rate import RateLimit
from ._registry import batcher_closed, batcher_opened
from ._util import require_trio

__all__ = ["open_batcher"]

K = TypeVar("K")
V = TypeVar("V")


@asynccontextmanager
async def open_batcher(
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
            Or a budget shared with other batchers: a ``trio.CapacityLimiter`` (each batch
            holds one token while it runs; e.g. three tables behind one connection pool share
            its size) or a :class:`mcs.SharedInFlight` such as
            :func:`mcs.redis.open_shared_in_flight` makes (shared across processes).
        rate: a :class:`mcs.RateLimit` on batch_fn calls (or items), a :class:`mcs.SharedRate`
            such as :func:`mcs.redis.open_shared_rate` makes (shared across processes), or
            None.
        queue_size: how many accepted items may wait for a batch (``math.inf`` for no bound);
            the default, 100,000, is above the concurrency of an ordinary busy service.
        overload: what a call does when the queue is full: ``"block"`` waits for room,
            ``"reject"`` raises :exc:`mcs.Overloaded` at once and queues nothing.
        dedupe: send an item equal to one already queued or in flight only once: the later
            callers join it and get its result, and ``max_batch_size`` counts distinct items.
            A caller that leaves withdraws only itself; the item goes when all its callers
            have left. Unhashable items are sent on their own.
        key: with ``dedupe``, a function from an item to the hashable key that decides which
            items are equal (for dicts, lists, objects); a mapping result is then looked up by
            that key. Default: the item itself.
        batch_timeout: seconds a batch_fn call may run; past it the call is cancelled, its slot
            freed, and its callers get :exc:`trio.TooSlowError`. None (the default): no bound.
        cancel_abandoned: cancel a running batch_fn call as soon as every one of its callers
            has left. The default, False, lets it finish (safe for writes).
        on_batch_error: what a batch_fn exception does. ``"fail"`` (the default) gives it to
            every caller of the batch. ``"split"`` sends the two halves of the batch again
            (within every limit), and so on down to single items, so that an item that breaks
            its whole batch fails only its own caller, with its own error, and the others get
            their results; it costs at most ``2 * ceil(log2(n))`` extra calls per such item. A
            ``batch_timeout`` is not split: its callers get :exc:`trio.TooSlowError`.
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
    require_trio("open_batcher")
    batcher: Batcher[K, V] = Batcher(
        batch_fn,
        max_batch_size=max_batch_size,
        max_wait=max_wait,
        max_in_flight=max_in_flight,
        rate=rate,
        queue_size=queue_size,
        overload=overload,
        dedupe=dedupe,
        key=key,
        batch_timeout=batch_timeout,
        cancel_abandoned=cancel_abandoned,
        on_batch_error=on_batch_error,
        name=name,
    )
    body_error: BaseException | None = None
    drained = False
    try:
        async with trio.open_nursery() as nursery:
            batcher._start(nursery)
            batcher_opened(batcher)
            try:
                yield batcher
            except BaseException as exc:
                body_error = exc
                batcher._abort()
                nursery.cancel_scope.cancel()
            else:
                batcher._close_intake()
        drained = body_error is None
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
    finally:
        batcher_closed(batcher, drained)
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
