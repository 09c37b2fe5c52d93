"""Smoke tests: every example runs, as a user would run it, on the loopback interface.

Each example runs in a subprocess with small sizes; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import ast
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import wait_until_accepting

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


def test_property_test_example_under_pytest_without_pytest_trio(tmp_path: Path) -> None:
    # as its docstring says, after installing the `testing` extra and pytest only
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:trio", str(EXAMPLES / "property_test.py")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^1 passed", result.stdout.splitlines()[-1].strip("= "))


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
    assert result["engine"] == "processes"
    assert result["requests"] == 200
    assert result["errors"] == 0
    assert set(result["statuses"]) <= {"200", "404"}
    assert sum(result["statuses"].values()) == 200
    assert result["requests_per_second"] > 0
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"]
    stages = {stage["name"]: stage for stage in result["stages"]}
    assert set(stages) == {"users", "posts"}
    # the user and their best friend for each 200; the user alone for each 404
    assert stages["users"]["items"] <= 2 * 200
    assert 0 < stages["posts"]["items"] <= 200  # equal ids in one batch are sent once
    assert all(stage["mean_batch_size"] >= 1 for stage in stages.values())

    returncode, stdout, stderr = stop(process, signal.SIGTERM)
    assert returncode == 0, stderr
    assert stdout.endswith("stopped\n")


def test_load_text_report(http_service: tuple[subprocess.Popen[str], int]) -> None:
    _, port = http_service
    load = run_example("load.py", "--url", f"http://127.0.0.1:{port}", "--requests", "30")
    assert load.returncode == 0, load.stderr
    assert re.search(
        r"^30 requests in [\d.]+ s over 50 connections \(processes\): [\d,]+ requests/s$",
        load.stdout,
        re.MULTILINE,
    )
    assert re.search(r"^latency p50 [\d.]+ ms, p99 [\d.]+ ms$", load.stdout, re.MULTILINE)
    assert re.search(r"^  stage 'posts': \d+ ids in \d+ queries", load.stdout, re.MULTILINE)


def test_load_refuses_a_remote_url() -> None:
    load = run_example("load.py", "--url", "http://example.com:80")
    assert load.returncode == 2
    assert "--url must be on the loopback interface" in load.stderr


def test_load_without_a_server_is_one_line_and_exit_1() -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    load = run_example("load.py", "--url", f"http://127.0.0.1:{port}", "--requests", "5")
    assert load.returncode == 1
    assert load.stdout == ""
    assert re.fullmatch(
        rf"load: cannot use the service at http://127\.0\.0\.1:{port}: .*\n", load.stderr
    )


def test_http_service_on_a_busy_port_is_one_line_and_exit_1(
    http_service: tuple[subprocess.Popen[str], int],
) -> None:
    _, port = http_service
    second = run_example("http_service.py", "--port", str(port), "--users", "50")
    assert second.returncode == 1
    assert second.stdout == ""
    assert second.stderr == f"http_service: 127.0.0.1:{port} is already in use\n"


def test_hypercorn_serves_the_module_level_app_with_two_workers() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "-k",
            "trio",
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "examples.http_service:app",
        ],
        cwd=ROOT,
        env={**ENV, "MCS_EXAMPLE_USERS": "100"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        ready, _, _ = select.select([process.stderr], [], [], TIMEOUT)
        assert ready, "hypercorn printed nothing"
        match = re.search(r"Running on http://127\.0\.0\.1:(\d+) ", process.stderr.readline())
        assert match
        port = int(match[1])
        wait_until_accepting(port)
        pages = [http_get(port, f"/users/{i}") for i in (1, 2, 100, 101)]
        info = http_get(port, "/")
    finally:
        returncode, _, stderr = stop(process, signal.SIGTERM)
    assert [status for status, _ in pages] == [200, 200, 200, 404]
    assert pages[0][1]["user"] == {
        "id": 1,
        "name": "user1",
        "best_friend": pages[0][1]["user"]["best_friend"],
    }
    assert pages[3][1] == {"error": "no user 101"}
    assert info[0] == 200
    assert info[1]["users"] == 100
    assert returncode == 0, stderr


def http_get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def test_examples_use_the_public_api_only() -> None:
    private = []
    for path in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
                names: list[str] = []
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                modules = [node.value.id] if node.value.id == "mcs" else []
                names = [node.attr]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] != "mcs":
                    continue
                if any(part.startswith("_") for part in parts) or any(
                    name.startswith("_") for name in names
                ):
                    private.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert private == []


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed (apt-get install wrk): the load generator is compared with it",
)
def test_load_generator_and_wrk_drive_the_same_server(
    http_service: tuple[subprocess.Popen[str], int],
) -> None:
    """Both engines run against the real server and report the same shape of result. How
    their rates compare is a measurement (it depends on what else the machine runs), so it
    is printed, not asserted."""
    _, port = http_service
    common = ["--url", f"http://127.0.0.1:{port}", "--concurrency", "64", "--json"]
    timed = ["--requests", "1000000", "--duration", "2"]
    warm_up = run_example("load.py", *common, "--requests", "500")
    assert warm_up.returncode == 0, warm_up.stderr
    assert json.loads(warm_up.stdout)["requests"] == 500
    rates: dict[str, float] = {}
    for engine in ("wrk", "processes"):
        load = run_example("load.py", *common, *timed, "--engine", engine)
        assert load.returncode == 0, load.stderr
        result = json.loads(load.stdout)
        assert result["engine"] == engine
        assert result["errors"] == 0
        assert result["requests"] > 0
        assert sum(result["statuses"].values()) == result["requests"], result
        assert set(result["statuses"]) <= {"200", "404"}, result
        rates[engine] = result["requests_per_second"]
    print(f"load.py / wrk requests per second: {rates['processes'] / rates['wrk']:.2f}")
