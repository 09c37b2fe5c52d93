"""Helpers for tests that start a real server process and talk to it over loopback."""

from __future__ import annotations

import os
import re
import select
import socket
import time
from typing import IO

__all__ = ["ports_announced", "wait_until_accepting"]


def ports_announced(
    stream: IO[str] | None, pattern: str, count: int = 1, timeout: float = 60.0
) -> tuple[list[int], str]:
    """The ports of the first ``count`` lines of ``stream`` (a child's pipe) that match
    ``pattern`` (its group 1 is the port), and what the child wrote after the last of them.

    Reads the pipe's file descriptor itself: several lines often arrive in one read, and a
    buffered ``readline`` would keep the later ones where ``select`` cannot see them.

    Raises:
        AssertionError: if the child ends, or ``timeout`` seconds pass, first.
    """
    assert stream is not None
    fd, wanted = stream.fileno(), re.compile(pattern.encode())
    deadline = time.monotonic() + timeout
    pending, ports = b"", list[int]()
    while len(ports) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if ready and not chunk:
            break  # the child closed the pipe: it ended
        pending += chunk
        while len(ports) < count and b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if match := wanted.search(line):
                ports.append(int(match[1]))
    if len(ports) < count:
        raise AssertionError(f"the child did not say where it listens: {pending[-500:]!r}")
    return ports, pending.decode()


def wait_until_accepting(port: int, timeout: float = 60.0) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
