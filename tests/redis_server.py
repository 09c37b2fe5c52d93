"""A real ``redis-server`` for the tests: started on a free loopback port, no persistence.

``make test`` installs the Debian package where it can (root with apt-get, as on CI); where
the binary is missing, the tests that need it are skipped with that reason.

Import the fixture into a test module: ``from redis_server import RedisServer, redis_server``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

__all__ = ["RedisServer", "redis_server"]

_BINARY = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1, which a test may stop, restart and pause."""

    def __init__(self) -> None:
        assert _BINARY is not None
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it accepts connections."""
        assert _BINARY is not None
        assert self._process is None
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(
            [_BINARY, "--port", str(self.port), *options, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop the server (SIGKILL: no goodbye to the clients), as a crash would."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server: connections stay open, nothing answers (a hung server)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def command(self, *words: str) -> bytes:
        """One command over a plain socket (inline protocol), for checking the server's state."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((" ".join(words) + "\r\n").encode())
            return sock.recv(65536)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test, stopped afterwards."""
    if _BINARY is None:
        pytest.skip("redis-server is not installed (make test installs it: apt-get install)")
    server = RedisServer()
    try:
        yield server
    finally:
        if server._process is not None:
            server.resume()
        server.stop()
