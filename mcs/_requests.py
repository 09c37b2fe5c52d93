"""Request records: one item on its way through a batcher, and its states.

A record is all a batcher keeps per item: a slotted object in a deque. A task that calls the
batcher parks on its own record (:class:`_Caller`) and is woken with ``reschedule``; a graph's
call node is a record itself and takes its result by callback. Either way the batcher sees only
the small protocol of :class:`_Request`.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from trio.lowlevel import Abort, RaiseCancelT, Task, reschedule

if TYPE_CHECKING:
    from ._batcher import Batcher

K = TypeVar("K")
V = TypeVar("V")

# The life of a request record. Plain ints: compared on every item.
_ROOM: Final = 0  # waiting for room in the queue (overload="block")
_QUEUED: Final = 1  # accepted, waiting for a batch
_IN_FLIGHT: Final = 2  # sent to batch_fn
_DONE: Final = 3  # result delivered
_WITHDRAWN: Final = 4  # cancelled before it was sent; never reaches batch_fn
_DROPPED: Final = 5  # cancelled while in flight; its result is discarded
_RAISED: Final = 6  # a caller's record whose delivered result is an error

class _Request(Generic[K, V]):
    """One item on its way through a batcher; subclasses say how its result is delivered.

    Subclasses define the slots ``item``, ``state`` and ``t0`` (the time of the call); a graph
    node is a subclass too, which is why the slots are not declared here (a class can have only
    one base with a non-empty slot layout).
    """

    if not TYPE_CHECKING:  # mypy would check subclass assignments against the empty layout
        __slots__ = ()
    item: K
    state: int
    t0: float

    def _deliver_value(self, value: V, now: float) -> None:
        raise NotImplementedError

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        raise NotImplementedError


class _Caller(_Request[K, V]):
    """A record for a task that called the batcher and is parked until its result arrives."""

    __slots__ = ("batcher", "item", "result", "state", "t0", "task", "tb")

    def __init__(self, batcher: Batcher[K, V], item: K, task: Task, t0: float) -> None:
        self.batcher = batcher
        self.item = item
        self.task: Task | None = task
        self.t0 = t0
        self.state = _QUEUED
        self.result: V | BaseException | None = None
        self.tb: TracebackType | None = None

    def _deliver_value(self, value: V, now: float) -> None:
        self.result = value
        task, self.task = self.task, None
        reschedule(task)  # type: ignore[arg-type]

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        self.result = error
        self.tb = tb
        self.state = _RAISED
        task, self.task = self.task, None
        reschedule(task)  # type: ignore[arg-type]

    def abort(self, _: RaiseCancelT) -> Abort:
        self.task = None
        self.batcher._withdraw(self)
        return Abort.SUCCEEDED

    def unwrap(self) -> V:
        if self.state != _RAISED:
            return self.result  # type: ignore[return-value]
        # Every caller of a failed batch raises the same exception object: reset its traceback
        # so that each one shows batch_fn's frames under its own, not under the previous
        # caller's. Drop our references so no frame-traceback cycle outlives the call.
        error = self.result
        assert isinstance(error, BaseException)
        self.result = None
        try:
            raise error.with_traceback(self.tb)
        finally:
            del error
            self.tb = None
