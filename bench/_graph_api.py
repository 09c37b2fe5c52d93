"""The part of mcs's graph API the benchmarks use, looked up at run time.

The graph module may not be present in every checkout the benchmarks run against, so the W2 and
W3 workloads fetch ``mcs.open_graph`` through :func:`open_graph` and report their mcs variants as
skipped when it is missing. The protocols below state exactly the calls they make.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, cast

import mcs

__all__ = ["Graph", "Node", "missing", "open_graph"]


class Node(Protocol):
    @property
    def result(self) -> Any: ...


class Graph(Protocol):
    def call(
        self, batcher: mcs.Batcher[Any, Any], item: Any, /, *, after: Sequence[Node] = ...
    ) -> Node: ...

    def apply(self, fn: Callable[..., Any], /, *args: Any) -> Node: ...

    def spawn(self, fn: Callable[..., Awaitable[Any]], /, *args: Any) -> Node: ...


def missing() -> str | None:
    """Why the mcs graph variants cannot run here, or None."""
    return None if hasattr(mcs, "open_graph") else "mcs.open_graph not available"


def open_graph() -> AbstractAsyncContextManager[Graph]:
    """``mcs.open_graph()``."""
    # The type as a string: evaluated, it would build generic aliases on every request.
    opener = cast("Callable[[], AbstractAsyncContextManager[Graph]]", vars(mcs)["open_graph"])
    return opener()
