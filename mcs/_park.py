"""Parking and waking tasks: the one place mcs touches trio's lowest-level scheduling.

Why park at all: a call through a batcher, a graph node awaited, the end of a graph block all
wait for something another task will do. Trio's ready-made tools for that (``Event``, memory
channels) cost a task, an event or a channel hand-off per item, which is most of the cost of a
batched call. Parking the caller's own task with ``wait_task_rescheduled`` and waking it with
``reschedule`` costs neither: the waiting task *is* the waiter. Trio's ``ParkingLot`` works the
same way.

The guard rails this module keeps, so that the rest of the code cannot forget them:

- Every function that registers a task and then parks it, or wakes tasks in a loop, is marked
  with ``trio.lowlevel.enable_ki_protection`` (as trio marks ``ParkingLot.park`` and
  ``Event.set``): a KeyboardInterrupt between registering and parking would leave a record that
  points at a task that is no longer waiting. Since trio 0.27 the mark is a lookup keyed by code
  object, so it costs nothing per call.
- Abort callbacks only mark state and return; whatever the cancellation implies is done by a
  task afterwards (trio's advice for ``wait_task_rescheduled``).
- One exception object is often raised in many tasks (a batch-wide error, a shared "not found"
  sentinel, a failed node awaited twice). Raising it as it is would make each raise append the
  raising task's frames to the traceback the previous raise left behind: request k's traceback
  would show requests 0..k-1, and a sentinel would keep every caller's frames alive. So an error
  travels with the traceback it had when it first reached mcs, and each raise restores it
  (``raise error.with_traceback(tb)``, as asyncio's ``Future.result()`` does). Waking a parked
  task with an error uses :class:`Reraise`, whose ``unwrap`` runs in the woken task at the
  moment it resumes, so no other task's raise can slip in between.
"""

from __future__ import annotations

import dis
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, NoReturn

import outcome
from trio.lowlevel import (
    Abort,
    RaiseCancelT,
    Task,
    reschedule,
    wait_task_rescheduled,
)

__all__ = [
    "Reraise",
    "original_traceback",
    "park",
    "raised_traceback",
    "reraise",
    "wake",
    "wake_with",
    "wake_with_error",
]


def park(abort: Callable[[RaiseCancelT], Abort]) -> Awaitable[Any]:
    """Park the current task until :func:`wake` (or a cancellation, which calls ``abort``).

    Returns the awaitable directly (no coroutine of its own: this is on every batched call).
    The caller registers the task *before* calling this, in a KI-protected function.
    """
    return wait_task_rescheduled(abort)  # noqa: ASYNC105 - awaited by the caller


def wake(task: Task) -> None:
    """Resume a parked task; its ``await park(...)`` returns None."""
    reschedule(task)


def wake_with(task: Task, next_send: outcome.Outcome[Any]) -> None:
    """Resume a parked task with ``next_send``, whose ``unwrap`` runs in that task as it
    resumes: the way an abort callback hands work to the task it could not abort."""
    reschedule(task, next_send)


def wake_with_error(task: Task, error: BaseException, tb: TracebackType | None) -> None:
    """Resume a parked task by raising ``error`` in it, with traceback ``tb``."""
    reschedule(task, Reraise(error, tb))


def reraise(error: BaseException, tb: TracebackType | None) -> NoReturn:
    """Raise ``error`` with the traceback ``tb`` it had when it reached mcs.

    This function's frame marks every raise mcs makes: :func:`original_traceback` cuts a
    traceback back to what came before it.
    """
    try:
        raise error.with_traceback(tb)
    finally:
        del error, tb  # no frame -> traceback -> frame cycle


_RERAISE_CODE = reraise.__code__


def original_traceback(error: BaseException) -> TracebackType | None:
    """``error``'s traceback without the frames of callers that mcs raised it in before.

    A batch_fn may return the same exception object (a "not found" sentinel) for many items,
    batch after batch; each caller that raised it left its own frames on it.
    """
    tb = error.__traceback__
    entry = tb
    while entry is not None:
        if entry.tb_frame.f_code is _RERAISE_CODE:
            return entry.tb_next
        entry = entry.tb_next
    return tb


_RAISE_OPCODES = frozenset(dis.opmap[name] for name in ("RAISE_VARARGS", "RERAISE"))


def raised_traceback(error: BaseException) -> TracebackType | None:
    """``error``'s traceback from the raise that just reached mcs (out of a batch_fn, an apply or
    a spawned node), without what mcs's earlier raises of the same object left under it.

    Python puts a raise's frames on top of the traceback the object already has. A function
    that raises one exception object every time (a cached "circuit open") would hand each
    batch or request the frames of every caller before it, growing without end. So when the
    traceback holds a raise of mcs's, keep it down to the last raise point above that (an entry
    whose instruction is a raise, other than a re-raise in the frame that caught it). The kept
    entries are copied: the old ones are shared with earlier tracebacks. A traceback without a
    raise of mcs's, or without a raise point above it (an error that a batcher called from
    batch_fn delivered, propagating), is returned as it is.
    """
    tb = error.__traceback__
    entries: list[TracebackType] = []
    entry = tb
    while entry is not None:
        if entry.tb_frame.f_code is _RERAISE_CODE:
            break
        entries.append(entry)
        entry = entry.tb_next
    else:
        return tb
    below: TracebackType | None = entry
    for index in range(len(entries) - 1, -1, -1):
        entry = entries[index]
        code, lasti = entry.tb_frame.f_code.co_code, entry.tb_lasti
        raises_here = 0 <= lasti < len(code) and code[lasti] in _RAISE_OPCODES
        if raises_here and (below is None or below.tb_frame is not entry.tb_frame):
            keep = index + 1
            break
        below = entry
    else:  # no raise above mcs's: the error came through mcs (a batcher called by batch_fn)
        return tb
    copied = None
    for entry in reversed(entries[:keep]):
        copied = TracebackType(copied, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return copied


class Reraise(outcome.Outcome[NoReturn]):
    """An outcome that raises ``error`` with traceback ``tb`` in the task that unwraps it."""

    __slots__ = ("_error", "_tb")

    def __init__(self, error: BaseException, tb: TracebackType | None) -> None:
        self._unwrapped = False
        self._error: BaseException | None = error
        self._tb = tb

    def unwrap(self) -> NoReturn:
        self._set_unwrapped()
        error, tb = self._error, self._tb
        self._error = self._tb = None
        assert error is not None
        try:
            reraise(error, tb)
        finally:
            del error, tb, self

    def send(self, gen: Generator[Any, NoReturn, object]) -> Any:
        self._set_unwrapped()
        error, self._error = self._error, None
        assert error is not None
        return gen.throw(error.with_traceback(self._tb))

    async def asend(self, agen: AsyncGenerator[Any, NoReturn]) -> Any:
        self._set_unwrapped()
        error, self._error = self._error, None
        assert error is not None
        return await agen.athrow(error.with_traceback(self._tb))
