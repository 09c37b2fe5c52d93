"""Per-request task graphs: units of work that wait for their dependencies, then run.

The problem: a request is naturally a small DAG (load the user and their posts in parallel, then
render), and a service runs tens of thousands of them at once. Written the obvious way, a nursery
per request and a task per node, Trio spends most of its time creating tasks, cancel scopes and
GC-tracked objects: a 3-node graph runs at ~7k requests/s on one core.

The idea: most nodes do not need a task. A call through a batcher is a record in the batcher's
queue that gets its result by callback (it *is* the batcher's request record), and a pure
transform runs synchronously the moment its last dependency resolves. So a graph is a plain
object that counts unfinished nodes, and the request's own task parks once, at the end of the
block (or in ``await node``), until the count reaches zero. No nursery, no cancel scope, no task.

Only ``spawn`` (an arbitrary coroutine) needs a task. Its tasks live in a nursery that belongs to
the graph and is created the first time the graph spawns: because a nursery can only be opened
with ``async with`` in the task that owns it, and ``spawn`` is a plain call made from inside the
block, the graph hosts that nursery in a helper (system) task. The graph cancels that nursery
when it fails or when the request is cancelled (the request task sees a deadline or a cancel at
the end of the block or in ``await node``, and the graph passes it on at once), and its
``__aexit__`` waits for the nursery to finish, so no task ever outlives the block. Graphs that
never spawn never pay for it. One difference from a nursery opened in the request task: spawned
tasks do not see the request's deadline in ``trio.current_effective_deadline()``.

Failure policy. The first node to fail cancels every other node of the graph: pending nodes are
dropped, batched calls are withdrawn from their batchers (no other graph's calls are touched),
spawned tasks are cancelled. The block then raises that first error *itself*, never wrapped in an
exception group, so ``except TheirError`` just works. Later failures are consequences and are
kept only in :meth:`Graph.trace`. The block's own code is not interrupted by a node failure; it
sees it at its next ``await node`` or at the end of the block.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import types
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Final, TypeVar, overload

import outcome
import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule
from trio.lowlevel import wait_task_rescheduled as _park

from ._batcher import Batcher
from ._node import (
    _CANCELLED,
    _DONE,
    _FAILED,
    _OUTCOMES,
    _PENDING,
    _RUNNING,
    Node,
    _ApplyNode,
    _SpawnNode,
    _substitute,
)
from ._trace import GraphTrace, NodeTrace, _critical_path

__all__ = ["Graph", "Node", "open_graph"]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

# A graph's life.
_NEW: Final = 0
_OPEN: Final = 1
_CLOSED: Final = 2



class Graph:
    """A request's graph of nodes; made by :func:`mcs.open_graph`.

    Inside the block, :meth:`call`, :meth:`apply` and :meth:`spawn` add nodes. A node whose
    arguments include other nodes runs once those have resolved, with their values. The block
    does not exit until every node is done.
    """

    __slots__ = (
        "_closing",
        "_error",
        "_exit_waiter",
        "_host_running",
        "_host_task",
        "_last",
        "_nursery",
        "_phase",
        "_raise_cancel",
        "_ready",
        "_scope",
        "_short_exit",
        "_spawn_queue",
        "_starting",
        "_stopped",
        "_timeout",
        "_unfinished",
        "name",
        "start",
    )

    def __init__(self, *, timeout: float | None = None, name: str | None = None) -> None:
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
            if math.isnan(timeout) or timeout < 0:
                raise ValueError(f"timeout must be >= 0, got {timeout!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.name = name if name is not None else "graph"
        self._timeout = timeout
        self._phase = _NEW
        # The nodes, linked backwards through Node._previous: like dependencies, these links
        # only point at older nodes, so the nodes of a finished graph hold no reference cycle
        # and are freed by reference counting, not by the cyclic GC.
        self._last: Node[Any] | None = None
        self._unfinished = 0
        self._error: BaseException | None = None
        self._stopped = False  # cancelled (by a failure or from outside): no node may start
        self._ready: Node[Any] | None = None  # a stack linked through Node._next_ready
        self._starting = False
        self._exit_waiter: Task | None = None
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._spawn_queue: list[_SpawnNode[Any]] | None = None
        self._host_running = False
        self._host_task: Task | None = None
        self._closing = False  # the block's body is done: no more nodes from it
        self._raise_cancel: RaiseCancelT | None = None
        self._short_exit = False  # the request task is parked in the short __aexit__
        self.start = math.nan

    def __repr__(self) -> str:
        phase = ("new", "open", "closed")[self._phase]
        nodes = f"{len(self._nodes())} nodes, {self._unfinished} unfinished"
        return f"<mcs.Graph {self.name!r} {phase}: {nodes}>"

    # ------------------------------------------------------------------ building

    @overload
    def call(
        self,
        batcher: Batcher[K, V],
        item: Node[K],
        *,
        name: str | None = None,
        after: Iterable[Node[Any]] = (),
    ) -> Node[V]: ...

    @overload
    def call(
        self,
        batcher: Batcher[K, V],
        item: K,
        *,
        name: str | None = None,
        after: Iterable[Node[Any]] = (),
    ) -> Node[V]: ...

    def call(
        self,
        batcher: Batcher[K, V],
        item: K | Node[K],
        *,
        name: str | None = None,
        after: Iterable[Node[Any]] = (),
    ) -> Node[V]:
        """A node that sends ``item`` (or, if it is a node, its value) through ``batcher``.

        It costs no task: the node waits in the batcher's queue like any caller.

        Raises:
            TypeError: if ``batcher`` is not a :class:`mcs.Batcher`, or ``after`` holds a
                non-node.
            ValueError: if a dependency belongs to another graph.
            RuntimeError: if the graph is not open.
        """
        if self._phase != _OPEN:
            self._raise_not_open()
        if not isinstance(batcher, Batcher):
            raise TypeError(f"batcher must be a mcs.Batcher, got {batcher!r}")
        node: Node[V] = Node(self, name or batcher.name, batcher, item, None)
        if after or isinstance(item, Node) or self._stopped:
            self._add(node, after)
        else:  # the common case, kept short: no dependencies
            self._append(node)
            self._start_call(node, trio.current_time())
        return node

    def apply(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        name: str | None = None,
        after: Iterable[Node[Any]] = (),
        **kwargs: Any,
    ) -> Node[T]:
        """A node that calls the sync function ``fn`` with its arguments' values.

        It costs no task: ``fn`` runs the moment its last dependency resolves. Keep it quick
        and non-blocking; use :meth:`spawn` for anything that awaits.

        Raises:
            TypeError: if ``fn`` is an async function or not callable, or ``after`` holds a
                non-node.
            ValueError: if a dependency belongs to another graph.
            RuntimeError: if the graph is not open.
        """
        if self._phase != _OPEN:
            self._raise_not_open()
        if _is_async_function(fn) or not callable(fn):
            raise TypeError(f"apply needs a sync function (use spawn for async ones), got {fn!r}")
        node: Node[T] = _ApplyNode(self, name or _name_of(fn), fn, args, kwargs or None)
        self._add(node, after)
        return node

    def spawn(
        self,
        async_fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        name: str | None = None,
        after: Iterable[Node[Any]] = (),
        **kwargs: Any,
    ) -> Node[T]:
        """A node that runs ``await async_fn(*args, **kwargs)`` as a task of the graph.

        The task starts once its dependencies resolved, in a nursery owned by the graph, and is
        cancelled if the graph fails.

        Raises:
            TypeError: if ``async_fn`` is not an async function, or ``after`` holds a non-node.
            ValueError: if a dependency belongs to another graph.
            RuntimeError: if the graph is not open.
        """
        if self._phase != _OPEN:
            self._raise_not_open()
        if not _is_async_function(async_fn):
            raise TypeError(f"spawn needs an async function, got {async_fn!r}")
        node: Node[T] = _SpawnNode(self, name or _name_of(async_fn), async_fn, args, kwargs or None)
        self._add(node, after)
        return node

    def _raise_not_open(self) -> None:
        if self._phase == _NEW:
            raise RuntimeError(
                f"graph {self.name!r} is not open: use 'async with mcs.open_graph() as g'"
            )
        raise RuntimeError(f"graph {self.name!r} is closed")

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

    def _add(self, node: Node[Any], after: Iterable[Node[Any]]) -> None:
        """Link ``node`` to its dependencies, and start it if none is pending."""
        if after:
            node._after = tuple(after)
            for dep in node._after:
                if not isinstance(dep, Node):
                    raise TypeError(f"after must hold nodes, got {dep!r}")
        deps = node._dependencies()
        for dep in deps:
            if dep._graph is not self:
                raise ValueError(f"node {dep.name!r} belongs to another graph")
        self._append(node)
        doomed = self._stopped
        for dep in deps:
            status = dep._status
            if status > _DONE:  # failed or cancelled: this node can never run
                doomed = True
            elif status < _DONE:
                node._unresolved += 1
                dependents = dep._dependents
                if dependents is None:
                    dep._dependents = node
                elif isinstance(dependents, list):
                    dependents.append(node)
                else:
                    dep._dependents = [dependents, node]
        if doomed:
            self._cancel(node, trio.current_time())
        elif node._unresolved == 0:
            self._push_ready(node)
            self._run_ready(trio.current_time())

    # ------------------------------------------------------------------ running nodes

    def _push_ready(self, node: Node[Any]) -> None:
        node._next_ready = self._ready
        self._ready = node

    def _run_ready(self, now: float) -> None:
        """Start every ready node; iterative, so long chains of transforms cannot recurse."""
        if self._starting:
            return
        self._starting = True
        try:
            while self._ready is not None:
                node = self._ready
                self._ready = node._next_ready
                node._next_ready = None
                if node._status != _PENDING:
                    continue
                if self._stopped:
                    self._cancel(node, now)
                elif node.kind == "call":
                    self._start_call(node, now)
                elif node.kind == "apply":
                    self._run_apply(node, now)
                else:
                    self._start_spawn(node, now)  # type: ignore[arg-type]
        finally:
            self._starting = False

    def _start_call(self, node: Node[Any], now: float) -> None:
        node._status = _RUNNING
        node.start = node.t0 = now
        node.item = _substitute(node._args)
        try:
            node._fn._submit_nowait(node)
        except Exception as exc:  # closed or overloaded: the node fails like any other
            self._fail(node, exc, now)

    def _run_apply(self, node: Node[Any], now: float) -> None:
        node._status = _RUNNING
        node.start = now
        args = [_substitute(arg) for arg in node._args]
        try:
            if node._kwargs:
                value = node._fn(*args, **{k: _substitute(v) for k, v in node._kwargs.items()})
            else:
                value = node._fn(*args)
        except BaseException as exc:  # it runs on someone else's task: never let it escape
            self._fail(node, exc, now)
        else:
            self._resolve(node, value, now)

    def _resolve(self, node: Node[Any], value: Any, now: float) -> None:
        node._value = value
        node._status = _DONE
        node.end = now
        self._finished(node)
        dependents = node._dependents
        if dependents is not None:
            node._dependents = None
            if isinstance(dependents, list):
                for dependent in dependents:
                    dependent._unresolved -= 1
                    if dependent._unresolved == 0:
                        self._push_ready(dependent)
            else:
                dependents._unresolved -= 1
                if dependents._unresolved == 0:
                    self._push_ready(dependents)
            self._run_ready(now)

    def _fail(self, node: Node[Any], error: BaseException, now: float) -> None:
        node._error = error
        node._status = _FAILED
        node.end = now
        node._dependents = None
        first = self._error is None
        if first:
            self._error = error  # before _finished: this may be the node that ends the graph
        self._finished(node)
        if first:
            self._cancel_all(now)

    def _finished(self, node: Node[Any]) -> None:
        if node._waiters:
            node._wake_waiters()
        self._unfinished -= 1
        if self._unfinished == 0:
            self._wake_exit()
            if self._closing:
                self._wake_host()

    def _cancel(self, node: Node[Any], now: float) -> None:
        """Stop an unfinished node; a running spawned node finishes when its task does."""
        if node._status == _RUNNING:
            if node.kind == "spawn":
                return  # its task is cancelled with the graph's nursery
            if node.kind == "call":
                node._fn._withdraw(node)
        node._status = _CANCELLED
        node.end = now
        node._dependents = None
        self._finished(node)

    def _cancel_all(self, now: float) -> None:
        self._stopped = True
        for node in self._nodes():
            if node._status < _DONE:
                self._cancel(node, now)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        if self._spawn_queue:
            for node in self._spawn_queue:
                node._status = _PENDING  # never started: cancel it here
                self._cancel(node, now)
            self._spawn_queue.clear()

    # ------------------------------------------------------------------ spawned nodes

    def _start_spawn(self, node: _SpawnNode[Any], now: float) -> None:
        node._status = _RUNNING
        if self._nursery is not None:
            if self._nursery.cancel_scope.cancel_called:  # unwinding: the node cannot run
                node._status = _PENDING
                self._cancel(node, now)
                return
            self._nursery.start_soon(self._run_spawned, node, name=node.name)
        elif self._host_running:  # the nursery's task is on its way
            assert self._spawn_queue is not None
            self._spawn_queue.append(node)
        else:
            self._spawn_queue = [node]
            self._host_running = True
            trio.lowlevel.spawn_system_task(
                self._host,
                name=f"mcs.Graph({self.name}).nursery",
                context=contextvars.copy_context(),
            )

    async def _host(self) -> None:
        """Own the graph's nursery for spawned nodes until the graph is finished."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                queue, self._spawn_queue = self._spawn_queue or [], []
                for node in queue:
                    nursery.start_soon(self._run_spawned, node, name=node.name)
                if self._stopped:
                    nursery.cancel_scope.cancel()
                # Stay until the block is done and so is every node: until then the block or a
                # spawned task may spawn more.
                while not self._closing or self._unfinished:
                    self._host_task = current_task()
                    await _park(self._abort_host)
                self._nursery = None  # closing: nothing may start in it any more
        finally:
            self._nursery = None
            self._host_task = None
            self._host_running = False
            self._wake_exit()

    def _abort_host(self, _: RaiseCancelT) -> Abort:
        self._host_task = None
        return Abort.SUCCEEDED

    def _wake_host(self) -> None:
        task = self._host_task
        if task is not None:
            self._host_task = None
            reschedule(task)

    async def _run_spawned(self, node: _SpawnNode[Any]) -> None:
        now = trio.current_time()
        node.start = now
        if node._status != _RUNNING:  # cancelled before its task got going
            return
        args = [_substitute(arg) for arg in node._args]
        kwargs = {k: _substitute(v) for k, v in node._kwargs.items()} if node._kwargs else {}
        try:
            value = await node._fn(*args, **kwargs)
        except BaseException as exc:
            # Swallowed here and raised by the graph: a spawned node's error is the graph's
            # error, and a Cancelled means the graph's nursery was cancelled (failure or
            # deadline), which the request task sees for itself.
            now = trio.current_time()
            if _is_cancellation(exc):
                self._cancel_spawned(node, now)
            else:
                self._fail(node, exc, now)
        else:
            self._resolve(node, value, trio.current_time())

    def _cancel_spawned(self, node: _SpawnNode[Any], now: float) -> None:
        node._status = _CANCELLED
        node.end = now
        node._dependents = None
        self._finished(node)
        if not self._stopped:
            self._cancel_all(now)

    # ------------------------------------------------------------------ the block

    async def __aenter__(self) -> Graph:
        if self._phase != _NEW:
            raise RuntimeError(f"graph {self.name!r} was already entered; open a new one")
        self._phase = _OPEN
        self.start = trio.current_time()
        if self._timeout is not None:
            self._scope = trio.CancelScope(deadline=self.start + self._timeout)
            self._scope.__enter__()
        return self

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[bool | None]:
        self._closing = True
        if exc is None and self._unfinished and self._scope is None and not self._host_running:
            # The common case, with no coroutine of our own: park the request task directly;
            # whoever finishes the graph (the last node, or a cancellation) completes the exit
            # and hands the task its outcome. See _wake_exit and _abort_exit.
            self._exit_waiter = current_task()
            self._short_exit = True
            return _park(self._abort_exit)  # noqa: ASYNC105 - awaited by `async with`
        return self._exit(exc)

    async def _exit(self, exc: BaseException | None) -> bool:
        if not self._unfinished:
            self._wake_host()
        error = exc
        if error is None:
            try:
                await self._wait_finished()
            except BaseException as cancelled:  # Cancelled (deadline, timeout) or interrupt
                error = cancelled
        if error is not None and (self._unfinished or self._host_running):
            self._cancel_all(trio.current_time())
            with trio.CancelScope(shield=True):
                await self._wait_finished()
        self._close()
        if error is None:
            error = self._error
        scope = self._scope
        if scope is not None:
            self._scope = None
            if error is None:
                scope.__exit__(None, None, None)
            elif scope.__exit__(type(error), error, error.__traceback__):
                raise trio.TooSlowError(
                    f"graph {self.name!r} timed out after {self._timeout} s"
                ) from None
        if error is None or error is exc:
            return False  # the block's own exception propagates as it is
        try:
            raise error
        finally:
            del error

    async def _wait_finished(self) -> None:
        """Park the request task until every node and the spawn nursery are finished."""
        if not self._unfinished and not self._host_running:
            await trio.lowlevel.checkpoint()
            return
        while self._unfinished or self._host_running:
            self._exit_waiter = current_task()
            await _park(self._abort_wait)

    def _abort_wait(self, _: RaiseCancelT) -> Abort:
        self._exit_waiter = None
        return Abort.SUCCEEDED

    def _abort_exit(self, raise_cancel: RaiseCancelT) -> Abort:
        """The request task was cancelled while parked in the short ``__aexit__``."""
        task, self._exit_waiter = self._exit_waiter, None  # so that cancelling wakes no one
        self._cancel_all(trio.current_time())
        if self._unfinished or self._host_running:
            # Spawned tasks are still unwinding: stay parked; _wake_exit raises the Cancelled
            # into the task once they are gone, as a nursery would.
            self._exit_waiter = task
            self._raise_cancel = raise_cancel
            return Abort.FAILED
        self._short_exit = False
        self._close()
        return Abort.SUCCEEDED

    def _wake_exit(self) -> None:
        task = self._exit_waiter
        if task is None:
            return
        if not self._short_exit:  # a waiter in _wait_finished: it re-checks for itself
            self._exit_waiter = None
            reschedule(task)
            return
        if self._unfinished or self._host_running:
            return
        # Completing the short __aexit__: the graph is finished.
        self._exit_waiter = None
        self._short_exit = False
        self._close()
        raise_cancel, self._raise_cancel = self._raise_cancel, None
        if raise_cancel is not None:
            reschedule(task, outcome.capture(raise_cancel))
        elif self._error is not None:
            reschedule(task, outcome.Error(self._error))
        else:
            reschedule(task)  # __aexit__ returns None: nothing to swallow

    def _close(self) -> None:
        self._phase = _CLOSED
        node = self._last
        while node is not None:
            node._graph = None  # break node <-> graph cycles so the GC need not
            node = node._previous

    # ------------------------------------------------------------------ trace

    def trace(self) -> GraphTrace:
        """Every node's name, kind, dependencies, start and end times and outcome, with the
        critical path; ``print(g.trace())`` shows a text timeline."""
        nodes = self._nodes()
        index = {id(node): i for i, node in enumerate(nodes)}
        traces = tuple(
            NodeTrace(
                index=i,
                name=node.name,
                kind=node.kind,
                deps=tuple(index[id(dep)] for dep in node._dependencies()),
                start=node.start,
                end=node.end,
                outcome=_OUTCOMES[node._status],
                error=node._error,
            )
            for i, node in enumerate(nodes)
        )
        return GraphTrace(self.name, self.start, traces, _critical_path(traces))


Graph.__module__ = "mcs"


def _is_async_function(fn: object) -> bool:
    # Called for every apply and spawn: answer the common cases without inspect's slow path.
    code = getattr(fn, "__code__", None)
    if code is not None:  # a function or method
        return bool(code.co_flags & inspect.CO_COROUTINE)
    if isinstance(fn, _NEVER_ASYNC):
        return False
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


_NEVER_ASYNC: Final = (types.BuiltinFunctionType, types.MethodWrapperType, type)


def _name_of(fn: object) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False


def open_graph(*, timeout: float | None = None, name: str | None = None) -> Graph:
    """Open a graph for one request: ``async with mcs.open_graph() as g: ...``.

    Args:
        timeout: seconds the whole graph may take; past it, every unfinished node is cancelled
            and the block raises :exc:`trio.TooSlowError`. Enclosing deadlines apply too.
        name: a name for traces and errors.

    Returns:
        A :class:`Graph`, to be used once as an async context manager. The block raises the
        first node failure itself (not wrapped in an exception group) after cancelling the
        other nodes; see the module documentation for the full policy.

    Raises:
        TypeError, ValueError: for a bad ``timeout`` or ``name``.
    """
    return Graph(timeout=timeout, name=name)
