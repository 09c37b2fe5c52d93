"""Many keys in one node, errors as values: what :meth:`mcs.Graph.call_many` builds (the
batcher side, ``Batcher.many``, is in ``_many.py``).

The problem: a request often needs a list of things by id (the authors of twenty comments), and
some of them may be missing. Twenty call nodes would fail the whole graph at the first missing
one, which is the graph's failure policy and the wrong answer here: DataLoader's ``loadMany``
gives a list aligned with the keys where a failing key's entry is its error, and the caller
decides. That is what a call-many node resolves to.

How, and what it costs. The node is one :class:`~mcs._node.Node` and, per distinct key it sends,
one small request record (:class:`_KeyRecord`) in the batcher's queue, like a call node and
like a task that calls the batcher: no task, no per-key node. Each record delivers its value or
its error into the node's result list; the last one resolves the node. A key whose record the
batcher refuses (closed, full) gets that refusal as its entry. Cancelling the node (the graph
failed or was cancelled) withdraws every record still in the batcher.

With the graph's memo on, a key already memoized in the graph whose node has its value takes
that value without a lookup, a key whose memoized node is still running is waited for (it is a
dependency of the call-many node, so the key is not sent twice), and a key repeated in the list
is sent once. The keys a call-many node sends are not added to the memo: the memo maps keys to
nodes, and these are records.

A record and its node point at each other while the key is in the batcher; the node drops its
records when it finishes, so a finished graph holds no cycle.
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._memo import NO_KEY, memo_find, memo_key
from ._node import _FINISHED, _RUNNING, _VALUE, Node
from ._requests import _Request
from ._trace import NodeKind

if TYPE_CHECKING:
    from ._graph_core import GraphCore

__all__ = ["_KeyRecord", "_ManyNode"]


class _ManyNode(Node[list[Any]]):
    """A node that resolves to a list aligned with its keys; errors are entries."""

    __slots__ = ("_missing", "_records", "_results")
    kind: NodeKind = "call_many"
    _missing: int  # records not yet delivered
    _records: list[_KeyRecord] | None  # the records sent, until the node finishes
    _results: list[Any]

    def _positional(self) -> tuple[Any, ...]:
        return self._args  # type: ignore[no-any-return]  # (keys, *memoized nodes waited for)

    def _start(self, graph: GraphCore, now: float) -> None:
        """Send every key that has no value yet; resolve at once if none is left to send."""
        self._node_state = _RUNNING
        self.start = now
        batcher = self._fn
        keys: list[Any] = self._args[0]
        results: list[Any] = [None] * len(keys)
        records: list[_KeyRecord] = []
        memo = graph._memo_on
        sent: dict[Any, _KeyRecord] | None = None  # the key of each record, to send a key once
        # The memoized nodes this node waited for, by key: the memo may have changed since.
        waited = {dep._memo_key: dep for dep in self._args[1:]} if len(self._args) > 1 else None
        for index, item in enumerate(keys):
            key = memo_key(batcher, item) if memo else NO_KEY
            if key is not NO_KEY:
                found = waited.get(key) if waited is not None else None
                if found is None:
                    found = memo_find(graph, batcher, key)
                if (
                    found is not None
                    and found._node_state == _FINISHED
                    and found._outcome == _VALUE
                ):
                    results[index] = found._value
                    continue
                if sent is None:
                    sent = {}
                record = sent.get(key)
                if record is not None:
                    record.more = [index] if record.more is None else [*record.more, index]
                    continue
            record = _KeyRecord(self, item, index, now)
            records.append(record)
            if key is not NO_KEY:
                sent[key] = record  # type: ignore[index]
        self._results = results
        self._records = records
        self._missing = len(records)
        del sent, waited
        if not records:
            self._deliver_value(results, now)
            return
        for record in records:
            try:
                batcher._submit_nowait(record)
            except Exception as exc:  # closed, overloaded: this key's entry, like any error
                record.parent = None
                self._entry(record, exc.with_traceback(None), now)

    def _entry(self, record: _KeyRecord, value: Any, now: float) -> None:
        """Record one key's outcome; the last one resolves the node."""
        results = self._results
        results[record.index] = value
        if record.more is not None:
            for index in record.more:
                results[index] = value
        self._missing -= 1
        graph = self._graph
        if self._missing == 0 and graph is not None and self._node_state == _RUNNING:
            self._records = None
            try:
                self._deliver_value(results, now)
            finally:  # on the stack under apply functions: see GraphCore._run_ready
                del self, graph, results, value

    def _withdraw_all(self) -> None:
        """The node is cancelled: take every key still in the batcher back."""
        records, self._records = self._records, None
        if records:
            batcher = self._fn
            for record in records:
                if record.parent is not None:
                    record.parent = None
                    batcher._withdraw(record)


class _KeyRecord(_Request[Any, Any]):
    """One key of a call-many node on its way through the batcher."""

    __slots__ = ("batch", "index", "item", "more", "parent", "state", "t0")

    def __init__(self, parent: _ManyNode, item: Any, index: int, t0: float) -> None:
        self.parent: _ManyNode | None = parent
        self.item = item
        self.index = index
        self.more: list[int] | None = None  # further positions of the same key
        self.t0 = t0
        self.batch: Any = None

    def _deliver_value(self, value: Any, now: float) -> None:
        parent = self.parent
        if parent is not None:
            self.parent = None
            try:
                parent._entry(self, value, now)
            finally:
                del parent, value

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        parent = self.parent
        if parent is not None:
            self.parent = None
            try:
                parent._entry(self, error, now)
            finally:
                del parent, error, tb

    def _request_contexts(self) -> list[contextvars.Context]:
        parent = self.parent
        return [] if parent is None else parent._request_contexts()
