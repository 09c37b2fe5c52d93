"""A load generator for ``examples/http_service.py``, run as a separate process.

``--concurrency`` clients (httpx on Trio, keep-alive connections) send ``GET /users/<id>``
requests, each client its next one as soon as the previous is answered, until ``--requests``
have been sent or ``--duration`` seconds have passed. The ids follow the demo's request mix
(popular users more often, one in a hundred unknown). At the end it prints requests/s, latency
p50/p99, the status counts and the service's batch sizes, and exits non-zero if any request
failed (a transport error or a status other than 200 and 404).

    python examples/load.py --url http://127.0.0.1:8000 --requests 5000 --concurrency 100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from mcs._demo import request_mix


@dataclass
class Result:
    requests: int = 0
    seconds: float = 0.0
    requests_per_second: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


async def drive(url: str, *, requests: int, concurrency: int, duration: float, seed: int) -> Result:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        info = (await client.get("/")).raise_for_status().json()
        ids = request_mix(requests, int(info["users"]), seed)
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        errors = 0
        position = 0
        started = time.perf_counter()
        deadline = trio.current_time() + duration

        async def user() -> None:
            nonlocal position, errors
            while position < len(ids) and trio.current_time() < deadline:
                user_id = ids[position]
                position += 1
                sent = time.perf_counter()
                try:
                    response = await client.get(f"/users/{user_id}")
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                statuses[response.status_code] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(ids))):
                nursery.start_soon(user)
        seconds = time.perf_counter() - started
        stages = (await client.get("/stats")).raise_for_status().json()

    ordered = sorted(latencies)
    done = len(latencies) + errors
    return Result(
        requests=done,
        seconds=seconds,
        requests_per_second=len(latencies) / seconds if seconds > 0 else 0.0,
        latency_p50_ms=_percentile(ordered, 0.50) * 1e3,
        latency_p99_ms=_percentile(ordered, 0.99) * 1e3,
        statuses={str(code): n for code, n in sorted(statuses.items())},
        errors=errors,
        stages=stages,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--requests", type=_positive_int, default=2_000, help="at most this many")
    parser.add_argument("--duration", type=_positive_float, default=60.0, help="at most seconds")
    parser.add_argument("--concurrency", type=_positive_int, default=50, help="clients")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error(f"--url must be on the loopback interface, got {args.url}")

    try:
        result = trio.run(
            partial(
                drive,
                args.url,
                requests=args.requests,
                concurrency=args.concurrency,
                duration=args.duration,
                seed=args.seed,
            )
        )
    except httpx.HTTPError as exc:
        print(f"load: cannot use the service at {args.url}: {exc}", file=sys.stderr)
        return 1
    failed = result.errors + sum(
        n for code, n in result.statuses.items() if code not in ("200", "404")
    )
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(
            f"{result.requests:,} requests in {result.seconds:.2f} s from {args.concurrency} "
            f"clients: {result.requests_per_second:,.0f} requests/s"
        )
        print(f"latency p50 {result.latency_p50_ms:.1f} ms, p99 {result.latency_p99_ms:.1f} ms")
        statuses = ", ".join(f"{code}: {n:,}" for code, n in result.statuses.items())
        print(f"statuses: {statuses or '-'}; transport errors: {result.errors}")
        for stage in result.stages:
            print(
                f"  stage {stage['name']!r}: {stage['items']:,} ids in {stage['batches']:,} "
                f"queries, mean batch size {stage['mean_batch_size']:.1f}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
