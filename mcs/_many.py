"""``await batcher.many(items)``: many items for one caller, errors as values.

DataLoader's ``loadMany``: the caller gets a list aligned with its items, where a failing item's
entry is its exception instead of the whole call failing. Each item is a request record of its
own (:class:`_ManyPart`), queued, batched, shared and withdrawn like any other; the caller's task
parks once, on :class:`_ManyCall`, and is woken when the last part is settled.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from threading import get_ident
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, enable_ki_protection

from ._exceptions import BatchResultError
from ._park import park, wake
from ._requests import _FINISHED, _QUEUED, _Request

if TYPE_CHECKING:
    from ._batcher import Batcher

__all__ = ["_ManyCall", "_ManyPart", "call_many"]

K = TypeVar("K")
V = TypeVar("V")


class _ManyCall:
    """One ``many`` call: its results so far and its parked task."""

    __slots__ = ("batcher", "parts", "remaining", "results", "task")

    def __init__(self, batcher: Batcher[Any, Any], task: Task, size: int) -> None:
        self.batcher: Batcher[Any, Any] | None = batcher
        self.task: Task | None = task
        self.results: list[Any] = [None] * size
        self.remaining = size
        self.parts: list[_ManyPart] = []

    def settle(self, index: int, outcome: Any) -> None:
        self.results[index] = outcome
        self.remaining -= 1
        if self.remaining == 0 and self.task is not None:
            task, self.task = self.task, None
            wake(task)

    def abort(self, _: RaiseCancelT) -> Abort:
        # Only marks: each withdrawal is O(1) marking; the batcher's dispatcher does the rest.
        self.task = None
        batcher = self.batcher
        assert batcher is not None
        for part in self.parts:
            if part.state != _FINISHED:
                batcher._withdraw(part)
        return Abort.SUCCEEDED


class _ManyPart(_Request[Any, Any]):
    """One item of a ``many`` call."""

    __slots__ = ("batch", "call", "index", "item", "state", "t0")

    def __init__(self, call: _ManyCall, index: int, item: Any, t0: float) -> None:
        self.call = call
        self.index = index
        self.item = item
        self.t0 = t0
        self.state = _QUEUED
        self.batch: Any = None

    def _deliver_value(self, value: Any, now: float) -> None:
        self.call.settle(self.index, value)

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        self.call.settle(self.index, error)

    def _request_contexts(self) -> list[contextvars.Context]:
        task = self.call.task
        return [] if task is None else [task.context]


@enable_ki_protection
async def call_many(batcher: Batcher[K, V], items: Iterable[K]) -> list[V | BaseException]:
    """:meth:`mcs.Batcher.many`: each item a record, the caller parked once for all of them."""
    items = list(items)
    intake = batcher._intake
    if intake.closed or get_ident() != batcher._thread:
        await batcher._refuse()
    call = _ManyCall(batcher, current_task(), len(items))
    now = batcher._clock.current_time()  # type: ignore[union-attr]
    for index, item in enumerate(items):
        part = _ManyPart(call, index, item, now)
        call.parts.append(part)
        if batcher._reject and intake.queued >= batcher._queue_size:
            part.state = _FINISHED
            batcher._counts.rejected += 1
            call.settle(index, batcher._refusal())
            continue
        try:
            batcher._admit(part)
        except BatchResultError as error:
            part.state = _FINISHED
            call.settle(index, error)
            del error
    if call.remaining:
        await park(call.abort)
    else:
        await trio.lowlevel.checkpoint()
    results, call.batcher = call.results, None
    return results
