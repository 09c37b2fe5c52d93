"""Property-testing helpers for code built on mcs (an optional extra: ``trio-mcs[testing]``).

This module imports hypothesis; core mcs never imports it. It offers four kinds of tools:

- **Random graphs.** :func:`graph_specs` is a hypothesis strategy for :class:`GraphSpec`, a
  random DAG of ``call``/``apply``/``spawn`` nodes with delays and, on request, one injected
  failure. :func:`build_graph` builds a spec inside a live graph over your batchers, and the spec
  knows the values (:meth:`GraphSpec.expected_values`) and, when no call waits for a batch slot,
  the times (:meth:`GraphSpec.expected_times`) its nodes must end with.
- **A recording batch_fn.** :class:`RecordingBatchFn` logs every batch it runs (items, start
  and end on trio's clock, how many ran at once), computes results with your function, and
  fails or sleeps when told to. :func:`spec_batch_fn` is one set up for built specs.
- **Invariant checks.** ``assert_*`` functions raise :exc:`AssertionError` with a message that
  names the culprit: dependencies respected, each node run once, batch limits held, nothing
  left running.
- **Virtual time.** :func:`run_virtual` runs a test on an :class:`AutojumpClock`, so delays
  cost no real time and every time is exact, as with ``MockClock(autojump_threshold=0)``; but
  where a MockClock spins forever once every task is blocked for good, a deadlock there is a
  failure, which hypothesis shrinks.

For example::

    @given(spec=graph_specs(failure=True))
    def test_failures_cancel_the_rest(spec: GraphSpec) -> None:
        async def main() -> None:
            batch_fn = spec_batch_fn()
            async with mcs.open_batcher(batch_fn, max_batch_size=4) as batcher:
                with pytest.raises(InjectedFailure):
                    async with mcs.open_graph() as g:
                        built = build_graph(g, spec, [batcher])
            trace = g.trace()
            assert_finished(trace)
            assert_dependencies_respected(trace)
            assert_ran_once(trace, built.run_counts(batch_fn))

        run_virtual(main)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import attrs
import trio
from hypothesis import strategies as st

import mcs

from ._testing_batch import BatchRecord as BatchRecord
from ._testing_batch import RecordingBatchFn as RecordingBatchFn
from ._testing_checks import assert_batch_limits as assert_batch_limits
from ._testing_checks import assert_dependencies_respected as assert_dependencies_respected
from ._testing_checks import assert_finished as assert_finished
from ._testing_checks import assert_idle as assert_idle
from ._testing_checks import assert_ran_once as assert_ran_once
from ._testing_clock import AutojumpClock as AutojumpClock
from ._testing_clock import run_virtual as run_virtual

__all__ = [
    "AutojumpClock",
    "BatchRecord",
    "BuiltGraph",
    "Failure",
    "GraphSpec",
    "InjectedFailure",
    "NodeKind",
    "NodeSpec",
    "RecordingBatchFn",
    "SpecItem",
    "assert_batch_limits",
    "assert_dependencies_respected",
    "assert_finished",
    "assert_idle",
    "assert_ran_once",
    "build_graph",
    "graph_specs",
    "run_virtual",
    "spec_batch_fn",
]

NodeKind: TypeAlias = Literal["call", "apply", "spawn"]
"""The kinds of graph node: a call through a batcher, a sync transform, a spawned task."""

Failure: TypeAlias = Literal["item", "batch", "raise"]
"""How a spec node fails: ``"item"``, its batch_fn returns an error for its item alone;
``"batch"``, batch_fn raises for its whole batch; ``"raise"``, an apply or spawn node raises."""

_MODULUS = 1_000_000_007


class InjectedFailure(Exception):
    """The error a spec node fails with when told to.

    Attributes:
        tag: the tag of the built graph (see :func:`build_graph`).
        node: the index of the failing node in its spec.
    """

    def __init__(self, tag: int, node: int) -> None:
        super().__init__(tag, node)  # so that copies and pickles rebuild it
        self.tag = tag
        self.node = node

    def __str__(self) -> str:
        return f"injected failure in node {self.node} of graph {self.tag}"


# ---------------------------------------------------------------------- random graphs


@attrs.frozen
class SpecItem:
    """The item a ``call`` node of a built spec sends through its batcher.

    Attributes:
        tag: the built graph's tag.
        node: the node's index in its spec.
        delay: how long a batch holding this item takes, at least (see :func:`spec_batch_fn`).
        fail: ``"item"`` or ``"batch"`` to fail, or None.
    """

    tag: int
    node: int
    delay: float = 0.0
    fail: Literal["item", "batch"] | None = None

    @property
    def value(self) -> int:
        """The item's result when it does not fail."""
        return _call_value(self.tag, self.node)


