"""Invariant checks over graph traces and batchers, for :mod:`mcs.testing`.

Each ``assert_*`` raises :exc:`AssertionError` with a message that names the culprit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import mcs

from ._testing_batch import RecordingBatchFn

__all__ = [
    "assert_batch_limits",
    "assert_dependencies_respected",
    "assert_finished",
    "assert_idle",
    "assert_ran_once",
]

_FINISHED = ("value", "error", "cancelled")


def _describe(node: mcs.NodeTrace) -> str:
    return f"node {node.index} ({node.name!r})"


def assert_finished(trace: mcs.GraphTrace) -> None:
    """Check that every node of ``trace`` finished: a value, an error, or cancelled.

    Raises:
        AssertionError: naming a node that is still pending or running, or has no end time.
    """
    for node in trace.nodes:
        if node.outcome not in _FINISHED:
            raise AssertionError(f"{_describe(node)} is still {node.outcome}")
        if math.isnan(node.end):
            raise AssertionError(f"{_describe(node)} ended with {node.outcome} at no time")


def assert_dependencies_respected(trace: mcs.GraphTrace) -> None:
    """Check that each node that started did so after all its dependencies ended with a
    value, and ended no earlier than it started; and that only started nodes finished with a
    value or an error.

    Raises:
        AssertionError: naming the first node that breaks the rule, and the dependency.
    """
    for node in trace.nodes:
        if math.isnan(node.start):
            if node.outcome in ("value", "error"):
                raise AssertionError(f"{_describe(node)} has {node.outcome} but never started")
            continue
        for j in node.deps:
            dep = trace.nodes[j]
            if dep.outcome != "value":
                raise AssertionError(
                    f"{_describe(node)} started although its dependency {j} ended with "
                    f"{dep.outcome}"
                )
            if not dep.end <= node.start:
                raise AssertionError(
                    f"{_describe(node)} started at {node.start} before its dependency {j} "
                    f"ended at {dep.end}"
                )
        if node.end < node.start:
            raise AssertionError(
                f"{_describe(node)} ended at {node.end} before it started at {node.start}"
            )


def assert_ran_once(trace: mcs.GraphTrace, runs: Sequence[int]) -> None:
    """Check that each node that ended with a value or an error ran exactly once, and each
    cancelled node at most once (never, if it never started).

    Args:
        trace: the graph's trace.
        runs: how many times each node ran, by index (e.g. :meth:`BuiltGraph.run_counts`).

    Raises:
        ValueError: if ``runs`` does not have one count per node.
        AssertionError: naming a node that ran the wrong number of times.
    """
    if len(runs) != len(trace.nodes):
        raise ValueError(f"runs must have {len(trace.nodes)} counts, got {len(runs)}")
    for node, count in zip(trace.nodes, runs, strict=True):
        if node.outcome == "cancelled":
            most = 0 if math.isnan(node.start) else 1
            if count > most:
                raise AssertionError(f"{_describe(node)} was cancelled but ran {count} times")
        elif count != 1:
            raise AssertionError(
                f"{_describe(node)} ended with {node.outcome} but ran {count} times"
            )


def assert_batch_limits(
    batch_fn: RecordingBatchFn[Any, Any], *, max_batch_size: int, max_in_flight: int
) -> None:
    """Check that no batch was empty or larger than ``max_batch_size``, and that no more than
    ``max_in_flight`` batches ever ran at once.

    Raises:
        AssertionError: naming the first batch over a limit.
    """
    for k, batch in enumerate(batch_fn.batches):
        if not 1 <= len(batch.items) <= max_batch_size:
            raise AssertionError(
                f"batch {k} has {len(batch.items)} items; max_batch_size is {max_batch_size}"
            )
        if batch.concurrent > max_in_flight:
            raise AssertionError(
                f"batch {k} started with {batch.concurrent} batches running; "
                f"max_in_flight is {max_in_flight}"
            )


def assert_idle(*batchers: mcs.Batcher[Any, Any]) -> None:
    """Check that no batcher holds anything: nothing queued, waiting for room or in flight.

    A batch whose callers all went away keeps running until batch_fn returns, so check once
    those have ended (after the batchers' block, or after sleeping past the longest delay).

    Raises:
        AssertionError: naming the first batcher that is not idle.
    """
    for batcher in batchers:
        stats = batcher.statistics()
        if stats.queued or stats.waiting_for_room or stats.in_flight:
            raise AssertionError(
                f"batcher {stats.name!r} is not idle: queued={stats.queued}, "
                f"waiting_for_room={stats.waiting_for_room}, in_flight={stats.in_flight}"
            )
