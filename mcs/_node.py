"""Graph nodes: one unit of work, its dependencies, its outcome, and how it is awaited.

A node is deliberately a plain slotted record that the graph drives (see ``_graph.py``): it
knows how to be awaited and how to take a batcher's result, and nothing else. A call node *is*
its batcher's request record, which is how a batched call costs no task. The batcher owns the
slots ``item``, ``state``, ``t0`` and ``batch``; the node never reads or writes them except to
give ``item`` and ``t0`` their values before it is submitted.

A node's life (:class:`NodeState`)::

    PENDING --(dependencies resolved)--> RUNNING --(value, error or cancelled)--> FINISHED
       |                                                                              ^
       +------------------(cancelled: the graph failed or was cancelled)--------------+

An outcome is not a state: a FINISHED node's outcome (:class:`NodeOutcome`: VALUE, ERROR or
CANCELLED) is a field of its own, with ``_value`` or ``_error`` and ``_tb`` beside it. A
cancelled node keeps the reason in ``_error``/``_tb`` when there is one (the graph's first
error), so that ``await node`` raises it.

Errors are raised with :func:`mcs._park.reraise`: each raise restores the traceback the error
had when it reached the node, so a node read or awaited many times, or an error shared by many
nodes, never carries another caller's frames and never grows.
"""

from __future__ import annotations

import contextvars
import enum
import math
from collections.abc import Generator, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, enable_ki_protection

from ._park import park, reraise, wake
from ._requests import _Request
from ._trace import NodeKind

if TYPE_CHECKING:
    from ._graph import Graph

__all__ = ["Node", "NodeOutcome", "NodeState"]

T = TypeVar("T")


class NodeState(enum.IntEnum):
    """Where a node is in its life; see the diagram in the module docstring."""

    PENDING = 0  # waiting for dependencies
    RUNNING = 1  # started: in a batcher, or its task is running
    FINISHED = 2  # has an outcome


class NodeOutcome(enum.IntEnum):
    """How a FINISHED node ended."""

    VALUE = 0
    ERROR = 1
    CANCELLED = 2


# Aliases for the comparisons made on every node.
_PENDING: Final = NodeState.PENDING
_RUNNING: Final = NodeState.RUNNING
_FINISHED: Final = NodeState.FINISHED
_VALUE: Final = NodeOutcome.VALUE
_ERROR: Final = NodeOutcome.ERROR
_CANCELLED: Final = NodeOutcome.CANCELLED

_OUTCOME_NAMES: Final = ("value", "error", "cancelled")


