"""W5: the demo service (``python -m mcs demo``) measured through the demo's own functions.

Every request is a profile page: a graph over three SQLite lookups (users, timelines, follower
counts, plus one user lookup per post's author), each lookup through a batcher whose batch_fn
runs one ``SELECT ... IN (...)`` in a worker thread. The data set (20,000 users) is generated
once per benchmark invocation into a temporary folder, during the warm-up, and shared read-only
by every run and every process; it is removed when the benchmark exits.

- **W5 "demo"**: the demo's batched-vs-unbatched comparison. Each mode is one call of
  :func:`mcs._demo.run_demo` (a fresh ``trio.run``), which is exactly what
  :func:`mcs._demo.run_comparison` does for each of its two modes: the same data set, the same
  request mix (drawn from the seed), the same in-flight and rate limits; only batching differs.
  Running the modes as two variants lets the harness interleave them and rotate their order
  from run to run, like every other workload.
- **W5-scale "scale-out"**: the batched demo in N worker processes (``multiprocessing`` with
  the ``spawn`` context, so each is a fresh interpreter with one ``trio.run``), N = 1 and
  N = ``os.cpu_count()``. The same total number of requests is split evenly between the
  processes, each serving its slice (drawn from its own seed) from its own clients. Each worker
  imports, opens the data set and serves a small warm-up before it waits on a barrier shared by
  all of them; the measured window runs from the first process starting to serve its requests
  to the last one finishing (on the monotonic clock, which all processes share), so it covers
  exactly the requests counted.

The sizes follow the harness's parameters: the full sizes by default, smaller ones with
``--quick`` (recognised by its shortened latency window) and tiny ones for the warm-up
(recognised by its smaller request count).
"""

from __future__ import annotations

import atexit
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Literal, cast

from mcs._util import nearest_rank

from ._harness import Metric, Params, Results, Variant, Workload
from ._workers import START_METHOD, run_workers

__all__ = ["WORKLOADS"]

USERS = 20_000
"""Users in the data set shared by every W5 run (it takes about half a second to generate)."""

SEED = 0

PROCESSES = max(2, os.cpu_count() or 1)
"""N for W5-scale: one process per CPU (at least two, or there is nothing to compare)."""

_WORKER_TIMEOUT = 300.0  # seconds a worker may take to start, warm up and serve its slice
_COUNT_UNIT = cast(Literal["req/s", "ms", "B"], "queries")
"""The harness formats units it does not know as a rounded number followed by the unit."""


@dataclass(frozen=True)
class Sizes:
    """How much work one measurement does."""

    requests: int  # W5: requests per mode
    concurrency: int  # clients per service (per process in W5-scale)
    scale_requests: int  # W5-scale: requests over all processes
    worker_warmup: int  # W5-scale: requests each worker serves before the barrier


FULL = Sizes(requests=3_000, concurrency=500, scale_requests=8_000, worker_warmup=300)
QUICK = Sizes(requests=1_500, concurrency=500, scale_requests=4_000, worker_warmup=300)
WARMUP = Sizes(requests=300, concurrency=100, scale_requests=600, worker_warmup=50)


def sizes(params: Params) -> Sizes:
    """The sizes for ``params``: warm-up, ``--quick`` or full."""
    return {"warmup": WARMUP, "quick": QUICK, "full": FULL}[params.size]


def demo_missing() -> str | None:
    """Why the demo cannot run here, or None."""
    try:
        import mcs._demo  # noqa: F401
    except ImportError as exc:
        return f"the demo (mcs._demo) cannot be imported: {exc}"
    return None


# ---------------------------------------------------------------------------------- data set

_dataset_lock = threading.Lock()
_dataset_dir: Path | None = None


def dataset() -> Path:
    """The folder of the shared data set, generated on first use in a temporary folder."""
    global _dataset_dir
    with _dataset_lock:
        if _dataset_dir is None:
            from mcs._demo import create_dataset

            folder = tempfile.TemporaryDirectory(prefix="mcs-bench-demo-")
            atexit.register(folder.cleanup)
            _dataset_dir = create_dataset(folder.name, users=USERS, seed=SEED).directory
        return _dataset_dir


# ---------------------------------------------------------------------------------- W5


def measure_mode(params: Params, *, batching: bool) -> Results:
    """Serve the requests in one mode, in a fresh ``trio.run``."""
    from mcs._demo import run_demo

    size = sizes(params)
    summary = run_demo(
        requests=size.requests,
        concurrency=size.concurrency,
        batching=batching,
        database=dataset(),
        seed=SEED,
    )
    if summary.errors or summary.requests != size.requests:
        raise RuntimeError(
            f"{summary.mode}: {summary.requests} of {size.requests} requests served, "
            f"{summary.errors} failed (first: {summary.first_error})"
        )
    return {
        "rps": summary.requests_per_second,
        "p50": summary.latency_p50_ms,
        "p99": summary.latency_p99_ms,
        "queries_per_1k": summary.queries_per_request * 1000,
    }


