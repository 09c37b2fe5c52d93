"""Request records: one item on its way through a batcher, and its states.

A record is all a batcher keeps per item: a slotted object in a deque. A task that calls the
batcher parks on its own record (:class:`_Caller`) and is woken by :func:`mcs._park.wake`; a
graph's call node is a record itself and takes its result by callback. Either way the batcher
sees only the small protocol of :class:`_Request`.

The life of a record (:class:`RequestState`)::

    ROOM ──────► QUEUED ──────► IN_FLIGHT ──────► FINISHED
      │            │                │             (a value or an error was delivered)
      │            │                └───────────► DROPPED    (caller left; result discarded)
      └────────────┴────────────────────────────► WITHDRAWN  (caller left; never sent)

    JOINED ─────────────────────────────────────► FINISHED / WITHDRAWN (caller left)

ROOM is a caller waiting for room in a full queue (``overload="block"``). JOINED is a caller
whose item shares one downstream item with other callers' equal items (``dedupe=True``, see
``_shared.py``): the shared item goes through the states above, its callers wait JOINED. Only
the batcher moves a record between states; the outcome (value or error) is kept beside the
state, not in it.
"""

from __future__ import annotations

import contextvars
import enum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from trio.lowlevel import Abort, RaiseCancelT, Task

from ._park import reraise, wake

if TYPE_CHECKING:
    from ._batcher import Batcher

K = TypeVar("K")
V = TypeVar("V")


class RequestState(enum.IntEnum):
    """Where a request record is in its batcher."""

    ROOM = 0
    QUEUED = 1
    IN_FLIGHT = 2
    FINISHED = 3
    WITHDRAWN = 4
    DROPPED = 5
    JOINED = 6


# Aliases for the hot path: a module global costs the same as a bare int to compare.
_ROOM: Final = RequestState.ROOM
_QUEUED: Final = RequestState.QUEUED
_IN_FLIGHT: Final = RequestState.IN_FLIGHT
_FINISHED: Final = RequestState.FINISHED
_WITHDRAWN: Final = RequestState.WITHDRAWN
_DROPPED: Final = RequestState.DROPPED
_JOINED: Final = RequestState.JOINED


class _Request(Generic[K, V]):
    """One item on its way through a batcher; subclasses say how its result is delivered.

    Subclasses define the slots ``item``, ``state``, ``t0`` (the time of the call) and
    ``batch`` (the running batch that carries it, kept only when the batcher needs it); a graph
    node is a subclass too, which is why the slots are not declared here (a class can have only
    one base with a non-empty slot layout).
    """

    if not TYPE_CHECKING:  # mypy would check subclass assignments against the empty layout
        __slots__ = ()
    item: K
    state: int
    t0: float
    batch: Any

    def _deliver_value(self, value: V, now: float) -> None:
        raise NotImplementedError

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        raise NotImplementedError

    def _request_contexts(self) -> list[contextvars.Context]:
        """The contexts of the requests still waiting for this item (tracing reads each
        caller's span there). Not on the hot path: called only when something observes it."""
        raise NotImplementedError


class _Caller(_Request[K, V]):
    """A record for a task that called the batcher and is parked until its result arrives."""

    __slots__ = ("batch", "batcher", "error", "item", "state", "t0", "task", "tb", "value")

    def __init__(self, batcher: Batcher[K, V], item: K, task: Task, t0: float) -> None:
        self.batcher = batcher
        self.item = item
        self.task: Task | None = task
        self.t0 = t0
        self.state = _QUEUED
        self.batch: Any = None
        self.value: V | None = None
        self.error: BaseException | None = None
        self.tb: TracebackType | None = None

    def _deliver_value(self, value: V, now: float) -> None:
        self.value = value
        task, self.task = self.task, None
        wake(task)  # type: ignore[arg-type]

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        self.error = error
        self.tb = tb
        task, self.task = self.task, None
        wake(task)  # type: ignore[arg-type]

    def _request_contexts(self) -> list[contextvars.Context]:
        task = self.task  # the caller itself, parked: its context is as it was at the call
        return [] if task is None else [task.context]

    def abort(self, _: RaiseCancelT) -> Abort:
        # Only marks state: whatever the withdrawal implies is done by the batcher's task.
        self.task = None
        self.batcher._withdraw(self)
        return Abort.SUCCEEDED

    def unwrap(self) -> V:
        error = self.error
        if error is None:
            return self.value  # type: ignore[return-value]
        # Every caller of a failed batch raises the same exception object: each raise starts
        # from batch_fn's traceback, never from where the previous caller left it. Drop our
        # references so that no frame -> traceback -> frame cycle outlives the call.
        tb, self.error, self.tb = self.tb, None, None
        try:
            reraise(error, tb)
        finally:
            del error, tb
