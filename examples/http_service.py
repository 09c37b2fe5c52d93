"""An HTTP service on hypercorn's Trio worker: each request is an mcs graph over SQLite.

``app`` is a plain ASGI application. At start-up (the ASGI lifespan) it writes a small SQLite
data set to a temporary folder and opens two batchers, one per table; at shutdown it closes
them and removes the folder. ``GET /users/<id>`` is a graph per request::

    user(id) ──> friend(user.best_friend) ──┐
    posts(id) ──────────────────────────────┴─> the JSON page

``user`` and ``posts`` start at once; ``friend`` starts when ``user`` has arrived; every lookup
goes through a batcher shared by all live requests, whose batch_fn sends one
``SELECT ... WHERE id IN (...)`` per batch from a worker thread.

Routes (declared in one place, :meth:`App.route`, and ``/metrics`` by ``observe``):
    GET /users/<id>   the profile, JSON (404 for an unknown user, 500 for an id that breaks
                      its query, such as one beyond SQLite's 64-bit INTEGER)
    GET /stats        the batchers' statistics in this process, JSON
    GET /metrics      every batcher's metrics for Prometheus, summed over the workers when
                      ``PROMETHEUS_MULTIPROC_DIR`` is set (``examples/observability.py``)
    GET /             what is served: ``{"users": ..., "pid": ...}``

An id that breaks its query fails alone: the batchers split a failing batch
(``on_batch_error="split"``) until the poison id is in a batch of its own, so every other
caller of that batch gets its page.

Run it with hypercorn (``pip install 'hypercorn[trio]'``), from the repository's root::

    hypercorn -k trio --bind 127.0.0.1:8000 examples.http_service:app
    hypercorn -k trio --workers 2 --bind 127.0.0.1:8000 examples.http_service:app

or on its own, with a graceful stop on SIGINT or SIGTERM::

    python examples/http_service.py --port 8000     # --port 0 picks a free port

On its own, the first line it prints is ``listening on http://127.0.0.1:<port>``; a port that
is already in use is one line on stderr and exit status 1. Drive it from another process with
``examples/load.py``.

Settings come from environment variables, read at start-up by each worker (a bad value fails
the start-up with a message that names it):

    MCS_EXAMPLE_USERS       users in the data set (default 10,000)
    MCS_EXAMPLE_DELAY       seconds each query waits first, as a slower database would (0)
    MCS_EXAMPLE_QUERY_LOG   a file to which each query appends its start time (monotonic
                            clock), table and pid, to count queries across workers
    MCS_DB_RATE             queries per second per table, all workers together (no limit)
    MCS_DB_IN_FLIGHT        queries in flight per table, all workers together (2 per worker
                            without Redis)
    MCS_REDIS_URL           share the two limits above between workers through this Redis;
                            without it every limit holds per worker
    MCS_WORKERS             the workers expected, for the fallback when Redis is unreachable
                            (each takes its share of the budget) (1)
    MCS_CLOSE_SECONDS       at shutdown, how long the batchers may take to finish what they
                            accepted before it is cancelled (5)
    MCS_STOP_SECONDS        under hypercorn, a worker that got SIGTERM ends within this many
                            seconds, drained or not (15)
    PROMETHEUS_MULTIPROC_DIR  an empty folder: ``/metrics`` sums every worker's batchers
    MCS_METRICS_INTERVAL    seconds between two writes of a worker's metrics there (1)

Under ``hypercorn --workers N`` the parent sets a shutdown event on SIGTERM or SIGINT; each
worker stops accepting, lets open requests finish within ``--graceful-timeout`` (3 s by
default), then runs the lifespan shutdown, which closes the batchers within
``MCS_CLOSE_SECONDS``. The parent sends SIGTERM to the workers still running as soon as the
first one has exited, which would kill a worker in the middle of its drain (hypercorn 0.18);
so each worker's lifespan holds SIGTERM and lets the drain finish, and ends the process
anyway ``MCS_STOP_SECONDS`` after the signal. See ``docs/how-to/deployment.md``.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import mcs

if TYPE_CHECKING:
    from observability import observe
else:  # imported as examples.http_service (hypercorn), or run as a script
    observe = import_module(
        f"{__package__}.observability" if __package__ else "observability"
    ).observe

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

HOST = "127.0.0.1"
JSON_HEADERS = [(b"content-type", b"application/json")]
POSTS_PER_PAGE = 5

# ---------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class Settings:
    """What a worker reads from its environment at start-up (see the module's docstring)."""

    users: int = 10_000
    seed: int = 0
    delay: float = 0.0
    query_log: Path | None = None
    rate: float | None = None
    in_flight: int | None = None
    redis_url: str | None = None
    workers: int = 1
    close_seconds: float = 5.0
    stop_seconds: float = 15.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """The settings in ``environ``, then ``overrides`` (the command line's) over them.

        Raises:
            ValueError: for a value that is not a number in its range; the message names it.
        """

        def number(name: str, kind: type[int] | type[float], low: float, above: bool) -> Any:
            text = environ[name]
            try:
                value = kind(text)
            except ValueError:
                value = math.nan
            if not (value > low if above else value >= low) or math.isinf(value):
                bound = f"{'>' if above else '>='} {low:g}"
                raise ValueError(f"{name} must be {kind.__name__} {bound}, got {text!r}")
            return value

        found: dict[str, Any] = {}
        for field, name, kind, low, above in (
            ("users", "MCS_EXAMPLE_USERS", int, 1, False),
            ("delay", "MCS_EXAMPLE_DELAY", float, 0, False),
            ("rate", "MCS_DB_RATE", float, 0, True),
            ("in_flight", "MCS_DB_IN_FLIGHT", int, 1, False),
            ("workers", "MCS_WORKERS", int, 1, False),
            ("close_seconds", "MCS_CLOSE_SECONDS", float, 0, False),
            ("stop_seconds", "MCS_STOP_SECONDS", float, 0, False),
        ):
            if environ.get(name):
                found[field] = number(name, kind, low, above)
        if environ.get("MCS_EXAMPLE_QUERY_LOG"):
            found["query_log"] = Path(environ["MCS_EXAMPLE_QUERY_LOG"])
        if environ.get("MCS_REDIS_URL"):
            found["redis_url"] = environ["MCS_REDIS_URL"]
        return cls(**(found | overrides))


@asynccontextmanager
async def open_limits(settings: Settings, table: str) -> AsyncIterator[dict[str, Any]]:
    """The ``rate=`` and ``max_in_flight=`` of one table's batcher.

    With ``MCS_REDIS_URL`` both are shared by every worker through Redis (keys
    ``mcs-example:<table>:...``); if Redis cannot be reached, each worker falls back to its share
    of the budget (``MCS_WORKERS``). Without it, each worker has the whole budget to itself.
    """
    rate = None if settings.rate is None else mcs.RateLimit(settings.rate, per=1.0, burst=2)
    if settings.redis_url is None:
        yield {"rate": rate, "max_in_flight": settings.in_flight or 2}
        return
    from mcs.redis import open_shared_in_flight, open_shared_rate

    url = settings.redis_url
    shared: dict[str, Any] = {"on_unavailable": "local", "processes": settings.workers}
    limits: dict[str, Any] = {"rate": None, "max_in_flight": 2}
    async with AsyncExitStack() as stack:
        if rate is not None:
            limits["rate"] = await stack.enter_async_context(
                open_shared_rate(url, f"mcs-example:{table}:rate", rate, **shared)
            )
        if settings.in_flight is not None:
            limits["max_in_flight"] = await stack.enter_async_context(
                open_shared_in_flight(
                    url, f"mcs-example:{table}:in-flight", settings.in_flight, **shared
                )
            )
        yield limits


# ---------------------------------------------------------------------- the data


@dataclass(frozen=True)
class User:
    id: int
    name: str
    best_friend: int


def create_dataset(path: Path, users: int, seed: int = 0) -> None:
    """Write ``users`` users (ids 1..users) and 0-9 posts each to a new SQLite file."""
    rng = random.Random(seed)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, best_friend INTEGER)")
        db.execute("CREATE TABLE posts (id INTEGER PRIMARY KEY, author INTEGER, body TEXT)")
        db.execute("CREATE INDEX posts_by_author ON posts (author, id)")
        db.executemany(
            "INSERT INTO users VALUES (?, ?, ?)",
            ((i, f"user{i}", rng.randint(1, users)) for i in range(1, users + 1)),
        )
        db.executemany(
            "INSERT INTO posts (author, body) VALUES (?, ?)",
            (
                (i, f"post {k} by user{i}")
                for i in range(1, users + 1)
                for k in range(rng.randrange(10))
            ),
        )
    db.close()


