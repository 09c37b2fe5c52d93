"""Spawned nodes: the one kind of node that needs a task, and the nursery that hosts them.

The problem: ``Graph.spawn`` is a plain call, made from the block, from an apply function or
from whichever task resolved the node's last dependency (often a batcher's batch task), while a
nursery can only be opened with ``async with`` by the task that owns it. So the graph's nursery
is hosted by a task of its own, started the first time the graph spawns.

Where that task lives decides what spawned nodes see. A system task would outlive nothing
(the graph's exit waits for it) but would sit outside the request's task tree, see none of its
deadlines, and crash the whole run on a bug. So the host is started in the *request task's
parent nursery*, captured at graph entry: a sibling of the request task, in the request's own
tree, cancelled with it when that nursery is cancelled. It cannot outlive the request: the
graph's ``__aexit__`` (in the request task) waits for it, and the parent nursery is open as long
as the request task runs. Only a request task with no parent nursery (trio's init task) falls
back to a system task.

A sibling does not inherit the cancel scopes entered inside the request task, so the host's
nursery carries the request's deadline itself: the effective deadline of the cancel scopes
around the block (the graph's ``timeout`` included, scopes inside the block not), read when the
graph first spawns. ``trio.current_effective_deadline()`` in a spawned node is that deadline.
Reading it walks every enclosing scope (about 1.6 µs under a server's nurseries, 5% of a
three-call request), so the graph keeps only a reference to the request task's cancel status at
entry and only a graph that spawns pays for the walk. That status is trio's private
``Task._cancel_status``: the one place mcs reads a trio internal. Its presence is checked once
at import; on a trio without it the graph reads the deadline at entry instead (public API,
slower, same result). A deadline pushed back after the first spawn does not reach spawned nodes:
one cancelled by the old deadline fails the graph with :exc:`trio.TooSlowError` (see
``GraphCore._interrupted``), so the block never ends quietly with a node cancelled. The graph's
other cancellations (a failure, the request cancelled) cancel the host's nursery.

Every spawned node runs in a copy of the request task's ``contextvars`` context, as a task
started by the request would: tasks are started inside the request's ``context.run`` (or from
the request task itself), so trio copies that context, whichever task spawns them.

The host and spawned tasks catch every exception of the nodes (an error is the graph's, raised
by the block), so nothing reaches the parent nursery but a cancellation of that nursery itself.

The host's life (:class:`HostPhase`)::

    STARTING --(nursery open, queue started)--> HOSTING --(graph closed and finished)--> DONE
       |                                                                                  ^
       +-------------------------(cancelled from the parent nursery)----------------------+

What it costs (measured on the dev machine, CPython 3.11, trio 0.35, one request at a time): a
graph with one spawned node takes about 45 µs against 9 µs for one with an ``apply`` node, so
the first spawn costs about 36 µs (the host task, its nursery and deadline, the node's task);
each further spawned node about 9 µs (one task). The system-task host this replaced cost about
50 µs for the first spawn. A graph that never spawns pays nothing for any of this but keeping
one reference at entry.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, enable_ki_protection

from ._node import _RUNNING, _SpawnNode, _substitute
from ._park import park, raised_traceback, wake
from ._tracing import active_tracer, traced_spawn

if TYPE_CHECKING:
    from ._graph_core import GraphCore as Graph

__all__ = ["HostPhase", "SpawnHost"]


class HostPhase(enum.IntEnum):
    """Where a graph's spawn host is in its life; see the module docstring."""

    STARTING = 0
    HOSTING = 1
    DONE = 2


_STARTING: Final = HostPhase.STARTING
_HOSTING: Final = HostPhase.HOSTING
_DONE: Final = HostPhase.DONE