@attrs.frozen
class NodeSpec:
    """One node of a :class:`GraphSpec`.

    A ``call`` sends its own :class:`SpecItem` and waits for its dependencies with ``after=``;
    ``apply`` and ``spawn`` nodes take the values of ``deps`` as arguments (alternately
    positional and keyword) and wait for ``after`` without taking values.

    Attributes:
        kind: ``"call"``, ``"apply"`` or ``"spawn"``.
        deps: indexes of earlier nodes whose values it takes (none for a call).
        after: indexes of earlier nodes it waits for without taking their values.
        delay: a spawn node's sleep, or how long a call's batch takes; 0 for apply nodes.
        fail: how the node fails (see :data:`Failure`), or None.
        batcher: for a call, the index of its batcher among those given to build_graph.
    """

    kind: NodeKind
    deps: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    delay: float = 0.0
    fail: Failure | None = None
    batcher: int = 0


@attrs.frozen
class GraphSpec:
    """A random graph's shape: nodes in creation order, each depending on earlier ones only.

    Attributes:
        nodes: the nodes.

    Raises:
        ValueError: if a node depends on itself or a later node, lists a dependency twice, or
            has a kind, delay or failure that do not fit together.
    """

    nodes: tuple[NodeSpec, ...]

    def __attrs_post_init__(self) -> None:
        for i, node in enumerate(self.nodes):
            links = node.deps + node.after
            if any(not 0 <= j < i for j in links):
                raise ValueError(f"node {i} must depend on earlier nodes only, got {links}")
            if len(set(links)) != len(links):
                raise ValueError(f"node {i} lists a dependency twice: {links}")
            if node.kind == "call" and node.deps:
                raise ValueError(f"call node {i} sends its own item; give its deps as after")
            if node.kind == "apply" and node.delay:
                raise ValueError(f"apply node {i} runs at once; its delay must be 0")
            if not node.delay >= 0:
                raise ValueError(f"node {i} delay must be >= 0, got {node.delay!r}")
            if node.fail is not None and (node.fail == "raise") == (node.kind == "call"):
                raise ValueError(f"{node.kind} node {i} cannot fail with {node.fail!r}")

    @property
    def failures(self) -> tuple[int, ...]:
        """The indexes of the nodes told to fail."""
        return tuple(i for i, node in enumerate(self.nodes) if node.fail is not None)

    def expected_values(self, tag: int = 0) -> tuple[int, ...]:
        """Each node's value when the graph is built with ``tag`` and no node fails."""
        values: list[int] = []
        for i, node in enumerate(self.nodes):
            if node.kind == "call":
                values.append(_call_value(tag, i))
            else:
                values.append(_combine(tag, i, [values[j] for j in node.deps]))
        return tuple(values)

    def expected_times(self) -> tuple[tuple[float, float], ...]:
        """Each node's (start, end) after the block's start, when no node fails and no call
        waits for a batch slot or shares a batch with a slower item (e.g. batchers with
        ``max_batch_size=1`` and enough ``max_in_flight``)."""
        times: list[tuple[float, float]] = []
        for node in self.nodes:
            start = max((times[j][1] for j in node.deps + node.after), default=0.0)
            times.append((start, start + node.delay))
        return tuple(times)


def _call_value(tag: int, node: int) -> int:
    return tag * 1009 + node * 31 + 7


def _combine(tag: int, node: int, values: Sequence[int]) -> int:
    # position-sensitive, so that a value passed to the wrong argument shows
    mixed = tag * 1009 + node * 7919 + sum((k + 2) * v for k, v in enumerate(values))
    return mixed % _MODULUS