class Database:
    """One SQLite connection per worker thread, opened read-only on first use."""

    def __init__(self, path: Path, query_log: Path | None = None) -> None:
        self.uri = f"{path.as_uri()}?mode=ro"
        self.local = threading.local()
        self.query_log = query_log

    def connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self.local, "db", None)
        if db is None:
            db = self.local.db = sqlite3.connect(self.uri, uri=True, check_same_thread=False)
        return db

    def log_query(self, table: str) -> None:
        if self.query_log is not None:  # one short append: lines from workers never interleave
            with self.query_log.open("a") as log:
                log.write(f"{time.monotonic():.6f} {table} {os.getpid()}\n")

    def users(self, ids: Sequence[int]) -> dict[int, User | None]:
        self.log_query("users")
        marks = ",".join("?" * len(ids))
        rows = self.connection().execute(f"SELECT * FROM users WHERE id IN ({marks})", ids)
        found = {row[0]: User(*row) for row in rows}
        return {i: found.get(i) for i in ids}

    def posts(self, authors: Sequence[int]) -> dict[int, list[str]]:
        self.log_query("posts")
        marks = ",".join("?" * len(authors))
        rows = self.connection().execute(
            f"SELECT author, body FROM posts WHERE author IN ({marks}) ORDER BY author, id DESC",
            authors,
        )
        found: dict[int, list[str]] = {a: [] for a in authors}
        for author, body in rows:
            if len(found[author]) < POSTS_PER_PAGE:
                found[author].append(body)
        return found


