"""Traces of a graph: what each node did and when, and the critical path.

A trace is a frozen snapshot built on demand by :meth:`mcs.Graph.trace`, so recording costs the
graph nothing but two timestamps per node, which it keeps anyway.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

__all__ = ["GraphTrace", "NodeKind", "NodeTrace"]

NodeKind = Literal["call", "call_many", "apply", "spawn"]


@attrs.frozen
class NodeTrace:
    """What one node did, from :meth:`Graph.trace`.

    Attributes:
        index: the node's position in creation order.
        name: the node's name.
        kind: ``"call"``, ``"call_many"``, ``"apply"`` or ``"spawn"``.
        deps: the indexes of the nodes it waited for.
        start: when it started on trio's clock (``nan`` if it never did).
        end: when it finished on trio's clock (``nan`` if it never did).
        outcome: ``"value"``, ``"error"``, ``"cancelled"``, or ``"pending"``/``"running"`` if
            the trace was taken inside the block.
        error: the node's error, if it failed.
    """

    index: int
    name: str
    kind: NodeKind
    deps: tuple[int, ...]
    start: float
    end: float
    outcome: str
    error: BaseException | None = None


@attrs.frozen
class GraphTrace:
    """Every node of a graph with its timing, and the critical path.

    ``str(trace)`` is a compact text timeline, one line per node; nodes on the critical path are
    marked ``*``.

    Attributes:
        name: the graph's name.
        start: when the block was entered, on trio's clock.
        nodes: one :class:`NodeTrace` per node, in creation order.
        critical_path: the chain of nodes that ended last: starting from the node that finished
            last, each step goes to the dependency that finished last.
    """

    name: str
    start: float
    nodes: tuple[NodeTrace, ...]
    critical_path: tuple[NodeTrace, ...]

    def __str__(self) -> str:
        ends = [n.end for n in self.nodes if not math.isnan(n.end)]
        span = max(ends, default=self.start) - self.start
        on_path = {n.index for n in self.critical_path}
        width = 30
        name_width = max((len(n.name) for n in self.nodes), default=4)
        kind_width = max((len(n.kind) for n in self.nodes), default=5)
        kind_width = max(kind_width, 5)
        lines = [f"graph {self.name!r}: {len(self.nodes)} nodes in {span * 1e3:.3f} ms"]
        for n in self.nodes:
            start = n.start - self.start
            end = n.end - self.start
            if span > 0 and not math.isnan(start) and not math.isnan(end):
                left = min(width - 1, round(start / span * width))
                right = max(left + 1, round(end / span * width))
                bar = " " * left + "#" * (right - left) + " " * (width - right)
            else:
                bar = " " * width
            deps = ",".join(str(d) for d in n.deps) or "-"
            lines.append(
                f"{'*' if n.index in on_path else ' '}{n.index:>4} {n.name:<{name_width}} "
                f"{n.kind:<{kind_width}} |{bar}| {start * 1e3:9.3f} -> {end * 1e3:9.3f} ms "
                f"{n.outcome:<9} after {deps}"
            )
        return "\n".join(lines)


def _critical_path(traces: tuple[NodeTrace, ...]) -> tuple[NodeTrace, ...]:
    finished = [t for t in traces if not math.isnan(t.end)]
    if not finished:
        return ()
    # Ties go to the later node: a transform that ends with its last dependency is still the
    # end of the path.
    path = [max(finished, key=lambda t: (t.end, t.index))]
    while True:
        deps = [traces[d] for d in path[-1].deps if not math.isnan(traces[d].end)]
        if not deps:
            break
        path.append(max(deps, key=lambda t: (t.end, t.index)))
    return tuple(reversed(path))
