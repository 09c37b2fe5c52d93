"""A line-protocol TCP server on ``trio.serve_tcp``: one mcs graph per request.

Protocol: the client sends a product id per line (``42``); the server answers one line per
request, starting with the id so that a client may pipeline requests and match the answers,
which come back in completion order (``42 name=product-42 price=4.20 stock=17``). An id that is
not an integer gets ``<line> error bad request``; an unknown product ``<id> error not found``.

Each connection's handler runs a nursery: the connection's requests run concurrently in it
(at most ``PIPELINE`` at once per connection), and one writer task sends their answers. Each
request is a graph: the product and its stock level are looked up in parallel, through two
batchers shared by every connection, and an ``apply`` node formats the answer. The downstreams
are fakes that take 2 ms per call whatever the batch size, as a database round trip would.

Run a server (loopback only)::

    python examples/tcp_server.py --port 8765
    printf '1\\n2\\n3\\n' | nc -q1 127.0.0.1 8765

or a self-test: a server on a free port plus clients, which checks every answer and prints the
throughput and the batchers' statistics::

    python examples/tcp_server.py --self-test --requests 2000 --connections 20
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

import mcs

HOST = "127.0.0.1"
PRODUCTS = 10_000  # ids 1..PRODUCTS exist
PIPELINE = 128  # requests in progress per connection
MAX_LINE = 64
DOWNSTREAM_SECONDS = 0.002


@dataclass(frozen=True)
class Product:
    id: int
    name: str
    cents: int


async def fetch_products(ids: list[int]) -> dict[int, Product | None]:
    """The product catalogue: one round trip per batch, a mapping keyed by id."""
    await trio.sleep(DOWNSTREAM_SECONDS)
    return {
        i: Product(i, f"product-{i}", 100 + i * 7 % 900) if 1 <= i <= PRODUCTS else None
        for i in ids
    }


async def fetch_stock(ids: list[int]) -> list[int]:
    """The inventory service: results aligned with the ids."""
    await trio.sleep(DOWNSTREAM_SECONDS)
    return [i * 13 % 50 for i in ids]


def answer(product_id: int, product: Product | None, stock: int) -> bytes:
    if product is None:
        return b"%d error not found\n" % product_id
    return b"%d name=%s price=%d.%02d stock=%d\n" % (
        product_id,
        product.name.encode(),
        product.cents // 100,
        product.cents % 100,
        stock,
    )


class Service:
    """The batchers every connection shares."""

    def __init__(
        self, products: mcs.Batcher[int, Product | None], stock: mcs.Batcher[int, int]
    ) -> None:
        self.products = products
        self.stock = stock
        self.requests = 0

    async def handle(self, line: bytes) -> bytes:
        try:
            product_id = int(line)
        except ValueError:
            return line[:MAX_LINE] + b" error bad request\n"
        self.requests += 1
        async with mcs.open_graph(name="product") as g:
            product = g.call(self.products, product_id)
            stock = g.call(self.stock, product_id)
            reply = g.apply(answer, product_id, product, stock)
        return reply.result

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """The ``trio.serve_tcp`` handler: read lines, answer each in a task of the nursery."""
        send, receive = trio.open_memory_channel[bytes](PIPELINE)
        pipeline = trio.Semaphore(PIPELINE)

        async def respond(line: bytes) -> None:
            try:
                await send.send(await self.handle(line))
            finally:
                pipeline.release()

        async def write_answers() -> None:
            async with receive:
                async for data in receive:
                    # coalesce the answers that are ready into one write
                    parts = [data]
                    while len(parts) < PIPELINE:
                        try:
                            parts.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await stream.send_all(b"".join(parts))

        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(write_answers)
                async with send:
                    async with trio.open_nursery() as requests:
                        buffer = b""
                        async for chunk in stream:
                            buffer += chunk
                            *lines, buffer = buffer.split(b"\n")
                            for line in lines:
                                if line.strip():
                                    await pipeline.acquire()
                                    requests.start_soon(respond, line.strip())
                            if len(buffer) > MAX_LINE:
                                break  # not our protocol: hang up
        except trio.BrokenResourceError:
            pass  # the client went away


@asynccontextmanager
async def open_service() -> AsyncIterator[Service]:
    async with (
        mcs.open_batcher(fetch_products, max_in_flight=4, name="products") as products,
        mcs.open_batcher(fetch_stock, max_in_flight=4, name="stock") as stock,
    ):
        yield Service(products, stock)


async def serve(port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve on ``127.0.0.1:port`` (0: a free port) until cancelled; reports the port."""
    async with open_service() as service, trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host=HOST), service.serve_connection, port
        )
        task_status.started(listeners[0].socket.getsockname()[1])


