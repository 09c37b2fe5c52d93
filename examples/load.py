"""A load generator for ``examples/http_service.py``, run from another process.

A load generator written in Python easily measures itself rather than the server: a fat HTTP
client spends more CPU per request than a small service does. This one keeps its own cost
small, two ways:

``--engine processes`` (the default)
    ``--processes`` worker processes, each running a Trio client over raw keep-alive
    connections (``--concurrency`` in all, split between the processes) with a minimal
    HTTP/1.1 parser. Each connection sends its next ``GET /users/<id>`` as soon as the previous
    answer is in, until ``--requests`` have been sent or ``--duration`` seconds have passed.
``--engine wrk``
    runs `wrk <https://github.com/wg/wrk>`_ (it must be on ``PATH``) with the same number of
    connections for ``--duration`` seconds, and reads its summary.

Both draw the ids uniformly from the service's users plus one per cent unknown ones (404). At
the end it prints requests/s, latency p50/p99, the status counts and the service's batch
sizes, and exits with status 1 if any request failed (a transport error or a status other than
200 and 404). Only loopback URLs are accepted::

    python examples/load.py --url http://127.0.0.1:8000 --requests 20000 --concurrency 64
    python examples/load.py --url http://127.0.0.1:8000 --engine wrk --duration 5
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TIMEOUT = 30.0


@dataclass
class Result:
    engine: str = "processes"
    requests: int = 0
    seconds: float = 0.0
    requests_per_second: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)


class ClosedByPeer(Exception):
    pass


# ---------------------------------------------------------------------- a minimal HTTP/1.1 client


class Connection:
    """One keep-alive HTTP/1.1 connection; ``get`` returns ``(status, body)``."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host.encode()
        self.buffer = bytearray()

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(await trio.open_tcp_stream(host, port), host)

    async def get(self, path: str) -> tuple[int, bytes]:
        await self.stream.send_all(
            b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), self.host)
        )
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._receive()
        head = bytes(self.buffer[:end]).lower()
        del self.buffer[: end + 4]
        status = int(head[9:12])
        match = re.search(rb"\r\ncontent-length: *(\d+)", head)
        length = int(match[1]) if match else 0
        while len(self.buffer) < length:
            await self._receive()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status, body

    async def _receive(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ClosedByPeer("the server closed the connection")
        self.buffer += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def get_json(host: str, port: int, path: str) -> Any:
    with trio.fail_after(TIMEOUT):
        connection = await Connection.open(host, port)
        try:
            status, body = await connection.get(path)
        finally:
            await connection.aclose()
    if status != 200:
        raise OSError(f"GET {path} answered {status}")
    return json.loads(body)


def request_ids(count: int, users: int, seed: int | str) -> list[int]:
    """``count`` ids drawn uniformly from 1..users and one per cent more (unknown ids)."""
    rng = random.Random(seed)
    top = math.ceil(users * 1.01)
    return [rng.randint(1, top) for _ in range(count)]


# ---------------------------------------------------------------------- engine: processes


@dataclass
class Job:
    host: str
    port: int
    connections: int
    requests: int
    users: int
    seed: str
    duration: float


@dataclass
class Share:
    started: float = 0.0
    ended: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    failure: str = ""


async def _drive(job: Job, ready: Any) -> Share:
    share = Share()
    statuses: Counter[int] = Counter()
    # the ids first: drawing many takes a while, and an idle connection may time out
    ids = request_ids(job.requests, job.users, job.seed)
    with trio.fail_after(TIMEOUT):
        connections = [
            await Connection.open(job.host, job.port)
            for _ in range(min(job.connections, job.requests))
        ]
    await trio.to_thread.run_sync(partial(ready.wait, TIMEOUT))  # every process is connected
    share.started = time.monotonic()
    deadline = share.started + job.duration
    position = 0
    latencies = share.latencies

    async def client(connection: Connection) -> None:
        nonlocal position
        while position < len(ids) and time.monotonic() < deadline:
            user_id = ids[position]
            position += 1
            sent = time.monotonic()
            try:
                status, _ = await connection.get(f"/users/{user_id}")
            except (OSError, ClosedByPeer, trio.BrokenResourceError):
                share.errors += 1
                await connection.aclose()
                try:
                    connection = await Connection.open(job.host, job.port)
                except OSError:
                    return
                continue
            latencies.append(time.monotonic() - sent)
            statuses[status] += 1
        await connection.aclose()

    # one deadline for the whole run rather than a cancel scope per request
    with trio.fail_after(job.duration + TIMEOUT):
        async with trio.open_nursery() as nursery:
            for connection in connections:
                nursery.start_soon(client, connection)
    share.ended = time.monotonic()
    share.statuses = dict(statuses)
    return share


def _worker(job: Job, ready: Any, results: Any) -> None:
    try:
        share = trio.run(_drive, job, ready)
    except BaseException as exc:
        ready.abort()
        share = Share(failure=f"{type(exc).__name__}: {exc}")
    results.put(share)


def run_processes(
    host: str,
    port: int,
    *,
    requests: int,
    users: int,
    seed: int,
    concurrency: int,
    processes: int,
    duration: float,
) -> tuple[list[float], Counter[int], int, float]:
    """Drive the server from ``processes`` processes; latencies, statuses, errors, seconds."""
    processes = max(1, min(processes, concurrency, requests))
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes + 1)
    results = context.Queue()
    jobs = [
        Job(
            host,
            port,
            concurrency // processes + (w < concurrency % processes),
            requests // processes + (w < requests % processes),
            users,
            f"{seed}-{w}",
            duration,
        )
        for w in range(processes)
    ]
    workers = [context.Process(target=_worker, args=(job, ready, results)) for job in jobs]
    for worker in workers:
        worker.start()
    try:
        ready.wait(TIMEOUT)
        shares: list[Share] = [results.get(timeout=duration + 2 * TIMEOUT) for _ in workers]
    except (threading.BrokenBarrierError, queue.Empty):
        shares = []
    finally:
        for worker in workers:
            worker.join(TIMEOUT if shares else 0)
            if worker.is_alive():
                worker.kill()
                worker.join()
    failures = [s.failure for s in shares if s.failure]
    if not shares or failures:
        raise OSError(failures[0] if failures else "a load process did not start")
    latencies = [latency for s in shares for latency in s.latencies]
    statuses: Counter[int] = Counter()
    for s in shares:
        statuses.update(s.statuses)
    seconds = max(s.ended for s in shares) - min(s.started for s in shares)
    return latencies, statuses, sum(s.errors for s in shares), seconds


