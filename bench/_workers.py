"""Worker processes started together: each waits at a shared barrier, serves, and sends back
what it measured, or its traceback.

W5-scale and W7 run one ``trio.run`` per process. A worker that fails aborts the barrier, so
the others never wait for it; one that dies or takes longer than ``timeout`` fails the run with
its name rather than hanging it.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, Final, TypeVar

__all__ = ["START_METHOD", "run_workers"]

T = TypeVar("T")

START_METHOD: Final = "spawn"  # a fresh interpreter per worker: nothing inherited to skew it


def _entry(
    serve: Callable[..., T], args: tuple[Any, ...], barrier: Barrier, results: Queue[T | str]
) -> None:
    """A worker's entry point: ``serve(barrier, *args)``, its result (or traceback) sent back."""
    try:
        results.put(serve(barrier, *args))
    except BaseException:
        barrier.abort()  # do not keep the other workers waiting for this one
        results.put(traceback.format_exc())


def run_workers(
    serve: Callable[..., T], jobs: Sequence[tuple[str, tuple[Any, ...]]], timeout: float
) -> list[T]:
    """Run ``serve(barrier, *args)`` in one process per ``(name, args)`` of ``jobs``, all
    released together by the barrier; the results, in the order they came back.

    Raises:
        RuntimeError: naming each worker that failed, died or gave nothing within ``timeout``.
    """
    ctx = multiprocessing.get_context(START_METHOD)
    barrier = ctx.Barrier(len(jobs))
    results: Queue[T | str] = ctx.Queue()
    workers = [
        ctx.Process(target=_entry, args=(serve, args, barrier, results), name=name)
        for name, args in jobs
    ]
    served: list[T] = []
    errors: list[str] = []
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + timeout
        while len(served) + len(errors) < len(workers):
            try:
                outcome = results.get(timeout=0.2)
            except queue.Empty:
                lost = [w for w in workers if w.exitcode not in (None, 0)]
                if not lost and time.monotonic() < deadline:
                    continue
                barrier.abort()
                errors += [f"{w.name} exited with code {w.exitcode}" for w in lost]
                errors += [] if lost else [f"no result within {timeout:g} s"]
                break
            if isinstance(outcome, str):
                errors.append(outcome)
            else:
                served.append(outcome)
        for worker in workers:
            worker.join(timeout=timeout)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    if errors:
        raise RuntimeError("worker process failed:\n" + "\n".join(errors))
    return served
