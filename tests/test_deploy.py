"""The HTTP example deployed as users run it: ``hypercorn -k trio --workers N``, real processes.

Each test starts the server on a free loopback port, drives it over real connections and stops
it with a signal; every wait is bounded. The data set of each worker lives in a temporary folder
that its lifespan shutdown removes, so an empty ``TMPDIR`` afterwards shows that every worker
ran its shutdown. Nothing asserts on wall-clock time except the bounds that the deployment
guarantees (the server ends within its drain bound), with generous margins.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from processes import ports_announced
from redis_server import RedisServer, redis_server

import mcs

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0

__all__ = ["redis_server"]  # the fixture, imported for the tests below


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    tmp: Path
    early: str = ""  # stderr read while waiting for the workers, after their "Running on" lines

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
        """Signal the parent; its exit status and stderr."""
        self.process.send_signal(sig)
        return self.wait()

    def wait(self) -> tuple[int, str]:
        """Wait for the parent to exit: its exit status and stderr."""
        _, stderr = self.process.communicate(timeout=TIMEOUT)
        return self.process.returncode, self.early + stderr


@contextmanager
def hypercorn(tmp_path: Path, workers: int, *args: str, **environ: str) -> Iterator[Server]:
    """``hypercorn -k trio --workers N examples.http_service:app`` on a free port."""
    tmp = tmp_path / "server-tmp"
    tmp.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(tmp),
        "MCS_EXAMPLE_USERS": "200",
        **environ,
    }
    command = [sys.executable, "-m", "hypercorn", "-k", "trio", "--workers", str(workers)]
    command += ["--bind", "127.0.0.1:0", *args, "examples.http_service:app"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # each worker says so when ready
        pattern = r"Running on http://127\.0\.0\.1:(\d+) "
        try:
            ports, early = ports_announced(process.stderr, pattern, workers, TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"hypercorn did not start (exit status {process.poll()})") from exc
        assert len(set(ports)) == 1, ports
        yield Server(process, ports[0], tmp, early)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            assert stream is not None
            stream.close()


async def get(port: int, path: str) -> tuple[int, Any]:
    """One ``GET`` on its own connection: ``(status, JSON body)``, or ``(0, error)``."""
    with trio.fail_after(TIMEOUT):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                request = f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
                await stream.send_all(request.encode())
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        except OSError as exc:
            return 0, repr(exc)
    if not answer:
        return 0, "closed without an answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head[9:12]), json.loads(body)


def get_all(port: int, paths: list[str]) -> list[tuple[int, Any]]:
    """All the ``GET``s at once, each on its own connection, in the order given."""
    answers: list[tuple[int, Any]] = [(0, "not sent")] * len(paths)

    async def one(i: int, path: str) -> None:
        answers[i] = await get(port, path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i, path in enumerate(paths):
                nursery.start_soon(one, i, path)

    trio.run(main)
    return answers


def check_page(user_id: int, answer: tuple[int, Any]) -> None:
    status, page = answer
    assert status == 200, (user_id, answer)
    assert page["user"]["id"] == user_id
    assert page["user"]["name"] == f"user{user_id}"


# ---------------------------------------------------------------------- graceful drain


def test_sigterm_lets_a_busy_worker_finish_while_the_other_is_idle(tmp_path: Path) -> None:
    # hypercorn's parent sends SIGTERM to the workers still running once the first has exited:
    # the idle worker exits at once, and the busy one would die with its request unanswered.
    with hypercorn(tmp_path, 2, MCS_EXAMPLE_DELAY="1.5") as server:

        async def request_then_sigterm() -> tuple[int, Any]:
            async with trio.open_nursery() as nursery:
                answer: list[tuple[int, Any]] = []

                async def request() -> None:
                    answer.append(await get(server.port, "/users/7"))

                nursery.start_soon(request)
                await trio.sleep(0.5)  # the request waits for its queries (1.5 s)
                server.process.send_signal(signal.SIGTERM)
            return answer[0]

        answer = trio.run(request_then_sigterm)
        returncode, stderr = server.wait()
    check_page(7, answer)
    assert returncode == 0, stderr
    assert list(server.tmp.iterdir()) == []  # both workers ran their lifespan shutdown


def test_the_drain_is_bounded_when_requests_outlast_it(tmp_path: Path) -> None:
    # the queries take 60 s; --graceful-timeout cuts the requests at 1 s and MCS_CLOSE_SECONDS
    # the batchers' close at 1 s more, so the server ends long before its queries would
    env = {"MCS_EXAMPLE_DELAY": "60", "MCS_CLOSE_SECONDS": "1"}
    with hypercorn(tmp_path, 1, "--graceful-timeout", "1", **env) as server:

        async def request_then_sigterm() -> tuple[int, Any]:
            async with trio.open_nursery() as nursery:
                answer: list[tuple[int, Any]] = []

                async def request() -> None:
                    answer.append(await get(server.port, "/users/7"))

                nursery.start_soon(request)
                await trio.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                signalled = trio.current_time()
                await trio.to_thread.run_sync(server.wait)
                seconds.append(trio.current_time() - signalled)
            return answer[0]

        seconds: list[float] = []
        answer = trio.run(request_then_sigterm)
    assert answer == (0, "closed without an answer")
    assert server.process.returncode == 0
    assert seconds[0] < 30  # 2 s of drain and close, with a margin for a slow machine
    assert list(server.tmp.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_workers_stop_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    with hypercorn(tmp_path, 2) as server:
        check_page(3, get_all(server.port, ["/users/3"])[0])
        returncode, stderr = server.stop(sig)
    assert returncode == 0, stderr
    assert list(server.tmp.iterdir()) == []


def test_a_worker_alone_ends_within_its_stop_bound(tmp_path: Path) -> None:
    # a SIGTERM to one worker (not through the parent) does not start hypercorn's drain; the
    # worker holds it for MCS_STOP_SECONDS, then ends as SIGTERM would have ended it
    with hypercorn(tmp_path, 1, MCS_STOP_SECONDS="1") as server:
        status, info = get_all(server.port, ["/"])[0]
        assert status == 200
        worker = info["pid"]
        os.kill(worker, signal.SIGTERM)
        assert get_all(server.port, ["/users/5"])[0][0] == 200  # still serving, for now
        deadline = time.monotonic() + TIMEOUT
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker)
        server.wait()  # the parent exits with its worker


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_bad_setting_fails_the_start_up_with_its_name(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MCS_DB_RATE": "fast"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "-k",
            "trio",
            "-b",
            "127.0.0.1:0",
            "examples.http_service:app",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert "MCS_DB_RATE must be float > 0, got 'fast'" in result.stderr


# ---------------------------------------------------------------------- poison ids


POISON = 2**63  # beyond SQLite's 64-bit INTEGER: the query of any batch that holds it fails


def test_poison_ids_fail_alone_under_load(tmp_path: Path) -> None:
    # the queries wait 50 ms, so that the concurrent requests share batches with the poison
    valid = [1 + i % 200 for i in range(300)]
    paths = [f"/users/{i}" for i in valid]
    for k in range(6):
        paths.insert(k * 50, f"/users/{POISON}")
    with hypercorn(tmp_path, 1, MCS_EXAMPLE_DELAY="0.05") as server:
        answers = get_all(server.port, paths)
        _, stats = get_all(server.port, ["/stats"])[0]
        returncode, stderr = server.stop()
    assert returncode == 0, stderr
    poisoned = [answer for path, answer in zip(paths, answers, strict=True) if str(POISON) in path]
    served = [
        answer for path, answer in zip(paths, answers, strict=True) if str(POISON) not in path
    ]
    for user_id, answer in zip(valid, served, strict=True):
        check_page(user_id, answer)
    assert [status for status, _ in poisoned] == [500] * 6
    assert all("too large" in page["error"] for _, page in poisoned)
    # the poison did share batches, which were split (in either table: a poison request's graph
    # fails at its first failed lookup, and its other lookup may then be withdrawn)
    assert sum(stage["split_batches"] for stage in stats) >= 1, stats


# ---------------------------------------------------------------------- limits shared in Redis


def drive(port: int, clients: int, seconds: float) -> list[tuple[int, Any]]:
    """``clients`` closed-loop clients asking for profiles for ``seconds``: every answer."""
    answers: list[tuple[int, Any]] = []
    until = 0.0

    async def client(first: int) -> None:
        user_id = first
        while trio.current_time() < until:
            answers.append(await get(port, f"/users/{user_id}"))
            user_id = user_id % 200 + 1

    async def main() -> None:
        nonlocal until
        until = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, 1 + i * 7 % 200)

    trio.run(main)
    return answers


def test_workers_share_one_budget_through_redis(
    tmp_path: Path,
    redis_server: RedisServer,
    rate_bound_violations: Callable[[Sequence[tuple[float, int]], mcs.RateLimit], list[str]],
) -> None:
    log = tmp_path / "queries.log"
    env = {
        "MCS_REDIS_URL": redis_server.url,
        "MCS_DB_RATE": "10",
        "MCS_DB_IN_FLIGHT": "2",
        "MCS_WORKERS": "2",
        "MCS_EXAMPLE_QUERY_LOG": str(log),
    }
    with hypercorn(tmp_path, 2, **env) as server:
        answers = drive(server.port, 40, 3.0)
        returncode, stderr = server.stop()
    assert returncode == 0, stderr
    assert answers
    assert all(status == 200 for status, _ in answers)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for _, _, pid in rows}) == 2  # both workers queried the database
    for table in ("users", "posts"):
        starts = [(float(at), 1) for at, name, _ in rows if name == table]
        # the log is written in the query's thread, a little after its batch took its turn:
        # one query of allowance for that delay (the budget's burst is 2)
        budget = mcs.RateLimit(10, per=1.0, burst=3)
        assert rate_bound_violations(starts, budget) == [], table
        span = max(at for at, _ in starts) - min(at for at, _ in starts)
        assert len(starts) >= 0.8 * 10 * span  # and they used it


def test_workers_serve_on_their_share_when_redis_is_down(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "MCS_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "MCS_DB_RATE": "1000",
        "MCS_DB_IN_FLIGHT": "4",
        "MCS_WORKERS": "2",
    }
    with hypercorn(tmp_path, 2, **env) as server:
        answers = get_all(server.port, [f"/users/{i}" for i in range(1, 41)])
        returncode, stderr = server.stop()
    for user_id, answer in enumerate(answers, start=1):
        check_page(user_id, answer)
    assert returncode == 0, stderr