# ---------------------------------------------------------------------------- self-test


@dataclass(frozen=True)
class Report:
    requests: int
    connections: int
    seconds: float
    answered: int
    latency_p50_ms: float
    latency_p99_ms: float
    statistics: tuple[mcs.BatcherStatistics, ...]


async def _client(port: int, ids: list[int], latencies: list[float]) -> int:
    """Pipeline ``ids`` over one connection; check and count the answers."""
    stream = await trio.open_tcp_stream(HOST, port)
    sent: dict[int, list[float]] = {}
    answered = 0
    async with stream, trio.open_nursery() as nursery:

        async def send_all() -> None:
            for start in range(0, len(ids), 50):  # pipelined, 50 requests per write
                chunk = ids[start : start + 50]
                now = time.perf_counter()
                for product_id in chunk:
                    sent.setdefault(product_id, []).append(now)
                await stream.send_all(b"".join(b"%d\n" % product_id for product_id in chunk))

        nursery.start_soon(send_all)
        buffer = b""
        while answered < len(ids):
            chunk = await stream.receive_some()
            if not chunk:
                raise RuntimeError("the server closed the connection early")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                product_id = int(line.split(b" ", 1)[0])
                latencies.append(time.perf_counter() - sent[product_id].pop())
                expected_name = b"name=product-%d " % product_id
                if 1 <= product_id <= PRODUCTS:
                    if expected_name not in line:
                        raise RuntimeError(f"wrong answer for {product_id}: {line!r}")
                elif not line.endswith(b"error not found"):
                    raise RuntimeError(f"wrong answer for {product_id}: {line!r}")
                answered += 1
    return answered


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


async def self_test(requests: int, connections: int) -> Report:
    """Start a server on a free loopback port, send ``requests`` over ``connections``
    pipelined connections, check every answer, and stop the server."""
    latencies: list[float] = []
    answered = 0
    async with open_service() as service, trio.open_nursery() as server:
        listeners = await server.start(
            partial(trio.serve_tcp, host=HOST), service.serve_connection, 0
        )
        port = listeners[0].socket.getsockname()[1]
        # a few ids past the end of the catalogue exercise the not-found path
        ids = [1 + (i * 7919) % (PRODUCTS + 10) for i in range(requests)]
        started = time.perf_counter()
        async with trio.open_nursery() as clients:

            async def client(share: list[int]) -> None:
                nonlocal answered
                count = await _client(port, share, latencies)
                answered += count

            for c in range(connections):
                if ids[c::connections]:
                    clients.start_soon(client, ids[c::connections])
        seconds = time.perf_counter() - started
        server.cancel_scope.cancel()
        statistics = (service.products.statistics(), service.stock.statistics())
    ordered = sorted(latencies)
    return Report(
        requests=requests,
        connections=connections,
        seconds=seconds,
        answered=answered,
        latency_p50_ms=_percentile(ordered, 0.5) * 1e3,
        latency_p99_ms=_percentile(ordered, 0.99) * 1e3,
        statistics=statistics,
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--self-test", action="store_true", help="serve and test, then exit")
    parser.add_argument("--requests", type=_positive, default=2_000, help="self-test requests")
    parser.add_argument("--connections", type=_positive, default=20, help="self-test clients")
    args = parser.parse_args(argv)

    if args.self_test:
        report = trio.run(self_test, args.requests, args.connections)
        print(
            f"self-test: {report.answered}/{report.requests} requests answered correctly over "
            f"{report.connections} connections in {report.seconds:.2f} s "
            f"({report.answered / report.seconds:,.0f} req/s); latency p50 "
            f"{report.latency_p50_ms:.1f} ms, p99 {report.latency_p99_ms:.1f} ms"
        )
        for stats in report.statistics:
            print(
                f"  batcher {stats.name!r}: {stats.items} items in {stats.batches} calls, "
                f"mean batch size {stats.mean_batch_size:.1f}"
            )
        return 0 if report.answered == report.requests else 1

    async def run() -> None:
        # SIGINT (Ctrl+C) or SIGTERM stop the server: its handlers are cancelled and the
        # batchers close.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, args.port)
                print(f"listening on {HOST}:{port} (Ctrl+C to stop)", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        print("stopped", flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