def graph_specs(
    *,
    min_nodes: int = 1,
    max_nodes: int = 8,
    kinds: Sequence[NodeKind] = ("call", "apply", "spawn"),
    batchers: int = 1,
    delays: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    max_deps: int = 3,
    failure: bool = False,
    batch_failures: bool = True,
) -> st.SearchStrategy[GraphSpec]:
    """A hypothesis strategy for random :class:`GraphSpec` DAGs.

    Args:
        min_nodes: the fewest nodes a spec has.
        max_nodes: the most nodes a spec has.
        kinds: the node kinds to draw from (shrinking prefers the first).
        batchers: how many batchers call nodes are spread over.
        delays: the delays to draw spawn and call delays from; quarters of a second (the
            default) add up exactly in floating point.
        max_deps: the most dependencies (values and ``after`` together) of one node.
        failure: if true, exactly one node is told to fail; otherwise none.
        batch_failures: if false, failing calls fail their own item only, never their whole
            batch (a batch may carry other graphs' items).

    Raises:
        ValueError: at once, for a bad argument.
    """
    if not 1 <= min_nodes <= max_nodes:
        raise ValueError(f"need 1 <= min_nodes <= max_nodes, got {min_nodes} and {max_nodes}")
    if not kinds or any(kind not in ("call", "apply", "spawn") for kind in kinds):
        raise ValueError(f"kinds must be some of 'call', 'apply', 'spawn', got {kinds!r}")
    if batchers < 1:
        raise ValueError(f"batchers must be >= 1, got {batchers}")
    if not delays or any(not delay >= 0 for delay in delays):
        raise ValueError(f"delays must be numbers >= 0, got {delays!r}")
    if max_deps < 0:
        raise ValueError(f"max_deps must be >= 0, got {max_deps}")
    kind_st = st.sampled_from(tuple(kinds))
    delay_st = st.sampled_from(tuple(delays))
    call_failures: tuple[Literal["item", "batch"], ...] = (
        ("item", "batch") if batch_failures else ("item",)
    )

    @st.composite
    def specs(draw: st.DrawFn) -> GraphSpec:
        nodes: list[NodeSpec] = []
        for i in range(draw(st.integers(min_nodes, max_nodes))):
            kind = draw(kind_st)
            links: list[int] = []
            if i and max_deps:
                links = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=max_deps))
            split = 0 if kind == "call" else draw(st.integers(0, len(links)))
            nodes.append(
                NodeSpec(
                    kind=kind,
                    deps=tuple(links[:split]),
                    after=tuple(links[split:]),
                    delay=0.0 if kind == "apply" else draw(delay_st),
                    batcher=draw(st.integers(0, batchers - 1)) if kind == "call" else 0,
                )
            )
        if failure:
            i = draw(st.integers(0, len(nodes) - 1))
            how: Failure = "raise"
            if nodes[i].kind == "call":
                how = draw(st.sampled_from(call_failures))
            nodes[i] = attrs.evolve(nodes[i], fail=how)
        return GraphSpec(tuple(nodes))

    return specs()


# ---------------------------------------------------------------------- building a spec


@attrs.frozen
class BuiltGraph:
    """A spec built inside a live graph by :func:`build_graph`.

    Attributes:
        spec: the spec.
        tag: the tag it was built with.
        nodes: the graph's nodes, one per spec node, in order.
        runs: how many times each apply or spawn node's function was called, by index.
    """

    spec: GraphSpec
    tag: int
    nodes: tuple[mcs.Node[int], ...]
    runs: Counter[int]

    def expected_values(self) -> tuple[int, ...]:
        """Each node's value if no node fails; see :meth:`GraphSpec.expected_values`."""
        return self.spec.expected_values(self.tag)

    def run_counts(self, *batch_fns: RecordingBatchFn[SpecItem, int]) -> tuple[int, ...]:
        """How many times each node ran: for a call, how often its item reached one of
        ``batch_fns``; for the others, how often their function was called."""
        sent = Counter(
            item.node for batch_fn in batch_fns for item in batch_fn.items if item.tag == self.tag
        )
        return tuple(
            sent[i] if node.kind == "call" else self.runs[i]
            for i, node in enumerate(self.spec.nodes)
        )


