"""Per-request task graphs: units of work that wait for their dependencies, then run.

The problem: a request is naturally a small DAG (load the user and their posts in parallel, then
render), and a service runs tens of thousands of them at once. Written the obvious way, a nursery
per request and a task per node, Trio spends most of its time creating tasks, cancel scopes and
GC-tracked objects: a 3-node graph runs at ~7k requests/s on one core.

The idea: most nodes do not need a task. A call through a batcher is a record in the batcher's
queue that gets its result by callback (it *is* the batcher's request record, see
``_node.py``), and a pure transform runs synchronously the moment its last dependency resolves.
So a graph is a plain object that counts unfinished nodes, and the request's own task parks
once, at the end of the block (or in ``await node``), until the count reaches zero. No nursery,
no cancel scope, no task.

Where code runs. An ``apply`` function runs in the task that resolved its last dependency: a
batcher's batch task (a slow one delays the rest of that batch's results, for every request in
it, and everything else that task does next), a spawned node's task, or the request task. It
runs in the request task's ``contextvars`` context, whichever task that is: the request's own
context object (not a copy, which would cost a GC-tracked object per request), so it sees what
the request's code would see at that moment, and what it sets, the request sees. Only
``spawn`` (an arbitrary coroutine) needs a task: see ``_spawn.py`` for where those tasks live
(in the request's task tree, under the request's deadline) and what they cost. Graphs that never
spawn never pay for it.

Failure policy. The first node to fail cancels every other node of the graph: pending nodes are
dropped, batched calls are withdrawn from their batchers (no other graph's calls are touched),
spawned tasks are cancelled. The block then raises that first error *itself*, never wrapped in an
exception group and with the traceback it failed with, so ``except TheirError`` just works.
Later failures are consequences and are kept only in :meth:`Graph.trace`. The block's own code is
not interrupted by a node failure; it sees it at its next ``await node`` or at the end of the
block. When the request task is cancelled (a deadline, the graph's ``timeout``, a
KeyboardInterrupt), the graph cancels its nodes from the request task, at the end of the block,
and waits (shielded) for spawned tasks to finish, as a nursery would.

No garbage cycles. An error's traceback holds the frames it passed through; a frame that also
held the graph or a node would make a cycle error -> traceback -> frame -> node -> error, left
to the cyclic GC, per failed request. So every frame that catches or raises a node's error
deletes its locals before it ends, and closing a graph breaks every node -> graph link.

A graph's life (:class:`GraphPhase`)::

    NEW --(async with: __aenter__)--> OPEN --(__aexit__: every node and spawned task done)--> CLOSED

A node's life is in ``_node.py``, the spawn host's in ``_spawn.py``.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Awaitable, Callable, Hashable, Iterable
from threading import get_ident
from types import TracebackType
from typing import Any, Final, TypeVar, overload

import trio
from trio.lowlevel import (
    Abort,
    RaiseCancelT,
    current_task,
    enable_ki_protection,
)

from ._batcher import Batcher
from ._graph_core import _CLOSED, _EXITING, _NEW, _OPEN, GraphCore, GraphPhase
from ._graph_many import _ManyNode
from ._memo import NO_KEY, SCAN_LIMIT, memo_add, memo_drop, memo_find, memo_key
from ._node import (
    _ERROR,
    _FINISHED,
    _RUNNING,
    Node,
    _ApplyNode,
    _ApplyOne,
    _ApplyTwo,
    _outcome_name,
    _SpawnNode,
)
from ._park import park, reraise
from ._trace import GraphTrace, NodeTrace, _critical_path
from ._util import check_seconds, needs_trio

__all__ = ["Graph", "GraphPhase", "Node", "open_graph"]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


class Graph(GraphCore):
    """A request's graph of nodes; made by :func:`mcs.open_graph`.

    Inside the block, :meth:`call`, :meth:`call_many`, :meth:`apply` and :meth:`spawn` add
    nodes. A node whose arguments include other nodes runs once those have resolved, with their
    values. The block does not exit until every node is done. The graph's memo (on unless
    opened with ``memo=False``) makes a repeated call one node: see :meth:`call`,
    :meth:`prime` and :meth:`forget`.
    """

    __slots__ = ()

    def __init__(
        self, *, timeout: float | None = None, name: str | None = None, memo: bool = True
    ) -> None:
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        if name is None:
            name = "graph"
        elif not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        if memo is not True and memo is not False:
            raise TypeError(f"memo must be a bool, got {memo!r}")
        GraphCore.__init__(self, timeout, name, memo)  # once per request: no super() lookup

    def __repr__(self) -> str:
        phase = self._phase.name.lower()
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

        With the graph's memo on (the default), a plain item already called through
        ``batcher`` in this graph gives the node of that first call, and nothing is sent again;
        items match by the batcher's key function if it has one, else by equality. A call
        whose item is a node, or that has ``after``, is neither looked up nor memoized, and
        neither is an unhashable item. A memoized node that failed stays memoized: its failure
        is the graph's anyway.

        Raises:
            TypeError: if ``batcher`` is not a :class:`mcs.Batcher`, or ``after`` holds a
                non-node.
            ValueError: if a dependency belongs to another graph.
            RuntimeError: if the graph is not open, or is used from another trio run.
        """
        if self._phase != _OPEN or get_ident() != self._thread:
            self._refuse()
        if not isinstance(batcher, Batcher):
            raise TypeError(f"batcher must be a mcs.Batcher, got {batcher!r}")
        if after or isinstance(item, Node):
            node: Node[V] = Node(self, name or batcher.name, batcher, item, None)
            self._add(node, after, None if after else (item,))  # type: ignore[arg-type]
            return node
        # The common case, kept short: no dependencies; the memo's chain inlined (_memo.py).
        key: Hashable = NO_KEY
        if self._memo_on:
            if batcher._key is None:
                try:
                    hash(item)
                except TypeError:
                    pass
                else:
                    key = item
            else:
                key = memo_key(batcher, item)
            if key is not NO_KEY:
                if self._memo is None:
                    found = self._last_memo
                    while found is not None:
                        if found._fn is batcher:
                            other = found._memo_key
                            if other is key or other == key:
                                return found
                        found = found._memo_previous
                else:
                    found = memo_find(self, batcher, key)
                    if found is not None:
                        return found
        node = Node(self, name or batcher.name, batcher, item, None)
        if key is not NO_KEY:
            if self._memo is None and self._memo_count < SCAN_LIMIT:
                node._memo_key = key
                node._memo_previous = self._last_memo
                self._last_memo = node
                self._memo_count += 1
            else:
                memo_add(self, batcher, key, node)
        if self._stopped:
            self._add(node, after)
            return node
        node._previous = self._last  # GraphCore._append and _start_call, inlined
        self._last = node
        self._unfinished += 1
        node._node_state = _RUNNING
        node.start = node.t0 = now = trio.current_time()
        node.item = item
        try:
            batcher._submit_nowait(node)
        except Exception as exc:  # as in GraphCore._start_call
            self._fail(node, exc.with_traceback(None), None, now)
        return node

    def call_many(
        self,
        batcher: Batcher[K, V],
        keys: Iterable[K],
        *,
        name: str | None = None,
        after: Iterable[Node[Any]] = (),
    ) -> Node[list[V | BaseException]]:
        """A node that sends every item of ``keys`` through ``batcher``, errors as values.

        It resolves to a list aligned with ``keys``: each entry is that item's value, or, if
        the item failed (its own error, its batch's, the batcher refusing it), the exception
        object. A failing item is not a failure of the node or of the graph (DataLoader's
        ``loadMany``); the graph's failure policy is unchanged for every other node.

        ``keys`` is a collection of plain items, read once, here; none may be a node (to call
        with items another node computes, make the call from an apply or a spawned node). It
        costs no task: one request record per item in the batcher, like a call node, all
        withdrawn if the graph is cancelled. With the memo on, an item already memoized in the
        graph takes that node's value (it waits for that node if it is still running), and an
        item repeated in ``keys`` is sent once; the items sent are not added to the memo.

        Raises:
            TypeError: if ``batcher`` is not a :class:`mcs.Batcher`, ``keys`` holds a node, or
                ``after`` holds a non-node.
            ValueError: if a dependency belongs to another graph.
            RuntimeError: if the graph is not open, or is used from another trio run.
        """
        if self._phase != _OPEN or get_ident() != self._thread:
            self._refuse()
        if not isinstance(batcher, Batcher):
            raise TypeError(f"batcher must be a mcs.Batcher, got {batcher!r}")
        items = list(keys)
        waits: list[Node[Any]] = []  # memoized nodes still running: the node waits for them
        for index, item in enumerate(items):
            if isinstance(item, Node):
                raise TypeError(f"keys must hold plain items, got a node at index {index}")
            if self._memo_on:
                key = memo_key(batcher, item)
                if key is not NO_KEY:
                    found = memo_find(self, batcher, key)
                    if found is not None and not found.done and found not in waits:
                        waits.append(found)
        node: Node[list[V | BaseException]] = _ManyNode(
            self, name or f"{batcher.name}[{len(items)}]", batcher, (items, *waits), None
        )
        self._add(node, after)
        return node

    def prime(
        self, batcher: Batcher[K, V], item: K, value: V, *, name: str | None = None
    ) -> Node[V]:
        """Seed the graph's memo: a node already resolved to ``value`` for ``item``.

        Later calls of ``item`` through ``batcher`` in this graph give this node, and nothing
        is sent. If ``item`` is memoized already, nothing changes and its node is returned (as
        DataLoader's ``prime``; :meth:`forget` it first to replace it). ``value`` is the value
        as it is, even if it is an exception object.

        Raises:
            TypeError: if ``batcher`` is not a :class:`mcs.Batcher`, or ``item`` is a node or
                cannot be memoized (unhashable, or the batcher's key function fails on it).
            RuntimeError: if the graph has no memo (``memo=False``), is not open, or is used
                from another trio run.
        """
        if self._phase != _OPEN or get_ident() != self._thread:
            self._refuse()
        key = self._memo_key_of(batcher, item, "prime")
        if key is NO_KEY:
            raise TypeError(f"prime needs an item that can be memoized, got {item!r}")
        found = memo_find(self, batcher, key)
        if found is not None:
            return found
        node: Node[V] = Node(self, name or batcher.name, batcher, item, None)
        node.item = item
        node._value = value
        node._node_state = _FINISHED
        node.start = node.end = trio.current_time()
        node._previous = self._last  # in the graph's nodes, never unfinished
        self._last = node
        memo_add(self, batcher, key, node)
        return node

    def forget(self, batcher: Batcher[K, V], item: K) -> bool:
        """Drop ``item`` from the graph's memo, so that the next call of it sends it again.

        Nodes made for it before keep their outcome. Returns whether ``item`` was memoized.

        Raises:
            TypeError: if ``batcher`` is not a :class:`mcs.Batcher`, or ``item`` is a node.
            RuntimeError: if the graph has no memo (``memo=False``), is not open, or is used
                from another trio run.
        """
        if self._phase != _OPEN or get_ident() != self._thread:
            self._refuse()
        key = self._memo_key_of(batcher, item, "forget")
        return key is not NO_KEY and memo_drop(self, batcher, key)

    def _memo_key_of(self, batcher: object, item: object, method: str) -> Hashable:
        if not isinstance(batcher, Batcher):
            raise TypeError(f"batcher must be a mcs.Batcher, got {batcher!r}")
        if not self._memo_on:
            raise RuntimeError(f"graph {self.name!r} has no memo: it was opened with memo=False")
        if isinstance(item, Node):
            raise TypeError(f"{method} needs a plain item, got node {item.name!r}")
        return memo_key(batcher, item)

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

        It costs no task: ``fn`` runs synchronously the moment its last dependency resolves,
        *in the task that resolved it*, and blocks that task until it returns:

        - a batcher's batch task, when that dependency is a call: the rest of that batch's
          callers, in every request, get their results only once ``fn`` returns (and so do
          the applies that wait on them), and the batch task ends no sooner;
        - a spawned node's task, when that dependency is a spawned node;
        - the request task itself, inside ``apply`` when no dependency is pending.

        Wherever it runs, it runs in the request task's ``contextvars`` context. Keep it quick
        and non-blocking; use :meth:`spawn` for anything slow or that awaits.

        Raises:
            TypeError: if ``fn`` is an async function or not callable, or ``after`` holds a
                non-node.
            ValueError: if a dependency belongs to another graph.
            RuntimeError: if the graph is not open, or is used from another trio run.
        """
        if self._phase != _OPEN or get_ident() != self._thread:
            self._refuse()
        if _is_async_function(fn) or not callable(fn):
            raise TypeError(f"apply needs a sync function (use spawn for async ones), got {fn!r}")
        name = name or _name_of(fn)
        node: Node[T]
        deps: tuple[Node[Any], ...] | None = None  # worked out here for the common shapes
        if kwargs or len(args) > 2:
            node = _ApplyNode(self, name, fn, args, kwargs or None)
        elif len(args) == 2:  # arguments in slots: no tuple of nodes kept per request
            first, second = args
            node = _ApplyTwo(self, name, fn, first, None)
            node._arg1 = second
            if not after:
                if isinstance(first, Node):
                    deps = (
                        (first, second)
                        if isinstance(second, Node) and second is not first
                        else (first,)
                    )
                else:
                    deps = (second,) if isinstance(second, Node) else ()
            del first, second
        elif args:
            node = _ApplyOne(self, name, fn, args[0], None)
            if not after:
                deps = (args[0],) if isinstance(args[0], Node) else ()
        else:
            node = _ApplyNode(self, name, fn, (), None)
        try:
            self._add(node, after, deps)
            return node
        finally:  # on the stack under fn when it runs at once: see GraphCore._run_ready
            del self, node, args, kwargs, after, deps

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

        The task starts once its dependencies resolved, in a nursery owned by the graph that
        lives in the request's task tree (see ``_spawn.py``). It runs in a copy of the request
        task's ``contextvars`` context, under the request's deadline (that of the scopes around
        the block, which includes the graph's ``timeout``), and is cancelled if the graph fails
        or the request is cancelled.

        Raises:
            TypeError: if ``async_fn`` is not an async function, or ``after`` holds a non-node.
            ValueError: if a dependency belongs to another graph.
            RuntimeError: if the graph is not open, or is used from another trio run.
        """
        if self._phase != _OPEN or get_ident() != self._thread:
            self._refuse()
        if not _is_async_function(async_fn):
            raise TypeError(f"spawn needs an async function, got {async_fn!r}")
        node: Node[T] = _SpawnNode(self, name or _name_of(async_fn), async_fn, args, kwargs or None)
        self._add(node, after)
        return node

    def _refuse(self) -> None:
        if self._phase == _NEW:
            raise RuntimeError(
                f"graph {self.name!r} is not open: use 'async with mcs.open_graph() as g'"
            )
        if self._phase == _CLOSED:
            raise RuntimeError(f"graph {self.name!r} is closed")
        raise RuntimeError(
            f"graph {self.name!r} belongs to another trio run; use it only in the run that "
            "opened it"
        )

    # ------------------------------------------------------------------ the block

    async def __aenter__(self) -> Graph:
        if self._phase != _NEW:
            raise RuntimeError(f"graph {self.name!r} was already entered; open a new one")
        try:
            self._task = current_task()
        except (RuntimeError, AttributeError):  # under asyncio, say
            raise needs_trio("open_graph") from None
        self._phase = _OPEN
        self._thread = get_ident()
        self.start = trio.current_time()
        # Spawned nodes run under the deadline of the scopes around the block, as of now.
        # Reading it costs ~1.6 µs (a walk up every enclosing scope), too much for graphs that
        # never spawn, so keep the task's cancel status for the first spawn to read (see
        # _spawn.py); on a trio without that attribute, read the deadline now.
        if self._timeout is not None:
            self._scope = trio.CancelScope(deadline=self.start + self._timeout)
            self._scope.__enter__()
        if _READ_DEADLINE_LATER:
            self._entry_status = self._task._cancel_status
        else:
            self._deadline = trio.current_effective_deadline()
        return self

    @enable_ki_protection
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[bool | None]:
        if exc is None and self._unfinished and self._scope is None and self._host is None:
            # The short exit, the common case: the graph is the awaitable (no coroutine of our
            # own, a GC-tracked object per live request) and parks the request task directly.
            # Whoever finishes the last node completes the exit (GraphCore._wake_exit); a
            # cancellation is handed back to this task to carry out (GraphCore.__call__).
            self._closing = True
            self._exit_waiter = current_task()
            self._step = _EXITING
            return self
        return self._exit(exc)

    @enable_ki_protection
    async def _exit(self, exc: BaseException | None) -> bool:
        self._closing = True
        try:
            if exc is None:
                try:
                    if self._unfinished or self._host_running():
                        if not self._unfinished:
                            self._host.wake()  # type: ignore[union-attr]
                        # Park until the last node (or the host's end) wakes us. A
                        # cancellation only marks us gone (_abort_exit); the cancelling
                        # is done below, in this task.
                        while self._unfinished or self._host_running():
                            self._exit_waiter = current_task()
                            await park(self._abort_exit)
                    else:
                        await trio.lowlevel.checkpoint()
                except BaseException as interrupt:  # Cancelled (deadline, timeout) or KI
                    exc = interrupt
                    own = True
                else:
                    own = False
            else:
                own = False  # the block's own exception: it propagates as it is
            if exc is not None and (self._unfinished or self._host_running()):
                self._cancel_all(trio.current_time())
                latest = await self._wait_shielded(exc)
                if latest is not exc:  # a KeyboardInterrupt while waiting: it wins
                    exc, own = latest, True
                del latest
            return self._finish(exc, own)
        finally:
            del self, exc  # this frame is on the raised error's traceback

    async def _wait_shielded(self, exc: BaseException) -> BaseException:
        """Wait, shielded, for spawned tasks to unwind; a KeyboardInterrupt meanwhile wins."""
        with trio.CancelScope(shield=True):
            while self._unfinished or self._host_running():
                self._exit_waiter = current_task()
                try:
                    await park(self._abort_exit)
                except BaseException as interrupt:  # a KeyboardInterrupt is not shielded
                    exc = interrupt
        return exc

    def _finish(self, exc: BaseException | None, own: bool) -> bool:
        """Close the graph and end the block: False to let the block's exception propagate,
        or raise what the block must raise."""
        self._close()
        scope = self._scope
        if scope is not None:
            self._scope = None
            if exc is None:
                scope.__exit__(None, None, None)
            elif scope.__exit__(type(exc), exc, exc.__traceback__):
                message = f"graph {self.name!r} timed out after {self._timeout} s"
                del self, exc, scope
                raise trio.TooSlowError(message) from None
        if exc is not None:
            if not own:
                return False
            del self
            try:
                raise exc
            finally:
                del exc
        error, tb = self._error, self._error_tb
        if error is None:
            return False
        del self
        try:
            reraise(error, tb)
        finally:
            del error, tb

    def _abort_exit(self, _: RaiseCancelT) -> Abort:
        self._exit_waiter = None  # mark only: __aexit__ does the cancelling once it resumes
        return Abort.SUCCEEDED

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
                outcome=_outcome_name(node),
                error=node._error if node._outcome == _ERROR else None,
            )
            for i, node in enumerate(nodes)
        )
        return GraphTrace(self.name, self.start, traces, _critical_path(traces))


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


# Trio's Task keeps the cancel status of the scopes it is in as ``_cancel_status``: private,
# so its presence is checked once here and its absence costs only speed, never correctness.
_READ_DEADLINE_LATER: Final = hasattr(trio.lowlevel.Task, "_cancel_status")


def open_graph(
    *, timeout: float | None = None, name: str | None = None, memo: bool = True
) -> Graph:
    """Open a graph for one request: ``async with mcs.open_graph() as g: ...``.

    Args:
        timeout: seconds the whole graph may take; past it, every unfinished node is cancelled
            and the block raises :exc:`trio.TooSlowError`. Enclosing deadlines apply too.
        name: a name for traces and errors.
        memo: keep a memo for the request: a second call of an item through the same batcher
            gives the first call's node, and sends nothing (see :meth:`Graph.call`). It lives
            and dies with the graph. False sends every call.

    Returns:
        A :class:`Graph`, to be used once as an async context manager. The block raises the
        first node failure itself (not wrapped in an exception group) after cancelling the
        other nodes; see the module documentation for the full policy.

    Raises:
        TypeError, ValueError: for a bad ``timeout``, ``name`` or ``memo``.
    """
    return Graph(timeout=timeout, name=name, memo=memo)
