"""Smoke tests: every example runs, as a user would run it, on the loopback interface.

Each example runs in a subprocess with small sizes; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 60.0
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def read_line(process: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """The next line of the process's stdout, or fail after ``timeout`` seconds."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout} s")
    return process.stdout.readline()


def wait_until_accepting(port: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop(process: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str, str]:
    """Signal the process and collect its exit status and remaining output."""
    try:
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout, stderr


@pytest.fixture
def http_service() -> Iterator[tuple[subprocess.Popen[str], int]]:
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "http_service.py"), "--port", "0", "--users", "500"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(process)
        match = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        port = int(match[1])
        wait_until_accepting(port)
        yield process, port
    finally:
        if process.poll() is None:
            stop(process, signal.SIGTERM)  # gracefully, so that it removes its data set


def test_minimal() -> None:
    result = run_example("minimal.py")
    assert result.returncode == 0, result.stderr
    assert "200 results, e.g. 7 -> 49, 199 -> 39601" in result.stdout
    assert "200 callers served by 4 downstream calls; mean batch size 50.0" in result.stdout


def test_property_test_example() -> None:
    result = run_example("property_test.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tcp_server_self_test() -> None:
    result = run_example("tcp_server.py", "--self-test", "--requests", "300", "--connections", "6")
    assert result.returncode == 0, result.stderr
    assert "300/300 requests answered correctly over 6 connections" in result.stdout
    sizes = [float(s) for s in re.findall(r"mean batch size ([\d.]+)", result.stdout)]
    assert len(sizes) == 2
    assert all(size > 1 for size in sizes)


def test_tcp_server_line_protocol() -> None:
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "tcp_server.py"), "--port", "0"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+) .*\n", read_line(process))
        assert match
        with socket.create_connection(("127.0.0.1", int(match[1])), timeout=TIMEOUT) as conn:
            conn.sendall(b"7\nhello\n99999999\n")
            received = b""
            while received.count(b"\n") < 3:
                chunk = conn.recv(4096)
                assert chunk, received
                received += chunk
    finally:
        returncode, stdout, stderr = stop(process, signal.SIGINT)
    assert sorted(received.splitlines()) == [
        b"7 name=product-7 price=1.49 stock=41",
        b"99999999 error not found",
        b"hello error bad request",
    ]
    assert returncode == 0, stderr
    assert stdout == "stopped\n"


def test_http_service_under_load(http_service: tuple[subprocess.Popen[str], int]) -> None:
    process, port = http_service
    load = run_example(
        "load.py",
        "--url",
        f"http://127.0.0.1:{port}",
        "--requests",
        "200",
        "--concurrency",
        "10",
        "--json",
    )
    assert load.returncode == 0, load.stderr
    result = json.loads(load.stdout)
    assert result["requests"] == 200
    assert result["errors"] == 0
    assert set(result["statuses"]) <= {"200", "404"}
    assert sum(result["statuses"].values()) == 200
    assert result["requests_per_second"] > 0
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"]
    stages = {stage["name"]: stage for stage in result["stages"]}
    assert set(stages) == {"users", "timelines", "followers"}
    assert 0 < stages["timelines"]["items"] <= 200  # equal ids in one batch are sent once
    assert all(stage["mean_batch_size"] >= 1 for stage in stages.values())

    returncode, stdout, stderr = stop(process, signal.SIGTERM)
    assert returncode == 0, stderr
    assert stdout.endswith("stopped\n")


def test_load_text_report(http_service: tuple[subprocess.Popen[str], int]) -> None:
    _, port = http_service
    load = run_example("load.py", "--url", f"http://127.0.0.1:{port}", "--requests", "30")
    assert load.returncode == 0, load.stderr
    assert re.search(
        r"^30 requests in [\d.]+ s from 50 clients: [\d,]+ requests/s$", load.stdout, re.MULTILINE
    )
    assert re.search(r"^latency p50 [\d.]+ ms, p99 [\d.]+ ms$", load.stdout, re.MULTILINE)


def test_load_refuses_a_remote_url() -> None:
    load = run_example("load.py", "--url", "http://example.com:80")
    assert load.returncode == 2
    assert "--url must be on the loopback interface" in load.stderr
