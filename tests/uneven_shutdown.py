"""The example service for ``hypercorn --workers 2``, with its two workers ending unevenly.

The first worker to complete its lifespan shutdown goes on at once; the second waits until the
first has exited, and half a second more, before it does. Hypercorn's parent, seeing the first
one gone, sends the second SIGTERM meanwhile: everything a worker does up to the end of its
lifespan must still happen. The workers meet at a file in ``UNEVEN_SHUTDOWN_DIR`` holding the
first one's pid. Run with ``examples/`` and ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio
from http_service import App
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from observability import observe


class SecondEndsLate:
    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        async def send_late_if_second(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                first = first_to_end()
                if first is not None:
                    with trio.move_on_after(10):
                        while alive(first):  # noqa: ASYNC110 (another process: no Event to wait on)
                            await trio.sleep(0.01)
                    await trio.sleep(0.5)
            await send(message)

        await self.app(scope, receive, send_late_if_second if scope["type"] == "lifespan" else send)


def first_to_end() -> int | None:
    """None in the first worker to get here; the first one's pid in the other."""
    path = Path(os.environ["UNEVEN_SHUTDOWN_DIR"]) / "first"
    try:
        with path.open("x") as file:
            file.write(str(os.getpid()))
    except FileExistsError:
        return int(path.read_text())
    return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs still. An exited worker can stay a zombie for a while (hypercorn's
    parent may reap it only at its own exit), so that counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


app = observe(SecondEndsLate(App(hold_sigterm=True)))