# ---------------------------------------------------------------------- engine: wrk

WRK_SCRIPT = """
math.randomseed(%(seed)d + tonumber(tostring({}):sub(8), 16) %% 1000)
local top = %(top)d
request = function()
  return wrk.format("GET", "/users/" .. math.random(1, top))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "\\nRESULT {\\"requests\\": %%d, \\"us\\": %%d, \\"p50\\": %%d, \\"p99\\": %%d, "
    .. "\\"errors\\": %%d, \\"status_errors\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def run_wrk(url: str, users: int, *, concurrency: int, duration: float, seed: int) -> Result:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise OSError("wrk is not installed (apt-get install wrk)")
    threads = max(1, min(concurrency, (os.cpu_count() or 1), 4))
    with tempfile.TemporaryDirectory(prefix="mcs-load-") as folder:
        script = Path(folder) / "users.lua"
        script.write_text(WRK_SCRIPT % {"seed": seed, "top": math.ceil(users * 1.01)})
        seconds = max(1, round(duration))
        out = subprocess.run(
            [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script), url],
            capture_output=True,
            text=True,
            timeout=seconds + TIMEOUT,
            check=True,
        ).stdout
    match = re.search(r"^RESULT (\{.*\})$", out, re.MULTILINE)
    if match is None:
        raise OSError(f"cannot read wrk's summary: {out!r}")
    summary = json.loads(match[1])
    wall = summary["us"] / 1e6
    # wrk counts any status >= 400 as a "status error"; those here are the unknown ids (404)
    return Result(
        engine="wrk",
        requests=summary["requests"],
        seconds=wall,
        requests_per_second=summary["requests"] / wall if wall > 0 else 0.0,
        latency_p50_ms=summary["p50"] / 1e3,
        latency_p99_ms=summary["p99"] / 1e3,
        statuses={
            "200": summary["requests"] - summary["status_errors"],
            "404": summary["status_errors"],
        },
        errors=summary["errors"],
    )


# ---------------------------------------------------------------------- the command


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


def measure(args: argparse.Namespace) -> Result:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    info = trio.run(get_json, host, port, "/")
    if args.engine == "wrk":
        result = run_wrk(
            args.url,
            int(info["users"]),
            concurrency=args.concurrency,
            duration=args.duration,
            seed=args.seed,
        )
    else:
        latencies, statuses, errors, seconds = run_processes(
            host,
            port,
            requests=args.requests,
            users=int(info["users"]),
            seed=args.seed,
            concurrency=args.concurrency,
            processes=args.processes,
            duration=args.duration,
        )
        ordered = sorted(latencies)
        result = Result(
            requests=len(latencies) + errors,
            seconds=seconds,
            requests_per_second=len(latencies) / seconds if seconds > 0 else 0.0,
            latency_p50_ms=_percentile(ordered, 0.50) * 1e3,
            latency_p99_ms=_percentile(ordered, 0.99) * 1e3,
            statuses={str(code): n for code, n in sorted(statuses.items())},
            errors=errors,
        )
    result.stages = trio.run(get_json, host, port, "/stats")
    return result


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
    parser.add_argument("--engine", choices=["processes", "wrk"], default="processes")
    parser.add_argument("--requests", type=_positive_int, default=2_000, help="at most this many")
    parser.add_argument("--duration", type=_positive_float, default=60.0, help="at most seconds")
    parser.add_argument("--concurrency", type=_positive_int, default=50, help="connections")
    parser.add_argument(
        "--processes",
        type=_positive_int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="client processes (default: half the cores; the other half are the server's)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must be on the loopback interface, got {args.url}")

    try:
        result = measure(args)
    except (OSError, trio.TooSlowError, subprocess.SubprocessError) as exc:
        print(f"load: cannot use the service at {args.url}: {exc}", file=sys.stderr)
        return 1
    failed = result.errors + sum(
        n for code, n in result.statuses.items() if code not in ("200", "404")
    )
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(
            f"{result.requests:,} requests in {result.seconds:.2f} s over {args.concurrency} "
            f"connections ({result.engine}): {result.requests_per_second:,.0f} requests/s"
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