# ---------------------------------------------------------------------- the service


class Service:
    """The two batchers and the graph of a request."""

    def __init__(
        self,
        users: mcs.Batcher[int, User | None],
        posts: mcs.Batcher[int, list[str]],
        size: int,
    ) -> None:
        self.users = users
        self.posts = posts
        self.size = size

    async def profile(self, user_id: int) -> tuple[int, dict[str, Any]]:
        async with mcs.open_graph(timeout=10.0) as g:
            user = g.call(self.users, user_id, name="user")
            posts = g.call(self.posts, user_id, name="posts")
            found = await user
            if found is None:
                return 404, {"error": f"no user {user_id}"}
            friend = g.call(self.users, found.best_friend, name="friend")
            page = _render(found, await posts, await friend)
        return 200, page

    def statistics(self) -> list[mcs.BatcherStatistics]:
        return [self.users.statistics(), self.posts.statistics()]


def _render(user: User, posts: list[str], friend: User | None) -> dict[str, Any]:
    return {
        "user": asdict(user),
        "posts": posts,
        "best_friend": friend.name if friend else None,
    }


@asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[Service]:
    """Create the data set in a temporary folder and open the batchers over it."""
    with tempfile.TemporaryDirectory(prefix="mcs-http-") as folder:
        path = Path(folder) / "data.sqlite3"
        await trio.to_thread.run_sync(create_dataset, path, settings.users, settings.seed)
        db = Database(path, settings.query_log)

        async def load_users(ids: list[int]) -> dict[int, User | None]:
            await trio.sleep(settings.delay)
            return await trio.to_thread.run_sync(db.users, ids)

        async def load_posts(ids: list[int]) -> dict[int, list[str]]:
            await trio.sleep(settings.delay)
            return await trio.to_thread.run_sync(db.posts, ids)

        # on_batch_error="split": a query that fails is split until the id that breaks it is
        # alone, so a poison id fails its own callers only
        common: dict[str, Any] = {"max_batch_size": 200, "dedupe": True, "on_batch_error": "split"}
        async with (
            open_limits(settings, "users") as user_limits,
            open_limits(settings, "posts") as post_limits,
            mcs.open_batcher(load_users, name="users", **common, **user_limits) as users,
            mcs.open_batcher(load_posts, name="posts", **common, **post_limits) as posts,
        ):
            yield Service(users, posts, settings.users)


# ---------------------------------------------------------------------- the ASGI app


