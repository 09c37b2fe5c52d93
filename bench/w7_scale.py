"""W7: the HTTP example's service in N worker processes under one downstream budget.

W5-scale compared 2 processes with 500 clients each against 1 process with 500: the batches
differed, and every limit held per process, so two processes could send twice the budget. W7
keeps the *total* number of clients fixed and shares the budget:

- each worker process (``multiprocessing`` ``spawn``, one ``trio.run``) opens the service of
  ``examples/http_service.py`` (:func:`open_service`: its SQLite data set, the two batchers,
  ``on_batch_error="split"``) with a rate of :data:`RATE` queries per second per table and
  :data:`IN_FLIGHT` queries in flight per table, and runs ``CLIENTS / N`` closed-loop clients
  that call the service's request graph directly (no HTTP, so that a load generator does not
  take the cores the workers need);
- the workers warm up, wait on a barrier, then serve for a fixed time; throughput is all
  requests over the window from the first start to the last finish;
- every query appends its start time (the monotonic clock, which all processes share) and table
  to one log, so the downstream's rate is counted at the downstream, across the workers: the
  mean queries per second per table over the window, and the most in any 1-s window.

Variants: N = ``os.cpu_count()`` processes sharing the budget through Redis
(:func:`mcs.redis.open_shared_rate`, :func:`mcs.redis.open_shared_in_flight`, a
``redis-server`` started on a free loopback port for the run); 1 process with the same budget;
N processes with the budget per process (the default without Redis), which overshoots it.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Final, Literal, cast

import trio

from mcs._util import nearest_rank

from ._harness import Metric, Params, Results, Variant, Workload
from ._workers import START_METHOD, run_workers

__all__ = ["WORKLOADS"]

PROCESSES = max(2, os.cpu_count() or 1)
"""N: one process per CPU (at least two, or there is nothing to compare)."""

USERS = 10_000
RATE = 200.0
"""The budget: queries per second per table, all processes together (burst 2). At 100, one
process already used most of it, and the budget rather than the cores set the pace."""
IN_FLIGHT = 4
"""The budget: queries in flight per table, all processes together."""

_WORKER_TIMEOUT = 120.0
_QUERIES: Final = cast(Literal["req/s", "ms", "B"], "queries/s")
"""The harness formats units it does not know as a rounded number followed by the unit."""


@dataclass(frozen=True)
class Sizes:
    clients: int  # closed-loop clients over all processes
    seconds: float  # how long every process serves after the barrier
    warmup: int  # requests each process serves before the barrier


FULL = Sizes(clients=400, seconds=5.0, warmup=400)
QUICK = Sizes(clients=400, seconds=3.0, warmup=400)
WARMUP = Sizes(clients=40, seconds=0.3, warmup=20)


def sizes(params: Params) -> Sizes:
    """The sizes for ``params``: warm-up, ``--quick`` or full."""
    return {"warmup": WARMUP, "quick": QUICK, "full": FULL}[params.size]


# ---------------------------------------------------------------------------------- a worker


@dataclass(frozen=True)
class _Served:
    requests: int
    started: float
    finished: float
    latencies: list[float]


async def _serve(
    barrier: Barrier,
    redis_url: str | None,
    processes: int,
    clients: int,
    size: Sizes,
    log: Path,
    seed: int,
) -> _Served:
    # examples/ is not a package that mypy sees under this name: load the example by name
    example = importlib.import_module("examples.http_service")
    settings = example.Settings(
        users=USERS,
        query_log=log,
        rate=RATE,
        in_flight=IN_FLIGHT,
        redis_url=redis_url,
        workers=processes,
    )
    rng = random.Random(seed)
    latencies: list[float] = []
    async with example.open_service(settings) as service:

        async def client(count: int | None, until: float) -> None:
            done = 0
            while (count is None or done < count) and time.monotonic() < until:
                sent = time.monotonic()
                status, _ = await service.profile(rng.randint(1, USERS))
                if status != 200:
                    raise RuntimeError(f"a request answered {status}")
                if count is None:
                    latencies.append(time.monotonic() - sent)
                done += 1

        async with trio.open_nursery() as nursery:  # warm up
            for _ in range(clients):
                nursery.start_soon(client, max(1, size.warmup // clients), math.inf)
        await trio.to_thread.run_sync(barrier.wait, _WORKER_TIMEOUT)
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client, None, started + size.seconds)
        finished = time.monotonic()
    return _Served(len(latencies), started, finished, latencies)


def _worker(
    barrier: Barrier,
    redis_url: str | None,
    processes: int,
    clients: int,
    size: Sizes,
    log: Path,
    seed: int,
) -> _Served:
    return trio.run(_serve, barrier, redis_url, processes, clients, size, log, seed)


# ---------------------------------------------------------------------------------- a run


def measure(params: Params, processes: int, *, shared: bool) -> Results:
    """Serve with ``processes`` workers, the budget shared through Redis or per process."""
    size = sizes(params)
    with tempfile.TemporaryDirectory(prefix="mcs-bench-w7-") as folder:
        log = Path(folder) / "queries.log"
        with _redis() if shared else _no_redis() as url:
            served = _run_workers(processes, size, url, log)
        queries = _read_log(log)
    started = min(s.started for s in served)
    finished = max(s.finished for s in served)
    seconds = finished - started
    total = sum(s.requests for s in served)
    latencies = sorted(x for s in served for x in s.latencies)
    in_window = {
        table: [t for t in times if started <= t <= finished] for table, times in queries.items()
    }
    return {
        "rps": total / seconds,
        "p99": nearest_rank(latencies, 0.99) * 1e3,
        "queries": max(len(times) / seconds for times in in_window.values()),
        "peak": max(_peak(times, 1.0) for times in in_window.values()),
    }


def _run_workers(processes: int, size: Sizes, url: str | None, log: Path) -> list[_Served]:
    shares = [size.clients // processes + (i < size.clients % processes) for i in range(processes)]
    jobs = [
        (f"bench-w7-{i}", (url, processes, share, size, log, i)) for i, share in enumerate(shares)
    ]
    return run_workers(_worker, jobs, _WORKER_TIMEOUT)


def _read_log(log: Path) -> dict[str, list[float]]:
    queries: dict[str, list[float]] = {"users": [], "posts": []}
    for line in log.read_text().splitlines():
        at, table, _ = line.split()
        queries[table].append(float(at))
    return {table: sorted(times) for table, times in queries.items()}


def _peak(times: list[float], window: float) -> int:
    """The most ``times`` within any closed interval of length ``window``."""
    most = first = 0
    for last, at in enumerate(times):
        while at - times[first] > window:
            first += 1
        most = max(most, last - first + 1)
    return most


@contextmanager
def _redis() -> Iterator[str]:
    """A ``redis-server`` on a free loopback port, without persistence, for one run."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait()