class Node(_Request[Any, Any], Generic[T]):
    """One unit of work in a graph; ``await node`` gives its value or raises its error.

    Nodes are made by :meth:`Graph.call`, :meth:`Graph.call_many`, :meth:`Graph.apply`,
    :meth:`Graph.spawn` and :meth:`Graph.prime`. Passing
    a node as an argument of another makes it a dependency.

    Attributes:
        name: the node's name in traces and errors.
        start: when it started on trio's clock (``nan`` if it never did).
        end: when it finished on trio's clock (``nan`` while unfinished).
    """

    # Every object here is tracked by the cyclic GC while the request lives, and with tens of
    # thousands of live requests the collector's walks dominate: so no per-node lists or tuples
    # in the common shapes (one dependent is stored bare, the graph's nodes and its ready queue
    # are linked through the nodes themselves, dependencies are re-derived for traces), and no
    # reference cycle survives the request (see Graph._close).
    __slots__ = (
        "_after",
        "_args",
        "_dependents",
        "_error",
        "_fn",
        "_graph",
        "_kwargs",
        "_memo_key",
        "_memo_previous",
        "_next_ready",
        "_node_state",
        "_outcome",
        "_previous",
        "_tb",
        "_unresolved",
        "_value",
        "_waiters",
        "batch",
        "end",
        "item",
        "name",
        "start",
        "state",
        "t0",
    )
    kind: NodeKind = "call"

    def __init__(
        self,
        graph: Graph,
        name: str,
        fn: Any,
        args: Any,
        kwargs: dict[str, Any] | None,
    ) -> None:
        self._graph: Graph | None = graph
        self.name = name
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._after: tuple[Node[Any], ...] = ()
        self._node_state = _PENDING
        self._outcome = _VALUE  # meaningful once FINISHED
        self._unresolved = 0
        self._dependents: Node[Any] | list[Node[Any]] | None = None
        self._previous: Node[Any] | None = None
        self._next_ready: Node[Any] | None = None
        self._waiters: list[Task | None] | None = None
        # _value, _error and _tb are set when the node finishes, and read only then: left
        # unset here, three stores fewer per node on the hot path. Likewise _memo_key and
        # _memo_previous, set and read only on memoized call nodes (see _memo.py).
        self._value: T | None
        self._error: BaseException | None
        self._tb: TracebackType | None
        self._memo_key: Hashable
        self._memo_previous: Node[Any] | None
        self.batch: object = None  # the batcher's
        self.start = math.nan
        self.end = math.nan

    # ------------------------------------------------------------------ public

    @property
    def done(self) -> bool:
        """Whether the node has finished (with a value, an error, or cancelled)."""
        return self._node_state == _FINISHED

    @property
    def result(self) -> T:
        """The node's value once it is done.

        Raises:
            RuntimeError: if the node has not finished, or was cancelled.
            Exception: the node's own error, if it failed, with the traceback it failed with.
        """
        if self._node_state != _FINISHED:
            raise RuntimeError(f"node {self.name!r} has not finished yet; await it first")
        outcome = self._outcome
        if outcome == _VALUE:
            return self._value  # type: ignore[return-value]
        if outcome == _CANCELLED:
            raise RuntimeError(f"node {self.name!r} was cancelled before it finished")
        error, tb = self._error, self._tb
        assert error is not None
        del self  # no frame -> node -> error -> traceback -> frame cycle
        try:
            reraise(error, tb)
        finally:
            del error, tb

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    def __repr__(self) -> str:
        return f"<mcs.Node {self.name!r} {self.kind} {_outcome_name(self)}>"

    # ------------------------------------------------------------------ waiting

    async def _wait(self) -> T:
        if self._node_state == _FINISHED:
            await trio.lowlevel.checkpoint()
        else:
            await self._park_waiter()
        if self._outcome == _VALUE:
            return self._value  # type: ignore[return-value]
        error, tb = self._error, self._tb
        if error is None:  # cancelled from outside the graph
            raise RuntimeError(f"node {self.name!r} was cancelled before it finished")
        del self
        try:
            reraise(error, tb)  # its own error, or the graph error that cancelled it
        finally:
            del error, tb

    @enable_ki_protection
    async def _park_waiter(self) -> None:
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        index = len(waiters)
        waiters.append(current_task())

        def abort(_: RaiseCancelT) -> Abort:
            waiters[index] = None  # mark only: _wake_waiters skips it
            return Abort.SUCCEEDED

        await park(abort)

    @enable_ki_protection
    def _wake_waiters(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for task in waiters:
                if task is not None:
                    wake(task)

    def _dependencies(self) -> list[Node[Any]]:
        """The distinct nodes this node waits for, in argument order."""
        deps = [arg for arg in self._positional() if isinstance(arg, Node)]
        if self._kwargs:
            deps.extend(arg for arg in self._kwargs.values() if isinstance(arg, Node))
        if self._after:
            deps.extend(self._after)
        if len(deps) < 2 or (len(deps) == 2 and deps[0] is not deps[1]):
            return deps
        return list(dict.fromkeys(deps))

    def _positional(self) -> tuple[Any, ...]:
        """The positional arguments (a call node's is its item)."""
        return (self._args,)

    # ------------------------------------------------------------------ batcher protocol

    def _deliver_value(self, value: Any, now: float) -> None:
        """Resolve the node with ``value``: a batcher's result for a call node, or what an
        apply or spawned node returned. Then start the dependents it made ready.

        All in one function, no layers: it runs once per node of every request.
        """
        graph = self._graph
        if graph is None or self._node_state != _RUNNING:
            return
        self._value = value
        self._node_state = _FINISHED
        self.end = now
        if self._waiters is not None:
            self._wake_waiters()
        graph._unfinished -= 1
        if graph._unfinished == 0:
            graph._all_finished()
        dependents = self._dependents
        if dependents is None:
            return
        self._dependents = None
        try:
            if type(dependents) is list:
                for dependent in dependents:
                    dependent._unresolved -= 1
                    if dependent._unresolved == 0:
                        dependent._next_ready = graph._ready
                        graph._ready = dependent
                del dependent
            else:
                dependents._unresolved -= 1  # type: ignore[union-attr]
                if dependents._unresolved == 0:  # type: ignore[union-attr]
                    dependents._next_ready = graph._ready  # type: ignore[union-attr]
                    graph._ready = dependents  # type: ignore[assignment]
            if graph._ready is not None:
                graph._run_ready(now)
        finally:  # on the stack under apply functions: see GraphCore._run_ready
            del self, graph, value, dependents

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        graph = self._graph
        if graph is not None and self._node_state == _RUNNING:
            graph._fail(self, error, tb, now)

    def _request_contexts(self) -> list[contextvars.Context]:
        graph = self._graph  # a node belongs to the request task that opened its graph
        task = None if graph is None else graph._task
        return [] if task is None else [task.context]


class _ApplyNode(Node[T]):
    """An apply node; ``_args`` is the tuple of its positional arguments."""

    __slots__ = ()
    kind: NodeKind = "apply"

    def _positional(self) -> tuple[Any, ...]:
        return self._args  # type: ignore[no-any-return]


# The common applies take one or two positional arguments and no keywords. Kept in slots rather
# than in a tuple: a tuple that holds nodes is one more GC-tracked object per live request.


class _ApplyOne(_ApplyNode[T]):
    """An apply node with one positional argument, kept in ``_args`` itself."""

    __slots__ = ()

    def _positional(self) -> tuple[Any, ...]:
        return (self._args,)


class _ApplyTwo(_ApplyNode[T]):
    """An apply node with two positional arguments, in ``_args`` and ``_arg1``."""

    __slots__ = ("_arg1",)
    _arg1: Any

    def _positional(self) -> tuple[Any, ...]:
        return (self._args, self._arg1)


class _SpawnNode(Node[T]):
    __slots__ = ()
    kind: NodeKind = "spawn"

    def _positional(self) -> tuple[Any, ...]:
        return self._args  # type: ignore[no-any-return]


def _outcome_name(node: Node[Any]) -> str:
    """``"pending"``, ``"running"``, or the outcome of a finished node, for traces and reprs."""
    state = node._node_state
    if state == _FINISHED:
        return _OUTCOME_NAMES[node._outcome]
    return "pending" if state == _PENDING else "running"


def _substitute(value: Any) -> Any:
    return value._value if isinstance(value, Node) else value