class App:
    """The ASGI application: the service lives as long as the ASGI lifespan.

    ``settings`` (fields of :class:`Settings`) win over the environment's. ``hold_sigterm`` (on
    for the module-level ``app``, which hypercorn's workers run) makes the lifespan hold
    SIGTERM, so that hypercorn's parent cannot kill a worker in the middle of its drain; the
    worker still ends ``stop_seconds`` after the signal.
    """

    def __init__(self, *, hold_sigterm: bool = False, **settings: Any) -> None:
        self.hold_sigterm = hold_sigterm
        self.overrides = settings
        self.service: Service | None = None

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            status, body = await self.route(scope["method"], scope["path"])
            headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def lifespan(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            settings = Settings.from_environ(os.environ, **self.overrides)
        except ValueError as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        async with trio.open_nursery() as nursery:
            if self.hold_sigterm:
                await nursery.start(_hold_sigterm, settings.stop_seconds)
            # The close is bounded: what the batchers accepted gets MCS_CLOSE_SECONDS to finish.
            with trio.CancelScope() as closing:
                async with open_service(settings) as self.service:
                    await send({"type": "lifespan.startup.complete"})
                    message = await receive()
                    assert message["type"] == "lifespan.shutdown"
                    self.service = None
                    closing.deadline = trio.current_time() + settings.close_seconds
            # Still holding SIGTERM: what the server does as the lifespan completes (a last
            # metrics write, say) must not be cut short by the parent's SIGTERM either.
            await send({"type": "lifespan.shutdown.complete"})
            nursery.cancel_scope.cancel()

    async def route(self, method: str, path: str) -> tuple[int, bytes]:
        service = self.service
        if service is None:
            return 503, b'{"error": "starting or stopping"}'
        if method != "GET":
            return 405, b'{"error": "method not allowed"}'
        if path.startswith("/users/"):
            try:
                user_id = int(path.removeprefix("/users/"))
            except ValueError:
                return 400, b'{"error": "the user id must be an integer"}'
            try:
                status, page = await service.profile(user_id)  # the request's graph
            except Exception as exc:  # this request's own error: the others go on
                status, page = 500, {"error": f"{type(exc).__name__}: {exc}"}
            return status, json.dumps(page).encode()
        if path == "/stats":
            return 200, json.dumps([_stats(s) for s in service.statistics()]).encode()
        if path == "/":
            return 200, json.dumps({"users": service.size, "pid": os.getpid()}).encode()
        return 404, b'{"error": "not found"}'


async def _hold_sigterm(
    stop_seconds: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Take SIGTERM from the process while the lifespan runs; exit ``stop_seconds`` after it."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            break
        await trio.sleep(stop_seconds)
    # Still here stop_seconds after the signal: end as SIGTERM would have ended us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _stats(stats: mcs.BatcherStatistics) -> dict[str, Any]:
    return {
        "name": stats.name,
        "batches": stats.batches,
        "items": stats.items,
        "failed_batches": stats.failed_batches,
        "split_batches": stats.split_batches,
        "failed_alone": stats.failed_alone,
        "mean_batch_size": stats.mean_batch_size,
        "peak_batch_size": stats.peak_batch_size,
        "queue_wait_p99_ms": stats.queue_wait.p99 * 1e3,
    }


app = observe(App(hold_sigterm=True))
"""The module-level app: ``hypercorn -k trio --workers N examples.http_service:app``."""

# ---------------------------------------------------------------------- run it on its own


async def serve(port: int, application: Any) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.graceful_timeout = 2.0
    config.accesslog = None
    stop = trio.Event()
    # Listen for signals before the server starts, so that none is missed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def watch_signals() -> None:
            async for _ in signals:
                stop.set()
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            binds = await nursery.start(
                partial(hypercorn_serve, application, config, shutdown_trigger=stop.wait)
            )
            print(f"listening on {binds[0]}", flush=True)
            await stop.wait()
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--users", type=int, default=10_000, help="users in the data set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        trio.run(serve, args.port, observe(App(users=args.users, seed=args.seed)))
    except (OSError, BaseExceptionGroup) as exc:
        # hypercorn fails to bind inside its nursery: the OSError comes wrapped in groups
        if any(_in_use(leaf) for leaf in _leaves(exc)):
            print(f"http_service: {HOST}:{args.port} is already in use", file=sys.stderr)
            return 1
        raise
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _in_use(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


if __name__ == "__main__":
    sys.exit(main())