@contextmanager
def _no_redis() -> Iterator[None]:
    yield None


def _unavailable() -> str | None:
    if (os.cpu_count() or 1) < 2:
        return "one CPU: no second process to scale out to"
    return None


def _redis_unavailable() -> str | None:
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        importlib.import_module("mcs.redis")
    except ImportError as exc:
        return f"mcs.redis cannot be imported: {exc}"
    return _unavailable()


W7 = Workload(
    key="W7",
    title="scale-out under a shared budget",
    description=(
        "the HTTP example's service (examples/http_service.py: a graph per request over two "
        f"SQLite batchers, {USERS:,} users) in N worker processes (multiprocessing "
        f"{START_METHOD!r}, one trio.run each), 400 closed-loop clients in all, split between "
        f"the processes, calling the request graph for 5 s (3 s with --quick) after a barrier; "
        f"the downstream budget is {RATE:g} queries/s and {IN_FLIGHT} in flight per table. "
        "Queries are counted at the downstream (a log every query appends to): the mean per "
        f"second over the window and the most in any 1-s window (the bound is {RATE:g} + "
        f"burst 2), for the busier table. N = os.cpu_count() = {PROCESSES}."
    ),
    metrics=(
        Metric("rps", "total throughput", "req/s", higher_is_better=True),
        Metric("p99", "p99", "ms", higher_is_better=False),
        Metric("queries", "queries per table", _QUERIES, higher_is_better=False),
        Metric("peak", "most in 1 s", _QUERIES, higher_is_better=False),
    ),
    variants=(
        Variant(
            f"{PROCESSES} processes, budget shared in Redis",
            lambda p: measure(p, PROCESSES, shared=True),
            _redis_unavailable,
        ),
        Variant("1 process", lambda p: measure(p, 1, shared=False), _unavailable),
        Variant(
            f"{PROCESSES} processes, budget per process",
            lambda p: measure(p, PROCESSES, shared=False),
            _unavailable,
        ),
    ),
)

WORKLOADS = (W7,)
