"""Running the demo: a fixed mix of requests from concurrent clients, measured.

``concurrency`` client tasks share the list of requests; each sends its next request as soon as
the previous one is answered (a closed loop, like a load generator with that many connections),
so the service always has ``concurrency`` live requests. Latency is measured per request on
trio's clock (which is the monotonic clock), from the call to the response.

The request mix is drawn from the seed, so both modes serve the very same requests: users are
picked with a skew towards popular ones (as profile views are), and one request in a hundred
asks for a user that does not exist (a 404).
"""

from __future__ import annotations

import gc
import math
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

import mcs

from .._util import check_int, nearest_rank
from ._db import Dataset, create_dataset, open_dataset
from ._service import Service, open_service

__all__ = [
    "DEFAULT_RATE",
    "DemoSummary",
    "ModeSummary",
    "StageSummary",
    "request_mix",
    "run_comparison",
    "run_demo",
]

DEFAULT_RATE = mcs.RateLimit(count=20_000, per=1.0, burst=100)
"""The default limit on each stage's queries: 20,000 per second, bursts of 100."""

Progress = Callable[[int], None]
"""Called now and then from the event loop with the number of requests completed so far."""

_PROGRESS_INTERVAL = 0.1


@dataclass(frozen=True)
class StageSummary:
    """What one stage (one table) did in one mode.

    Attributes:
        name: the stage.
        lookups: ids asked for by the requests' code.
        memo_hits: lookups answered by their request's memo (a repeat within one request).
        deduped: lookups that joined the same id already queued or in flight for another
            caller.
        ids_sent: ids sent to the database: ``lookups - memo_hits - deduped``.
        queries: ``SELECT`` statements issued.
        mean_batch_size: ids per query (after the memo and de-duplication).
        peak_batch_size: the most ids in one query.
        rate_limit_waits: batches that waited for the rate limit.
        queue_wait_p99_ms: time from a lookup to its query starting, 99th percentile of the
            last 1,024.
    """

    name: str
    lookups: int
    memo_hits: int
    deduped: int
    ids_sent: int
    queries: int
    mean_batch_size: float
    peak_batch_size: int
    rate_limit_waits: int
    queue_wait_p99_ms: float