W5 = Workload(
    key="W5",
    title="demo",
    description=(
        "the demo service (`python -m mcs demo`) through `mcs._demo.run_demo`, one fresh "
        "trio.run per mode: 3,000 profile requests (1,500 with --quick) from 500 closed-loop "
        "clients, each a graph over SQLite lookups of users, timelines and follower counts "
        f"on a {USERS:,}-user data set generated once per invocation; batched "
        "(max_batch_size 100) against one query per lookup, with the same requests and the "
        "demo's default limits (2 queries in flight per table, 20,000 queries/s)."
    ),
    metrics=(
        Metric("rps", "throughput", "req/s", higher_is_better=True),
        Metric("p50", "p50", "ms", higher_is_better=False),
        Metric("p99", "p99", "ms", higher_is_better=False),
        Metric("queries_per_1k", "per 1,000 requests", _COUNT_UNIT, higher_is_better=False),
    ),
    variants=(
        Variant("mcs (batched)", lambda p: measure_mode(p, batching=True), demo_missing),
        Variant("unbatched", lambda p: measure_mode(p, batching=False), demo_missing),
    ),
)


# ---------------------------------------------------------------------------------- W5-scale


@dataclass(frozen=True)
class _Served:
    """What one worker process measured: its window on the monotonic clock, and latencies."""

    requests: int
    started: float
    finished: float
    latencies: list[float]


def _serve(
    barrier: Barrier, database: Path, requests: int, concurrency: int, seed: int, warmup: int
) -> _Served:
    from mcs._demo import run_demo

    run_demo(requests=warmup, concurrency=concurrency, database=database, seed=seed + 1_000)
    done_at: list[float] = []

    def progress(done: int) -> None:
        if done == requests and not done_at:
            done_at.append(time.monotonic())

    barrier.wait(timeout=_WORKER_TIMEOUT)
    summary = run_demo(
        requests=requests,
        concurrency=concurrency,
        database=database,
        seed=seed,
        progress=progress,
    )
    finished = done_at[0] if done_at else time.monotonic()
    if summary.errors or summary.requests != requests:
        raise RuntimeError(
            f"{summary.requests} of {requests} requests served, {summary.errors} failed "
            f"(first: {summary.first_error})"
        )
    return _Served(
        requests=summary.requests,
        started=finished - summary.seconds,
        finished=finished,
        latencies=summary.latencies,
    )


def measure_processes(params: Params, processes: int) -> Results:
    """Serve the requests batched from ``processes`` worker processes started together."""
    size = sizes(params)
    database = dataset()
    shares = [
        size.scale_requests // processes + (i < size.scale_requests % processes)
        for i in range(processes)
    ]
    jobs = [
        (
            f"bench-w5-scale-{i}",
            (database, share, size.concurrency, SEED + i, size.worker_warmup),
        )
        for i, share in enumerate(shares)
    ]
    served = run_workers(_serve, jobs, _WORKER_TIMEOUT)
    total = sum(s.requests for s in served)
    if total != size.scale_requests:
        raise RuntimeError(f"{total} of {size.scale_requests} requests served")
    seconds = max(s.finished for s in served) - min(s.started for s in served)
    latencies = sorted(x for s in served for x in s.latencies)
    return {
        "rps": total / seconds if seconds > 0 else math.inf,
        "p50": nearest_rank(latencies, 0.50) * 1e3,
        "p99": nearest_rank(latencies, 0.99) * 1e3,
    }


def _one_cpu() -> str | None:
    if (os.cpu_count() or 1) < 2:
        return "one CPU: no second process to scale out to"
    return demo_missing()


W5_SCALE = Workload(
    key="W5-scale",
    title="scale-out",
    description=(
        f"the W5 demo, batched, in N worker processes (multiprocessing {START_METHOD!r}, one "
        "trio.run each) over the same read-only data set: 8,000 requests in all (4,000 with "
        "--quick) split evenly, each process with its own seed and 500 clients; the workers "
        "warm up, wait on a barrier, then serve; throughput = all requests / (last finish - "
        f"first start). N = 1 against N = os.cpu_count() = {PROCESSES}."
    ),
    metrics=(
        Metric("rps", "total throughput", "req/s", higher_is_better=True),
        Metric("p50", "p50", "ms", higher_is_better=False),
        Metric("p99", "p99", "ms", higher_is_better=False),
    ),
    variants=(
        Variant(f"{PROCESSES} processes", lambda p: measure_processes(p, PROCESSES), _one_cpu),
        Variant("1 process", lambda p: measure_processes(p, 1), demo_missing),
    ),
)

WORKLOADS = (W5, W5_SCALE)
