"""The engine of a graph: nodes counted, linked to their dependencies, started when ready.

This is the part of :class:`mcs.Graph` that runs without awaiting: adding a node, starting the
nodes whose dependencies resolved, taking a result or an error, cancelling. It is driven from
whichever task is at hand (the request task, a batcher's batch task, a spawned node's task),
never awaits, and never parks anything but through ``_park.py``. ``_graph.py`` holds the public
methods and the block (``__aenter__``/``__aexit__``) on top of it.

The block's common exit (no error in the block, nothing spawned, no ``timeout``) costs no object
of its own: the graph is the awaitable ``__aexit__`` returns, parks the request task with trio's
public ``wait_task_rescheduled`` and is itself the abort callback. Whoever finishes the last node
wakes the task (``_wake_exit``); a cancellation only marks (``__call__``); the task, as it
resumes, carries out what is left and raises what the block must raise (``_exit_resumed``).

Why a plain object and not a nursery: see ``_graph.py``. The shape of the data follows from the
garbage collector: nodes are linked backwards (``Node._previous``) and to their dependents (one
bare, or a list), the ready queue is a stack linked through the nodes, and every link points at
an older node, so a finished graph is freed by reference counting.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Coroutine, Generator, Iterable, Sequence
from types import TracebackType
from typing import Any, Final

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, enable_ki_protection

from ._node import (
    _CANCELLED,
    _ERROR,
    _FINISHED,
    _PENDING,
    _RUNNING,
    _VALUE,
    Node,
    _ApplyOne,
    _ApplyTwo,
    _SpawnNode,
    _substitute,
)
from ._park import park, raised_traceback, reraise, wake
from ._spawn import _DONE as _HOST_DONE
from ._spawn import SpawnHost

__all__ = ["GraphCore", "GraphPhase"]


class GraphPhase(enum.IntEnum):
    """Where a graph is in its life; see the diagram in the module docstring."""

    NEW = 0
    OPEN = 1
    CLOSED = 2


_NEW: Final = GraphPhase.NEW
_OPEN: Final = GraphPhase.OPEN
_CLOSED: Final = GraphPhase.CLOSED

# What awaiting the graph means (GraphCore._step): nothing, or the short exit.
_IDLE: Final = 0
_EXITING: Final = 1


class GraphCore:
    """The state of a graph and the code that runs its nodes; see :class:`mcs.Graph`."""

    __slots__ = (
        "_cancelled_all",
        "_closing",
        "_deadline",
        "_entry_status",
        "_error",
        "_error_tb",
        "_exit_waiter",
        "_host",
        "_last",
        "_last_memo",
        "_memo",
        "_memo_count",
        "_memo_on",
        "_parked",
        "_phase",
        "_raise_cancel",
        "_ready",
        "_scope",
        "_starting",
        "_step",
        "_stopped",
        "_task",
        "_thread",
        "_timeout",
        "_unfinished",
        "name",
        "start",
    )

    def __init__(self, timeout: float | None, name: str, memo: bool) -> None:
        self.name = name
        self._timeout = timeout
        # The memo (see _memo.py): a chain of memoized nodes while there are few, then a dict.
        self._memo_on = memo
        self._memo: dict[object, dict[Any, Node[Any]]] | None = None
        self._last_memo: Node[Any] | None = None
        self._memo_count = 0
        self._phase = _NEW
        # The nodes, linked backwards through Node._previous: like dependencies, these links
        # only point at older nodes, so the nodes of a finished graph hold no reference cycle
        # and are freed by reference counting, not by the cyclic GC.
        self._last: Node[Any] | None = None
        self._unfinished = 0
        self._error: BaseException | None = None  # the first failure, raised by the block
        self._error_tb: TracebackType | None = None
        self._stopped = False  # cancelled (by a failure or from outside): no node may start
        self._ready: Node[Any] | None = None  # a stack linked through Node._next_ready
        self._starting = False
        self._exit_waiter: Task | None = None
        self._scope: trio.CancelScope | None = None
        self._host: SpawnHost | None = None
        self._closing = False  # the block's body is done: no more nodes from it
        # The graph is its own awaitable for the block's common exit (see _graph.py): whether
        # it is in it (_step), and trio's park while it waits there.
        self._step = _IDLE
        self._parked: Coroutine[Any, Any, Any] | None = None
        self._raise_cancel: RaiseCancelT | None = None  # its cancellation, once aborted
        self._cancelled_all = False
        # Captured at entry: the request task (its context too) and the thread of its run.
        self._task: Task | None = None
        self._thread: int | None = None
        # The request's deadline for spawned nodes, read by the first spawn (see _spawn.py).
        self._deadline: float | None = None
        self._entry_status: Any = None
        self.start = math.nan

    def _append(self, node: Node[Any]) -> None:
        node._previous = self._last
        self._last = node
        self._unfinished += 1

    def _nodes(self) -> list[Node[Any]]:
        """The nodes in creation order."""
        nodes = []
        node = self._last
        while node is not None:
            nodes.append(node)
            node = node._previous
        nodes.reverse()
        return nodes

    def _add(
        self,
        node: Node[Any],
        after: Iterable[Node[Any]],
        deps: Sequence[Node[Any]] | None = None,
    ) -> None:
        """Link ``node`` to its dependencies, and start it if none is pending. ``deps``, when
        the caller knows them (distinct, no ``after``), saves working them out."""
        doomed = self._link(node, after, deps)
        try:
            if doomed:
                self._cancel(node, trio.current_time())
            elif node._unresolved == 0:
                self._push_ready(node)
                self._run_ready(trio.current_time())
        finally:
            del self, node, after

    def _link(
        self, node: Node[Any], after: Iterable[Node[Any]], deps: Sequence[Node[Any]] | None
    ) -> bool:
        """Add ``node`` to the graph and to its dependencies' dependents; True if one of them
        failed or was cancelled (or the graph was), so that the node can never run."""
        if after:
            node._after = tuple(after)
            for dep in node._after:
                if not isinstance(dep, Node):
                    raise TypeError(f"after must hold nodes, got {dep!r}")
        if deps is None:
            deps = node._dependencies()
        for dep in deps:
            if dep._graph is not self:
                raise ValueError(f"node {dep.name!r} belongs to another graph")
        self._append(node)
        doomed = self._stopped
        for dep in deps:
            if dep._node_state == _FINISHED:
                if dep._outcome != _VALUE:  # failed or cancelled: this node can never run
                    doomed = True
            else:
                node._unresolved += 1
                dependents = dep._dependents
                if dependents is None:
                    dep._dependents = node
                elif isinstance(dependents, list):
                    dependents.append(node)
                else:
                    dep._dependents = [dependents, node]
        return doomed

    # ------------------------------------------------------------------ running nodes

    def _push_ready(self, node: Node[Any]) -> None:
        node._next_ready = self._ready
        self._ready = node

    # A user function that raises leaves a traceback whose frames keep their callers' frames
    # (f_back) and, once those return, their locals. So every function that can be on the
    # stack under an apply function (_add, _run_ready, _run_apply, Node._deliver_value,
    # Graph.apply) deletes its locals before returning: a local left holding the graph or a
    # node would make a cycle node -> error -> traceback -> frame -> node.

    def _run_ready(self, now: float) -> None:
        """Start every ready node; iterative, so long chains of transforms cannot recurse."""
        if self._starting:
            return
        self._starting = True
        node: Node[Any] | None = None
        try:
            while self._ready is not None:
                node = self._ready
                self._ready = node._next_ready
                node._next_ready = None
                if node._node_state != _PENDING:
                    continue
                if self._stopped:
                    self._cancel(node, now)
                elif node.kind == "call":
                    self._start_call(node, now)
                elif node.kind == "apply":
                    self._run_apply(node, now)
                elif node.kind == "call_many":
                    node._start(self, now)  # type: ignore[attr-defined]
                else:
                    self._start_spawn(node, now)  # type: ignore[arg-type]
        finally:
            self._starting = False
            del self, node

    def _start_call(self, node: Node[Any], now: float) -> None:
        node._node_state = _RUNNING
        node.start = node.t0 = now
        node.item = _substitute(node._args)
        try:
            node._fn._submit_nowait(node)
        except Exception as exc:  # closed, overloaded, wrong run: the node fails like any other
            # An error of the batcher's own making: its traceback (mcs frames only) would keep
            # this call's frames, and the graph with them, alive.
            self._fail(node, exc.with_traceback(None), None, now)

    def _run_apply(self, node: Node[Any], now: float) -> None:
        node._node_state = _RUNNING
        node.start = now
        fn: Callable[..., Any] = node._fn
        task = self._task
        assert task is not None
        cls = type(node)
        first: Any = None
        second: Any = None
        args: Any = None
        value: Any = None
        try:
            if cls is _ApplyTwo:  # the common shapes first: no argument list to build
                first, second = node._args, node._arg1  # type: ignore[attr-defined]
                if isinstance(first, Node):
                    first = first._value
                if isinstance(second, Node):
                    second = second._value
                if current_task() is task:
                    value = fn(first, second)
                else:  # another task: run in the request's context, as the request would
                    value = task.context.run(fn, first, second)
            elif cls is _ApplyOne:
                first = _substitute(node._args)
                if current_task() is task:
                    value = fn(first)
                else:
                    value = task.context.run(fn, first)
            else:
                args = [_substitute(arg) for arg in node._args]
                if current_task() is not task:
                    args.insert(0, fn)
                    fn = task.context.run
                if node._kwargs:
                    value = fn(*args, **{k: _substitute(v) for k, v in node._kwargs.items()})
                else:
                    value = fn(*args)
        except BaseException as exc:  # it runs on someone else's task: never let it escape
            self._fail(node, exc, raised_traceback(exc), now)
        else:
            node._deliver_value(value, now)
        finally:
            del self, node, fn, task
            first = second = args = value = None

    def _fail(
        self, node: Node[Any], error: BaseException, tb: TracebackType | None, now: float
    ) -> None:
        node._error = error
        node._tb = tb
        node._outcome = _ERROR
        node._node_state = _FINISHED
        node.end = now
        node._dependents = None
        first = self._error is None
        if first:
            # Before _finished: this may be the node that ends the graph.
            self._error = error
            self._error_tb = tb
        self._finished(node)
        if first:
            self._cancel_all(now)

    def _finished(self, node: Node[Any]) -> None:
        if node._waiters:
            node._wake_waiters()
        self._unfinished -= 1
        if self._unfinished == 0:
            self._all_finished()

    def _all_finished(self) -> None:
        """The last unfinished node finished: wake whoever waits for the graph's end."""
        self._wake_exit()
        if self._closing and self._host is not None:
            self._host.wake()

    def _cancel(self, node: Node[Any], now: float) -> None:
        """Stop an unfinished node; a running spawned node finishes when its task does."""
        if node._node_state == _RUNNING:
            if node.kind == "spawn":
                return  # its task is cancelled with the graph's nursery
            if node.kind == "call":
                node._fn._withdraw(node)
            elif node.kind == "call_many":
                node._withdraw_all()  # type: ignore[attr-defined]
        node._node_state = _FINISHED
        node._outcome = _CANCELLED
        node._error = self._error  # the reason, if any: what `await node` raises
        node._tb = self._error_tb
        node.end = now
        node._dependents = None
        self._finished(node)

    def _cancel_all(self, now: float) -> None:
        self._stopped = True
        self._cancelled_all = True
        for node in self._nodes():
            if node._node_state != _FINISHED:
                self._cancel(node, now)
        if self._host is not None:
            for node in self._host.cancel():
                node._node_state = _PENDING  # never started: cancel it here
                self._cancel(node, now)

    # ------------------------------------------------------------------ spawned nodes

    def _start_spawn(self, node: _SpawnNode[Any], now: float) -> None:
        node._node_state = _RUNNING
        host = self._host
        if host is None:
            self._host = SpawnHost(self, node)
        elif not host.start(node):  # the nursery is cancelled or gone: the node cannot run
            self._interrupted(node, now)

    def _interrupted(self, node: _SpawnNode[Any], now: float) -> None:
        """A spawned node was cancelled, or could not start, because its nursery was."""
        if not self._stopped:
            # Not the graph's doing: the deadline of graph entry passed, or the parent nursery
            # was cancelled. The request task usually sees the same cancellation and raises it;
            # if it does not (a deadline pushed back after entry), the block must still not end
            # quietly with a node cancelled.
            if self._deadline is not None and now >= self._deadline:
                reason = f"graph {self.name!r} passed the deadline it was entered with"
            else:
                reason = f"graph {self.name!r} had its spawned nodes cancelled from outside"
            self._error = trio.TooSlowError(reason)
            self._error_tb = None
        node._node_state = _PENDING  # so that _cancel finishes it here
        self._cancel(node, now)
        if not self._stopped:
            self._cancel_all(now)

    def _host_done(self) -> None:
        self._wake_exit()

    def _host_running(self) -> bool:
        host = self._host
        return host is not None and host.phase != _HOST_DONE

    @enable_ki_protection
    def _wake_exit(self) -> None:
        task = self._exit_waiter
        if task is None:
            return
        if self._step != _EXITING:  # a waiter in __aexit__'s loop: it re-checks for itself
            self._exit_waiter = None
            wake(task)
            return
        if self._unfinished or self._host_running():
            return
        # Completing the short exit: the graph is finished, the block ends as the request
        # task resumes (_exit_resumed raises what it must, in that task).
        self._exit_waiter = None
        self._close()
        wake(task)

    def __call__(self, raise_cancel: RaiseCancelT) -> Abort:
        """Trio's abort callback while the request task is parked in the short exit.

        The graph itself, not a bound method or a callback object: either would be one more
        GC-tracked object per live request. Only marks: the graph is cancelled by the request
        task as it resumes (:meth:`_exit_resumed`), or, if spawned tasks must unwind first, by
        the spawn host's task, and the last one out wakes the request task.
        """
        task = self._exit_waiter
        assert task is not None
        self._stopped = True  # nothing starts from now on
        self._raise_cancel = raise_cancel
        if self._host is None:
            self._exit_waiter = None
            wake(task)
        else:
            self._host.wake()
        return Abort.FAILED

    # The graph as its own awaitable, for the short exit only (the entry's coroutine is short
    # lived, and cheaper than stepping an iterator): an iterator that delegates to trio's public
    # park, and raises the block's error itself once trio's frame has returned, so that no trio
    # frame holding the graph (its abort callback) ends up on the error's traceback.

    @enable_ki_protection
    def __await__(self) -> Generator[Any, Any, Any]:
        if self._step == _IDLE:
            raise TypeError(
                f"graph {self.name!r} cannot be awaited: use 'async with mcs.open_graph() as g'"
            )
        return self  # type: ignore[return-value]

    @enable_ki_protection
    def __next__(self) -> Any:
        return self.send(None)

    # The await protocol (``yield from`` sends trio's outcomes through ``send``); no docstring,
    # so that the reference does not list it: it is not for users. No ``throw`` or ``close``:
    # trio never throws into a task, and the park closes itself when collected.
    @enable_ki_protection
    def send(self, value: Any) -> Any:
        if self._step != _EXITING:
            self.__await__()  # raises: only the block's exit awaits the graph
        parked = self._parked
        if parked is None:
            parked = self._parked = park(self)  # type: ignore[assignment]
        try:
            return parked.send(value)  # type: ignore[union-attr]
        except StopIteration:
            pass
        self._parked = parked = value = None
        try:
            self._exit_resumed()
        finally:
            del self  # this frame is on the raised error's traceback
        raise StopIteration

    def _exit_resumed(self) -> None:
        """The request task resumed from the short exit: end the block, in that task.

        Raises the task's cancellation if it was cancelled in the exit (cancelling the graph
        first if nothing else did), else the graph's first error, if any.
        """
        self._step = _IDLE
        raise_cancel, self._raise_cancel = self._raise_cancel, None
        if raise_cancel is not None:
            if self._phase != _CLOSED:  # nothing spawned: the graph is cancelled here
                self._cancel_all(trio.current_time())
                self._close()
            del self
            try:
                raise_cancel()
            finally:
                del raise_cancel
        error, tb = self._error, self._error_tb
        if error is not None:
            del self
            try:
                reraise(error, tb)
            finally:
                del error, tb

    def _close(self) -> None:
        self._phase = _CLOSED
        self._task = self._entry_status = None
        self._memo = self._last_memo = None  # the memo dies with the graph
        node = self._last
        while node is not None:
            node._graph = None  # break node <-> graph cycles so the GC need not
            node = node._previous