def build_graph(
    g: mcs.Graph,
    spec: GraphSpec,
    batchers: Sequence[mcs.Batcher[SpecItem, int]],
    *,
    tag: int = 0,
) -> BuiltGraph:
    """Add the nodes of ``spec`` to the open graph ``g``; node ``i`` is named ``f"n{i}"``.

    Call nodes go through ``batchers[node.batcher]``, whose batch_fn should be a
    :func:`spec_batch_fn`. Give graphs that share batchers different tags: the tag is part of
    every item and value.

    Raises:
        ValueError: if a call node's batcher index is out of range.
        RuntimeError: if ``g`` is not open.
    """
    for i, node in enumerate(spec.nodes):
        if node.kind == "call" and not node.batcher < len(batchers):
            raise ValueError(
                f"node {i} uses batcher {node.batcher}, but {len(batchers)} batchers were given"
            )
    runs: Counter[int] = Counter()
    nodes: list[mcs.Node[int]] = []
    for i, node in enumerate(spec.nodes):
        name = f"n{i}"
        after = [nodes[j] for j in node.after]
        if node.kind == "call":
            fail = node.fail if node.fail != "raise" else None
            item = SpecItem(tag, i, node.delay, fail)
            nodes.append(g.call(batchers[node.batcher], item, name=name, after=after))
            continue
        args = [nodes[j] for j in node.deps[0::2]]
        kwargs = {f"d{k}": nodes[j] for k, j in enumerate(node.deps) if k % 2}
        if node.kind == "apply":
            fn = _applier(tag, i, node.fail is not None, runs)
            nodes.append(g.apply(fn, *args, name=name, after=after, **kwargs))
        else:
            async_fn = _spawner(tag, i, node.delay, node.fail is not None, runs)
            nodes.append(g.spawn(async_fn, *args, name=name, after=after, **kwargs))
    return BuiltGraph(spec, tag, tuple(nodes), runs)


def _in_order(values: tuple[int, ...], named: dict[str, int]) -> list[int]:
    """Undo build_graph's split of a node's dependency values into args and kwargs."""
    ordered = [0] * (len(values) + len(named))
    ordered[0::2] = values
    for key, value in named.items():
        ordered[int(key[1:])] = value
    return ordered


def _applier(tag: int, index: int, fail: bool, runs: Counter[int]) -> Callable[..., int]:
    def apply_node(*values: int, **named: int) -> int:
        runs[index] += 1
        if fail:
            raise InjectedFailure(tag, index)
        return _combine(tag, index, _in_order(values, named))

    return apply_node


def _spawner(
    tag: int, index: int, delay: float, fail: bool, runs: Counter[int]
) -> Callable[..., Any]:
    async def spawn_node(*values: int, **named: int) -> int:
        runs[index] += 1
        await trio.sleep(delay)
        if fail:
            raise InjectedFailure(tag, index)
        return _combine(tag, index, _in_order(values, named))

    return spawn_node


def _spec_result(item: SpecItem) -> int | BaseException:
    return InjectedFailure(item.tag, item.node) if item.fail == "item" else item.value


def _spec_delay(items: list[SpecItem]) -> float:
    return max(item.delay for item in items)


def _spec_raise(items: list[SpecItem]) -> BaseException | None:
    for item in items:
        if item.fail == "batch":
            return InjectedFailure(item.tag, item.node)
    return None


def spec_batch_fn() -> RecordingBatchFn[SpecItem, int]:
    """A :class:`RecordingBatchFn` for the batchers of :func:`build_graph`.

    A batch takes as long as its slowest item's delay, raises :exc:`InjectedFailure` if one of
    its items has ``fail="batch"``, and otherwise returns each item's value, or an
    :exc:`InjectedFailure` for an item with ``fail="item"``.
    """
    return RecordingBatchFn(_spec_result, delay=_spec_delay, raise_for=_spec_raise)


for _obj in (
    AutojumpClock,
    BatchRecord,
    RecordingBatchFn,
    assert_batch_limits,
    assert_dependencies_respected,
    assert_finished,
    assert_idle,
    assert_ran_once,
    run_virtual,
):
    _obj.__module__ = __name__
del _obj
