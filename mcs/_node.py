"""Graph nodes: one unit of work, its dependencies, its outcome, and how it is awaited.

A node is deliberately a plain slotted record that the graph drives (see ``_graph.py``): it
knows how to be awaited and how to take a batcher's result, and nothing else. A call node *is*
its batcher's request record, which is how a batched call costs no task.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule
from trio.lowlevel import wait_task_rescheduled as _park

from ._requests import _Request
from ._trace import NodeKind

if TYPE_CHECKING:
    from ._graph import Graph

__all__ = ["Node"]

T = TypeVar("T")

# A node's life. A node is unfinished while its status is below _DONE.
_PENDING: Final = 0  # waiting for dependencies
_RUNNING: Final = 1  # started: in a batcher, or its task is running
_DONE: Final = 2
_FAILED: Final = 3
_CANCELLED: Final = 4
_OUTCOMES: Final = ("pending", "running", "value", "error", "cancelled")

class Node(_Request[Any, Any], Generic[T]):
    """One unit of work in a graph; ``await node`` gives its value or raises its error.

    Nodes are made by :meth:`Graph.call`, :meth:`Graph.apply` and :meth:`Graph.spawn`. Passing
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
        "_next_ready",
        "_previous",
        "_status",
        "_unresolved",
        "_value",
        "_waiters",
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
        self._status = _PENDING
        self._unresolved = 0
        self._dependents: Node[Any] | list[Node[Any]] | None = None
        self._previous: Node[Any] | None = None
        self._next_ready: Node[Any] | None = None
        self._waiters: list[Task] | None = None
        self._value: T | None = None
        self._error: BaseException | None = None
        self.start = math.nan
        self.end = math.nan

    # ------------------------------------------------------------------ public

    @property
    def done(self) -> bool:
        """Whether the node has finished (with a value, an error, or cancelled)."""
        return self._status >= _DONE

    @property
    def result(self) -> T:
        """The node's value once it is done.

        Raises:
            RuntimeError: if the node has not finished, or was cancelled.
            Exception: the node's own error, if it failed.
        """
        status = self._status
        if status == _DONE:
            return self._value  # type: ignore[return-value]
        if status == _FAILED:
            assert self._error is not None
            raise self._error
        if status == _CANCELLED:
            raise RuntimeError(f"node {self.name!r} was cancelled before it finished")
        raise RuntimeError(f"node {self.name!r} has not finished yet; await it first")

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    def __repr__(self) -> str:
        return f"<mcs.Node {self.name!r} {self.kind} {_OUTCOMES[self._status]}>"

    # ------------------------------------------------------------------ waiting

    async def _wait(self) -> T:
        if self._status >= _DONE:
            await trio.lowlevel.checkpoint()
        else:
            task = current_task()
            if self._waiters is None:
                self._waiters = [task]
            else:
                self._waiters.append(task)

            def abort(_: RaiseCancelT) -> Abort:
                if self._waiters is not None:
                    self._waiters.remove(task)
                return Abort.SUCCEEDED

            await _park(abort)
        if self._status == _CANCELLED:
            graph_error = self._graph._error if self._graph is not None else None
            if graph_error is not None:
                raise graph_error  # the reason this node was cancelled
        return self.result

    def _dependencies(self) -> list[Node[Any]]:
        """The distinct nodes this node waits for, in argument order."""
        if self.kind == "call":
            deps = [self._args] if isinstance(self._args, Node) else []
        else:
            deps = [arg for arg in self._args if isinstance(arg, Node)]
        if self._kwargs:
            deps.extend(arg for arg in self._kwargs.values() if isinstance(arg, Node))
        if self._after:
            deps.extend(self._after)
        if len(deps) < 2 or (len(deps) == 2 and deps[0] is not deps[1]):
            return deps
        return list(dict.fromkeys(deps))

    def _wake_waiters(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for task in waiters:
                reschedule(task)

    # ------------------------------------------------------------------ batcher protocol

    def _deliver_value(self, value: Any, now: float) -> None:
        graph = self._graph
        if graph is not None and self._status == _RUNNING:
            graph._resolve(self, value, now)

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        graph = self._graph
        if graph is not None and self._status == _RUNNING:
            graph._fail(self, error, now)


class _ApplyNode(Node[T]):
    __slots__ = ()
    kind: NodeKind = "apply"


class _SpawnNode(Node[T]):
    __slots__ = ()
    kind: NodeKind = "spawn"


Node.__module__ = "mcs"


def _substitute(value: Any) -> Any:
    return value._value if isinstance(value, Node) else value