@dataclass(frozen=True)
class ModeSummary:
    """The outcome of one run of the demo.

    Attributes:
        mode: ``"batched"`` or ``"unbatched"``.
        requests: requests served (all of them unless some failed).
        ok: requests answered 200.
        not_found: requests answered 404 (unknown user).
        errors: requests that raised.
        first_error: the first of those errors, as text, or None.
        concurrency: client tasks.
        seconds: wall time of the run.
        requests_per_second: ``requests / seconds``.
        latency_p50_ms, latency_p99_ms, latency_max_ms: per-request latency.
        lookups: ids asked for, all stages.
        memo_hits: lookups answered by their request's memo, all stages.
        deduped: lookups that joined an id already queued or in flight, all stages.
        ids_sent: ids sent to the database, all stages.
        queries: ``SELECT`` statements issued, all stages.
        queries_per_request: ``queries / requests``.
        mean_batch_size: ids per query, all stages.
        stages: per-stage detail.
        batch_sizes: how many queries carried each number of ids, all stages.
        latencies: every request's latency in seconds, in completion order (not in JSON).
    """

    mode: str
    requests: int
    ok: int
    not_found: int
    errors: int
    first_error: str | None
    concurrency: int
    seconds: float
    requests_per_second: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    lookups: int
    memo_hits: int
    deduped: int
    ids_sent: int
    queries: int
    queries_per_request: float
    mean_batch_size: float
    stages: tuple[StageSummary, ...]
    batch_sizes: dict[int, int]
    latencies: list[float] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything but the raw latencies."""
        data = asdict(self)
        del data["latencies"]
        data["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        data["stages"] = [asdict(stage) for stage in self.stages]
        finite: dict[str, Any] = _finite(data)
        return finite


@dataclass(frozen=True)
class DemoSummary:
    """Both modes of the demo over the same data set and the same requests.

    Attributes:
        dataset: the data set.
        seed: the seed of the data set and of the request mix.
        max_in_flight: concurrent queries allowed per stage.
        rate: the rate limit on each stage's queries, or None.
        batched: the run with batching.
        unbatched: the run with one query per lookup.
    """

    dataset: Dataset
    seed: int
    max_in_flight: int
    rate: mcs.RateLimit | None
    batched: ModeSummary
    unbatched: ModeSummary

    @property
    def speedup(self) -> float:
        """Requests per second, batched over unbatched."""
        return _ratio(self.batched.requests_per_second, self.unbatched.requests_per_second)

    @property
    def query_reduction(self) -> float:
        """Queries issued, unbatched over batched."""
        return _ratio(self.unbatched.queries, self.batched.queries)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        rate = self.rate
        return {
            "dataset": {
                "users": self.dataset.users,
                "posts": self.dataset.posts,
                "follows": self.dataset.follows,
                "size_bytes": self.dataset.size_bytes,
                "build_seconds": self.dataset.build_seconds,
            },
            "seed": self.seed,
            "max_in_flight": self.max_in_flight,
            "rate_limit": None
            if rate is None
            else {"count": rate.count, "per": rate.per, "burst": rate.burst, "unit": rate.unit},
            "batched": self.batched.to_dict(),
            "unbatched": self.unbatched.to_dict(),
            "speedup": _finite(self.speedup),
            "query_reduction": _finite(self.query_reduction),
        }


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def request_mix(requests: int, users: int, seed: int) -> list[int]:
    """The user ids of ``requests`` profile views: skewed towards popular (low) ids, with one
    in a hundred for an unknown user."""
    rng = random.Random(seed)
    ids = []
    for _ in range(requests):
        if rng.random() < 0.01:
            ids.append(users + rng.randrange(1, users + 1))
        else:
            r = rng.random()
            ids.append(1 + int(users * r * r))
    return ids


async def _drive(
    service: Service, ids: list[int], concurrency: int, progress: Progress | None
) -> tuple[list[float], Counter[int], list[str]]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    position = 0

    async def client() -> None:
        nonlocal position
        clock = trio.current_time
        while position < len(ids):
            user_id = ids[position]
            position += 1
            started = clock()
            try:
                page = await service.profile(user_id)
            except Exception as exc:
                errors.append(repr(exc))
            else:
                statuses[page["status"]] += 1
            latencies.append(clock() - started)

    async def report() -> None:
        assert progress is not None
        while True:
            progress(len(latencies))
            await trio.sleep(_PROGRESS_INTERVAL)

    async with trio.open_nursery() as nursery:
        if progress is not None:
            nursery.start_soon(report)
        async with trio.open_nursery() as clients:
            for _ in range(min(concurrency, len(ids))):
                clients.start_soon(client)
        nursery.cancel_scope.cancel()
    if progress is not None:
        progress(len(latencies))
    return latencies, statuses, errors


async def _run_mode(
    database: Path,
    ids: list[int],
    *,
    concurrency: int,
    batching: bool,
    max_batch_size: int,
    max_in_flight: int,
    rate: mcs.RateLimit | None,
    progress: Progress | None,
) -> ModeSummary:
    async with open_service(
        database,
        batching=batching,
        max_batch_size=max_batch_size,
        max_in_flight=max_in_flight,
        rate=rate,
    ) as service:
        started = time.perf_counter()
        latencies, statuses, errors = await _drive(service, ids, concurrency, progress)
        seconds = time.perf_counter() - started
        statistics = service.statistics()
    counters = service.counters
    stages = tuple(
        StageSummary(
            name=c.name,
            lookups=c.asked,
            memo_hits=c.asked - s.callers_served,
            deduped=s.callers_served - s.items,
            ids_sent=s.items,
            queries=c.queries,
            mean_batch_size=c.items / c.queries if c.queries else 0.0,
            peak_batch_size=s.peak_batch_size,
            rate_limit_waits=s.rate_limit_waits,
            queue_wait_p99_ms=s.queue_wait.p99 * 1e3,
        )
        for c, s in zip(counters, statistics, strict=True)
    )
    sizes: Counter[int] = Counter()
    for c in counters:
        sizes.update(c.batch_sizes)
    queries = sum(c.queries for c in counters)
    items = sum(c.items for c in counters)
    ordered = sorted(latencies)
    done = len(latencies)
    return ModeSummary(
        mode="batched" if batching else "unbatched",
        requests=done,
        ok=statuses[200],
        not_found=statuses[404],
        errors=len(errors),
        first_error=errors[0] if errors else None,
        concurrency=concurrency,
        seconds=seconds,
        requests_per_second=done / seconds if seconds > 0 else math.inf,
        latency_p50_ms=nearest_rank(ordered, 0.50) * 1e3,
        latency_p99_ms=nearest_rank(ordered, 0.99) * 1e3,
        latency_max_ms=(ordered[-1] if ordered else 0.0) * 1e3,
        lookups=sum(stage.lookups for stage in stages),
        memo_hits=sum(stage.memo_hits for stage in stages),
        deduped=sum(stage.deduped for stage in stages),
        ids_sent=sum(stage.ids_sent for stage in stages),
        queries=queries,
        queries_per_request=queries / done if done else 0.0,
        mean_batch_size=items / queries if queries else 0.0,
        stages=stages,
        batch_sizes=dict(sorted(sizes.items())),
        latencies=latencies,
    )


def _measure(
    database: Path,
    ids: list[int],
    *,
    concurrency: int,
    batching: bool,
    max_batch_size: int,
    max_in_flight: int,
    rate: mcs.RateLimit | None,
    progress: Progress | None,
) -> ModeSummary:
    gc.collect()  # start each run from the same heap, with the collector on as users run
    return trio.run(
        lambda: _run_mode(
            database,
            ids,
            concurrency=concurrency,
            batching=batching,
            max_batch_size=max_batch_size,
            max_in_flight=max_in_flight,
            rate=rate,
            progress=progress,
        )
    )


def run_demo(
    *,
    requests: int = 20_000,
    concurrency: int = 1_000,
    batching: bool = True,
    database: str | Path | None = None,
    users: int = 100_000,
    seed: int = 0,
    max_batch_size: int = 100,
    max_in_flight: int = 2,
    rate: mcs.RateLimit | None = DEFAULT_RATE,
    progress: Progress | None = None,
) -> ModeSummary:
    """Run the demo service in one mode and measure it (a blocking call: it runs ``trio.run``).

    Args:
        requests: how many profile requests to serve.
        concurrency: how many clients send them (each waits for its response before sending
            its next request).
        batching: batch the lookups (True) or issue one query per lookup (False).
        database: a folder holding a data set from :func:`create_dataset`, shared read-only
            (several processes may use it at once); if None, one with ``users`` users is
            generated in a temporary folder and removed afterwards.
        users: the size of the generated data set (ignored with ``database``).
        seed: the seed of the generated data set and of the request mix.
        max_batch_size: the most ids per query when batching.
        max_in_flight: concurrent queries per stage (three stages).
        rate: a limit on each stage's queries, or None.
        progress: called now and then with the number of requests done.

    Raises:
        TypeError, ValueError: for a bad argument.
    """
    check_int("requests", requests, 1)
    check_int("concurrency", concurrency, 1)
    check_int("max_batch_size", max_batch_size, 1)
    check_int("max_in_flight", max_in_flight, 1)
    if database is None:
        with tempfile.TemporaryDirectory(prefix="mcs-demo-") as folder:
            dataset = create_dataset(folder, users=users, seed=seed)
            return run_demo(
                requests=requests,
                concurrency=concurrency,
                batching=batching,
                database=dataset.directory,
                seed=seed,
                max_batch_size=max_batch_size,
                max_in_flight=max_in_flight,
                rate=rate,
                progress=progress,
            )
    dataset = open_dataset(database)
    ids = request_mix(requests, dataset.users, seed)
    return _measure(
        dataset.directory,
        ids,
        concurrency=concurrency,
        batching=batching,
        max_batch_size=max_batch_size,
        max_in_flight=max_in_flight,
        rate=rate,
        progress=progress,
    )


def run_comparison(
    *,
    requests: int = 20_000,
    concurrency: int = 1_000,
    users: int = 100_000,
    seed: int = 0,
    database: str | Path | None = None,
    max_batch_size: int = 100,
    max_in_flight: int = 2,
    rate: mcs.RateLimit | None = DEFAULT_RATE,
    on_dataset: Callable[[Dataset], None] | None = None,
    progress: Callable[[str], Progress] | None = None,
) -> DemoSummary:
    """Run the demo batched, then unbatched, on one data set and the same requests.

    ``on_dataset`` is called once the data set is ready; ``progress(mode)`` returns the progress
    callback of that mode's run. The other arguments are those of :func:`run_demo`.

    Raises:
        TypeError, ValueError: for a bad argument.
    """
    check_int("requests", requests, 1)
    check_int("concurrency", concurrency, 1)
    check_int("max_batch_size", max_batch_size, 1)
    check_int("max_in_flight", max_in_flight, 1)
    with ExitStack() as cleanup:
        if database is None:
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mcs-demo-"))
            dataset = create_dataset(folder, users=users, seed=seed)
        else:
            dataset = open_dataset(database)
        if on_dataset is not None:
            on_dataset(dataset)
        ids = request_mix(requests, dataset.users, seed)
        runs = {}
        for batching in (True, False):
            mode = "batched" if batching else "unbatched"
            runs[mode] = _measure(
                dataset.directory,
                ids,
                concurrency=concurrency,
                batching=batching,
                max_batch_size=max_batch_size,
                max_in_flight=max_in_flight,
                rate=rate,
                progress=progress(mode) if progress is not None else None,
            )
    return DemoSummary(
        dataset=dataset,
        seed=seed,
        max_in_flight=max_in_flight,
        rate=rate,
        batched=runs["batched"],
        unbatched=runs["unbatched"],
    )
