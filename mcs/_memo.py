"""A graph's memo: one call node per (batcher, key) within one request.

The problem: a request's code asks for the same thing more than once (the author of a post and
of its first comment are the same user), and each ask is a lookup in a batcher's queue, so the
same id goes downstream twice, in the same batch or in the next one. DataLoader answers with a
cache on the loader, which is shared by whoever holds the loader: per request if the loader is
made per request, across requests (stale data, unbounded growth) if it is not.

Here the memo belongs to the graph, so it lives and dies with the request: ``g.call(b, k)`` for
a key already called through ``b`` in this graph returns the node of that first call, and
nothing is shared with any other graph or kept after the graph closes.

What it costs. Most graphs make a handful of calls, and a dict per graph would be one more
GC-tracked object per live request (see ``_node.py`` for why that matters). So while a graph
has at most :data:`SCAN_LIMIT` memoized nodes, the memo is those nodes themselves, linked
newest first through ``Node._memo_previous`` (like ``Node._previous``, a link to an older node,
so no cycle), and a lookup compares keys along that chain. The ninth memoized node turns the
chain into a dict per batcher (key -> node). Either way a key matches as in a dict: the same
object, or an equal one.

The key of an item is ``batcher._key(item)`` when the batcher has a key function, else the
item. An item that is unhashable, or whose key function raises, is not memoized: the call goes
to the batcher as usual, which reports any error of the key function itself.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._graph_core import GraphCore
    from ._node import Node

__all__ = ["NO_KEY", "SCAN_LIMIT", "memo_add", "memo_drop", "memo_find", "memo_key"]

SCAN_LIMIT: Final = 8
"""How many memoized nodes a graph keeps as a chain before it builds a dict."""


class _NoKey:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_KEY"


NO_KEY: Final[Any] = _NoKey()
"""What :func:`memo_key` returns for an item that cannot be memoized."""


def memo_key(batcher: object, item: object) -> Hashable:
    """The memo key of ``item`` in ``batcher``, or :data:`NO_KEY`."""
    key_fn = getattr(batcher, "_key", None)
    if key_fn is not None:
        try:
            item = key_fn(item)
        except Exception:  # the batcher reports it when the item reaches it
            return NO_KEY  # type: ignore[no-any-return]
    try:
        hash(item)
    except TypeError:
        return NO_KEY  # type: ignore[no-any-return]
    return item


def memo_find(graph: GraphCore, batcher: object, key: Hashable) -> Node[Any] | None:
    """The node memoized for ``key`` in ``batcher``, if any."""
    memo = graph._memo
    if memo is None:
        node = graph._last_memo
        while node is not None:
            if node._fn is batcher:
                other = node._memo_key
                if other is key or other == key:
                    return node
            node = node._memo_previous
        return None
    per_batcher = memo.get(batcher)
    return per_batcher.get(key) if per_batcher is not None else None


def memo_add(graph: GraphCore, batcher: object, key: Hashable, node: Node[Any]) -> None:
    """Memoize ``node`` for ``key`` in ``batcher`` (not memoized yet)."""
    node._memo_key = key
    memo = graph._memo
    if memo is not None:
        per_batcher = memo.get(batcher)
        if per_batcher is None:
            memo[batcher] = {key: node}
        else:
            per_batcher[key] = node
        return
    node._memo_previous = graph._last_memo
    graph._last_memo = node
    graph._memo_count += 1
    if graph._memo_count > SCAN_LIMIT:  # past the chain's reach: a dict from now on
        memo = graph._memo = {}
        chained: Node[Any] | None = node
        while chained is not None:  # newest first, and keys are distinct: setdefault is exact
            memo.setdefault(chained._fn, {})[chained._memo_key] = chained
            chained = chained._memo_previous
        graph._last_memo = None


def memo_drop(graph: GraphCore, batcher: object, key: Hashable) -> bool:
    """Forget ``key`` in ``batcher``; whether it was memoized."""
    memo = graph._memo
    if memo is not None:
        per_batcher = memo.get(batcher)
        return per_batcher is not None and per_batcher.pop(key, None) is not None
    later: Node[Any] | None = None
    node = graph._last_memo
    while node is not None:
        if node._fn is batcher:
            other = node._memo_key
            if other is key or other == key:
                if later is None:
                    graph._last_memo = node._memo_previous
                else:
                    later._memo_previous = node._memo_previous
                node._memo_previous = None
                graph._memo_count -= 1
                return True
        later, node = node, node._memo_previous
    return False
