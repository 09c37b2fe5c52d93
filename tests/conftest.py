"""Fixtures shared by the batcher and rate-limit tests, and the hypothesis profile for CI.

Both are pure helpers that live for the whole test run, so the Hypothesis properties (sync
tests that call ``trio.run`` themselves) can use them as well as the async tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fractions import Fraction

import pytest
import trio
from hypothesis import HealthCheck, settings

import mcs

# A shared CI machine can be slow to generate examples; that is not a failure of the code.
settings.register_profile("ci", suppress_health_check=[HealthCheck.too_slow], print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _rate_bound_violations(starts: Sequence[tuple[float, int]], rate: mcs.RateLimit) -> list[str]:
    """Every window that breaks ``units <= burst + count * T / per``, computed exactly.

    ``starts`` holds ``(trio.current_time() when batch_fn started, units it used)``. The worst
    windows begin and end at recorded starts, so checking those pairs checks every window.
    """
    stamps = sorted((Fraction(at), units) for at, units in starts)
    count, per = Fraction(rate.count), Fraction(rate.per)
    violations = []
    for i, (first, _) in enumerate(stamps):
        used = 0
        for last, units in stamps[i:]:
            used += units
            allowed = rate.burst + count * (last - first) / per
            if used > allowed:
                window = f"[{float(first)!r}, {float(last)!r}]"
                violations.append(f"{used} units in {window}, at most {allowed} allowed")
    return violations


def _mcs_tasks() -> list[str]:
    """The names of the live tasks of this run that belong to mcs (dispatchers, batches)."""
    root = trio.lowlevel.current_root_task()
    stack = [root] if root is not None else []
    names = []
    while stack:
        task = stack.pop()
        if task.name.startswith("mcs"):
            names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return sorted(names)


@pytest.fixture(scope="session")
def rate_bound_violations() -> Callable[[Sequence[tuple[float, int]], mcs.RateLimit], list[str]]:
    """The exact rate-bound oracle: ``rate_bound_violations(starts, rate) == []`` when it holds."""
    return _rate_bound_violations


@pytest.fixture(scope="session")
def mcs_tasks() -> Callable[[], list[str]]:
    """``mcs_tasks()`` lists the mcs tasks alive in the current trio run, by name."""
    return _mcs_tasks