class SpawnHost:
    """The task that owns a graph's nursery for spawned nodes."""

    __slots__ = ("_graph", "_queue", "_task", "nursery", "phase")

    def __init__(self, graph: Graph, first: _SpawnNode[Any]) -> None:
        self._graph: Graph | None = graph
        self._queue: list[_SpawnNode[Any]] = [first]
        self._task: Task | None = None  # set while the host is parked
        self.nursery: trio.Nursery | None = None
        self.phase = _STARTING
        if graph._deadline is None:
            status = graph._entry_status
            graph._deadline = status.effective_deadline() if status is not None else math.inf
        name = f"mcs.Graph({graph.name}).nursery"
        parent = graph._task.parent_nursery if graph._task is not None else None
        if parent is not None:
            _in_request_context(graph, parent.start_soon, self._host, name=name)
        else:  # the init task: no tree to join
            assert graph._task is not None
            trio.lowlevel.spawn_system_task(
                self._host, name=name, context=graph._task.context.copy()
            )

    def start(self, node: _SpawnNode[Any]) -> bool:
        """Start ``node``'s task, or queue it until the nursery is open; False if it cannot
        start (the nursery is cancelled or closing)."""
        if self.phase == _STARTING:
            self._queue.append(node)
            return True
        nursery = self.nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            return False
        graph = self._graph
        assert graph is not None
        _in_request_context(graph, nursery.start_soon, _run_spawned, graph, node, name=node.name)
        return True

    def cancel(self) -> list[_SpawnNode[Any]]:
        """Cancel the nursery; return the queued nodes that never started."""
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
        queue, self._queue = self._queue, []
        return queue

    @enable_ki_protection
    def wake(self) -> None:
        """Let the host re-check whether the graph is finished."""
        task = self._task
        if task is not None:
            self._task = None
            wake(task)

    def _abort(self, _: RaiseCancelT) -> Abort:
        self._task = None
        return Abort.SUCCEEDED

    @enable_ki_protection
    async def _host(self) -> None:
        graph = self._graph
        assert graph is not None
        try:
            async with trio.open_nursery() as nursery:
                deadline = graph._deadline
                nursery.cancel_scope.deadline = math.inf if deadline is None else deadline
                self.nursery = nursery
                self.phase = _HOSTING
                queue, self._queue = self._queue, []
                for node in queue:
                    if not self.start(node):
                        graph._interrupted(node, trio.current_time())
                if graph._stopped:
                    nursery.cancel_scope.cancel()
                # Stay until the block is done and so is every node: until then the block or a
                # spawned task may spawn more.
                while True:
                    if graph._raise_cancel is not None and not graph._cancelled_all:
                        # The request was cancelled while parked in the short exit:
                        # its abort callback only marked that; the cancelling is done here.
                        graph._cancel_all(trio.current_time())
                    if graph._closing and not graph._unfinished:
                        break
                    self._task = current_task()
                    await park(self._abort)
                self.nursery = None  # closing: nothing may start in it any more
        finally:
            self.nursery = None
            self._task = None
            if graph._raise_cancel is not None and not graph._cancelled_all:
                # Cancelled itself (the entry deadline) in the same pass as the request, whose
                # exit left the cancelling to this task: do it on the way out.
                graph._cancel_all(trio.current_time())
            self.phase = _DONE
            self._graph = None
            graph._host_done()
            del graph


def _in_request_context(
    graph: Graph, start_soon: Callable[..., None], *args: Any, name: str
) -> None:
    """``start_soon(*args)`` from the request's context, which trio copies into the task."""
    task = graph._task
    assert task is not None
    if current_task() is task:
        start_soon(*args, name=name)
    else:
        task.context.run(start_soon, *args, name=name)


async def _run_spawned(graph: Graph, node: _SpawnNode[Any]) -> None:
    now = trio.current_time()
    node.start = now
    if node._node_state != _RUNNING:  # cancelled before its task got going
        return
    fn: Callable[..., Any] = node._fn
    if (tracer := active_tracer()) is not None:  # None unless OpenTelemetry tracing is on
        fn = traced_spawn(tracer, fn, node.name)
    args = [_substitute(arg) for arg in node._args]
    kwargs = {k: _substitute(v) for k, v in node._kwargs.items()} if node._kwargs else {}
    try:
        value = await fn(*args, **kwargs)
    except BaseException as exc:
        # Kept here and raised by the graph: a spawned node's error is the graph's error, and a
        # Cancelled means the graph cancelled its nursery (failure, request cancelled) or the
        # deadline passed, which the graph decides about.
        now = trio.current_time()
        if _is_cancellation(exc):
            graph._interrupted(node, now)
        else:
            graph._fail(node, exc, raised_traceback(exc), now)
    else:
        node._deliver_value(value, trio.current_time())
    finally:
        # This frame is on the error's traceback: hold nothing that leads back to the error.
        del graph, node, fn, args, kwargs


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False
