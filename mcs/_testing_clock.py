"""Virtual time for mcs.testing: an autojump clock that notices deadlocks.

trio's ``MockClock(autojump_threshold=0)`` jumps to the next deadline whenever every task is
blocked. When there is none, it spins at full CPU forever, so a deadlock in the code under test
hangs the test run. The clock here notices that state instead, and :func:`run_virtual` turns it
into a test failure. It runs trio in a worker thread so that it can abandon a deadlocked run:
aborting a run from inside the run loop leaves tasks whose finalizers break later runs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import outcome
import trio
import trio.abc
from trio.testing import active_thread_count

__all__ = ["AutojumpClock", "run_virtual"]

T = TypeVar("T")


class AutojumpClock(trio.abc.Clock):
    """A virtual clock like ``trio.testing.MockClock(autojump_threshold=0)`` that notices a
    deadlock; :func:`run_virtual` runs a test on one.

    Time starts at 0 and stands still while any task can run; once none can, it jumps to the
    next deadline. When there is no deadline and nothing else could wake a task (no task waits
    for I/O, no thread runs, nothing is queued with ``run_sync_soon``), every task is blocked
    for good: a MockClock then spins at full CPU forever. This clock records why in
    :attr:`deadlock` and lets the run sleep instead. :func:`trio.testing.wait_all_tasks_blocked`
    never returns on it: keep MockClock where that is needed.

    Attributes:
        deadlock: a description of the deadlock, or None while there is none.
    """

    def __init__(self) -> None:
        self._now = 0.0
        self.deadlock: str | None = None

    def __repr__(self) -> str:
        return f"<mcs.testing.AutojumpClock at {self._now} s>"

    def start_clock(self) -> None:
        """Called by trio when the run starts; nothing to do."""

    def current_time(self) -> float:
        """The virtual time, in seconds."""
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        """Called by trio's run loop when no task can run: jump to ``deadline``, or notice a
        deadlock if there is none."""
        if deadline < math.inf:
            self._now = max(self._now, deadline)
            return 0.0
        stats = trio.lowlevel.current_statistics()
        io = stats.io_statistics
        names = (
            "tasks_waiting",
            "tasks_waiting_read",
            "tasks_waiting_write",
            "tasks_waiting_overlapped",
        )
        # trio's own run_sync_soon task always waits to read its wake-up socket
        waiting_for_io = sum(getattr(io, name, 0) for name in names) > 1
        if not (waiting_for_io or stats.run_sync_soon_queue_size or active_thread_count()):
            self.deadlock = (
                f"deadlock: {stats.tasks_living} tasks are blocked and none has a deadline "
                f"(at {self._now} s on the clock)"
            )
        return math.inf


def run_virtual(async_fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(async_fn)`` on a new :class:`AutojumpClock`; a deadlock fails, not hangs.

    The run happens in a worker thread. If it deadlocks, the thread is abandoned (a daemon
    thread, asleep until the process ends: aborting a trio run from inside leaves tasks behind
    whose finalizers break later runs) and an :exc:`AssertionError` is raised, which hypothesis
    can shrink like any failure.

    Returns:
        What ``async_fn`` returned.

    Raises:
        AssertionError: on a deadlock, with the clock's description of it.
        BaseException: whatever ``async_fn`` raised.
    """
    clock = AutojumpClock()
    results: list[outcome.Outcome[T]] = []
    done = threading.Event()

    def run() -> None:
        try:
            results.append(outcome.Value(trio.run(async_fn, clock=clock)))
        except BaseException as exc:  # handed to the calling thread
            results.append(outcome.Error(exc))
        finally:
            done.set()

    threading.Thread(target=run, name="mcs.testing.run_virtual", daemon=True).start()
    while not done.wait(0.05):
        if clock.deadlock is not None:
            raise AssertionError(clock.deadlock)
    return results[0].unwrap()
