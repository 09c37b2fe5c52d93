"""Helpers for tests that start a real server process and talk to it over loopback."""

from __future__ import annotations

import socket
import time

__all__ = ["wait_until_accepting"]


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
