"""``await batcher.many(items)``: many items for one caller, errors as values.

DataLoader's ``loadMany``: the caller gets a list aligned with its items, where a failing item's
entry is its exception instead of the whole call failing. Each item is a request record of its
own (:class:`_ManyPart`), queued, batched, shared and withdrawn like any other; the caller's task
parks once, on :class:`_ManyCall`, and is woken when the last part is settled.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from trio.lowlevel import Abort, RaiseCancelT, Task

from ._park import wake
from ._requests import _FINISHED, _QUEUED, _Request

if TYPE_CHECKING:
    from ._batcher import Batcher

__all__ = ["_ManyCall", "_ManyPart"]


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
