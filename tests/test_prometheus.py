"""mcs.prometheus: exact metrics on the virtual clock, scrapes from the exporter's own thread, and
the HTTP example scraped over HTTP under load, in one process and with hypercorn's workers."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import pytest
import trio
import trio.lowlevel
import trio.testing
from processes import ports_announced, wait_until_accepting
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

import mcs
import mcs.prometheus

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
USERS = 200

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (name, sorted labels), through prometheus-client's parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, batcher: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"batcher": batcher, **labels}.items())))]


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


# ---------------------------------------------------------------------- the collector


async def test_exact_metrics_on_the_virtual_clock(autojump_clock: trio.abc.Clock) -> None:
    async def slow(items: list[int]) -> list[int]:
        await trio.sleep(0.003)
        if 4 in items:
            raise ValueError("no 4")
        return items

    registry = CollectorRegistry()
    mcs.prometheus.register(registry)
    async with mcs.open_batcher(slow, name="slow", max_batch_size=3) as batcher:
        async with trio.open_nursery() as nursery:
            for n in range(5):  # [0, 1, 2] at t=0, then [3, 4] at t=0.003, which fails
                nursery.start_soon(_quietly, batcher, n)
        got = scrape(registry)
    assert value(got, "mcs_batcher_batches_total", "slow") == 2
    assert value(got, "mcs_batcher_items_total", "slow") == 5
    assert value(got, "mcs_batcher_callers_served_total", "slow") == 5
    assert value(got, "mcs_batcher_failed_batches_total", "slow") == 1
    assert value(got, "mcs_batcher_busy_seconds_total", "slow") == pytest.approx(0.006)
    assert value(got, "mcs_batcher_max_in_flight", "slow") == 1
    assert value(got, "mcs_batcher_in_flight", "slow") == 0
    wait = "mcs_batcher_queue_wait_seconds"
    assert value(got, wait + "_bucket", "slow", le="0.0025") == 3
    assert value(got, wait + "_bucket", "slow", le="0.005") == 5
    assert value(got, wait + "_bucket", "slow", le="+Inf") == 5
    assert value(got, wait + "_count", "slow") == 5
    assert value(got, wait + "_sum", "slow") == pytest.approx(0.006)
    assert value(got, "mcs_batcher_batch_size_bucket", "slow", le="2.0") == 1
    assert value(got, "mcs_batcher_batch_size_sum", "slow") == 5
    assert value(got, "mcs_batcher_batch_seconds_count", "slow") == 2
    names = {name for name, _ in got}
    # every metric but the shared-limit gauge, which only a batcher with a shared limit has
    assert names == set(mcs.prometheus.METRIC_NAMES) - {"mcs_batcher_shared_limit_available"}
    # closed: no longer collected (other tests' batchers may be open: look at this one only)
    assert [key for key in scrape(registry) if ("batcher", "slow") in key[1]] == []


async def _quietly(batcher: mcs.Batcher[int, int], n: int) -> None:
    try:
        await batcher(n)
    except ValueError:
        pass


async def test_batchers_of_the_same_name_are_added_up() -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    registry = CollectorRegistry()
    mcs.prometheus.register(registry)
    async with (
        mcs.open_batcher(echo, name="db") as a,
        mcs.open_batcher(echo, name="db", max_in_flight=3) as b,
    ):
        await a(1)
        await b(2)
        await b(3)
        got = scrape(registry)
    assert value(got, "mcs_batcher_items_total", "db") == 3
    assert value(got, "mcs_batcher_max_in_flight", "db") == 4
    assert value(got, "mcs_batcher_queue_wait_seconds_count", "db") == 3
    assert value(got, "mcs_batcher_batch_size_bucket", "db", le="1.0") == 3


async def test_shared_limits_show_whether_their_store_answers() -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    class Flaky(mcs.SharedRate):
        """A shared rate whose store answers only while ``up``."""

        up = True

        @property
        def limit(self) -> mcs.RateLimit:
            return mcs.RateLimit(1000)

        @property
        def available(self) -> bool:
            return self.up

        async def reserve(self, units: int) -> float:
            return 0.0

    registry = CollectorRegistry()
    rate = Flaky()
    async with (
        mcs.open_batcher(echo, name="pooled", max_in_flight=trio.CapacityLimiter(2)) as pooled,
        mcs.open_batcher(echo, name="rated", rate=rate) as rated,
        mcs.open_batcher(echo, name="own") as own,
    ):
        registry.register(mcs.prometheus.BatcherCollector([pooled, rated, own]))
        shared = "mcs_batcher_shared_limit_available"
        got = scrape(registry)
        assert value(got, shared, "pooled", limit="in_flight") == 1
        assert value(got, shared, "rated", limit="rate") == 1
        assert [key for key in got if key[0] == shared] == [
            (shared, (("batcher", "pooled"), ("limit", "in_flight"))),
            (shared, (("batcher", "rated"), ("limit", "rate"))),
        ]  # none for a batcher whose limits are its own
        rate.up = False
        assert value(scrape(registry), shared, "rated", limit="rate") == 0
        assert await rated(5) == 5


async def test_a_collector_over_given_batchers_only() -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    registry = CollectorRegistry()
    async with mcs.open_batcher(echo, name="one") as one, mcs.open_batcher(echo, name="two"):
        registry.register(mcs.prometheus.BatcherCollector([one]))
        await one(1)
        got = scrape(registry)
    assert {dict(labels)["batcher"] for _, labels in got} == {"one"}


async def test_scrapes_from_the_exporters_own_thread_while_loaded() -> None:
    """prometheus_client.start_http_server answers from its own thread: every scrape during the
    load parses, its counters never go down, and the last one is exact."""

    async def echo(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        return items

    registry = CollectorRegistry()
    mcs.prometheus.register(registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    port = server.server_port
    seen: list[float] = []
    stop = threading.Event()

    def scrape_over_http() -> None:
        while not stop.is_set():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                got = parse(r.read().decode())
            if ("mcs_batcher_items_total", (("batcher", "echo"),)) in got:
                seen.append(value(got, "mcs_batcher_items_total", "echo"))

    try:
        with trio.fail_after(TIMEOUT):
            async with mcs.open_batcher(echo, name="echo", max_batch_size=10) as batcher:
                scraper = threading.Thread(target=scrape_over_http)
                scraper.start()
                try:
                    for _ in range(40):
                        async with trio.open_nursery() as nursery:
                            for n in range(50):
                                nursery.start_soon(batcher, n)
                        await trio.sleep(0.001)  # real time: let a scrape land mid-load
                finally:
                    stop.set()
                    await trio.to_thread.run_sync(scraper.join)
                final = scrape(registry)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert value(final, "mcs_batcher_items_total", "echo") == 2000
    assert value(final, "mcs_batcher_callers_served_total", "echo") == 2000
    assert seen == sorted(seen)
    assert seen
    assert all(0 <= n <= 2000 for n in seen)


# ---------------------------------------------------------------------- the HTTP example


def read_port(stream: IO[str] | None, pattern: str) -> int:
    return ports_announced(stream, pattern, 1, TIMEOUT)[0][0]


def stop(process: subprocess.Popen[str]) -> int:
    try:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode


def get(port: int, path: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


# The fixed driver: user ids 1..300 of a data set of 200 users, three times over. An unknown user
# is one call of each batcher; a known user one more of users for its best friend, unless it is
# its own best friend (the graph's memo makes that one call).
IDS = [*range(1, 301)] * 3
KNOWN = sum(1 for i in IDS if i <= USERS)


def drive(port: int) -> dict[str, int]:
    """Send the fixed requests; returns how many calls each batcher must have served."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: get(port, f"/users/{i}"), IDS))
    assert [status for status, _ in answers].count(200) == KNOWN
    assert [status for status, _ in answers].count(404) == len(IDS) - KNOWN
    users = len(IDS)
    for status, body in answers:
        if status == 200:
            user = json.loads(body)["user"]
            users += user["best_friend"] != user["id"]
    return {"users": users, "posts": len(IDS)}


def check_exact(samples: Samples, expected: dict[str, int]) -> None:
    for name, callers in expected.items():
        assert value(samples, "mcs_batcher_callers_served_total", name) == callers
        batches = value(samples, "mcs_batcher_batches_total", name)
        items = value(samples, "mcs_batcher_items_total", name)
        assert 1 <= batches <= items <= callers  # dedupe may share items
        assert value(samples, "mcs_batcher_batch_size_count", name) == batches
        assert value(samples, "mcs_batcher_batch_size_sum", name) == items
        assert value(samples, "mcs_batcher_batch_seconds_count", name) == batches
        assert value(samples, "mcs_batcher_queue_wait_seconds_count", name) == items
        assert value(samples, "mcs_batcher_failed_batches_total", name) == 0
        assert value(samples, "mcs_batcher_in_flight", name) == 0
        assert value(samples, "mcs_batcher_queued", name) == 0


@pytest.fixture
def http_service() -> Iterator[int]:
    process = subprocess.Popen(
        [
            *(sys.executable, str(ROOT / "examples" / "http_service.py")),
            *("--port", "0", "--users", str(USERS)),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = read_port(process.stdout, r"listening on http://127\.0\.0\.1:(\d+)")
        wait_until_accepting(port)
        yield port
    finally:
        assert stop(process) == 0


def test_the_http_example_serves_exact_metrics_under_load(http_service: int) -> None:
    port = http_service
    scrapes: list[Samples] = []
    done = threading.Event()

    def scrape_mid_load() -> None:  # another thread, scraping while the driver runs
        while not done.is_set():
            status, body = get(port, "/metrics")
            assert status == 200
            scrapes.append(parse(body.decode()))

    scraper = threading.Thread(target=scrape_mid_load)
    scraper.start()
    try:
        expected = drive(port)
    finally:
        done.set()
        scraper.join(TIMEOUT)
    status, body = get(port, "/metrics")
    assert status == 200
    check_exact(parse(body.decode()), expected)
    served = [value(s, "mcs_batcher_callers_served_total", "users") for s in scrapes]
    assert served
    assert served == sorted(served)
    assert served[-1] <= expected["users"]


@pytest.mark.parametrize("application", ["examples.http_service:app", "uneven_shutdown:app"])
def test_hypercorn_workers_share_their_metrics(tmp_path: Path, application: str) -> None:
    """Two workers, PROMETHEUS_MULTIPROC_DIR: whichever answers, the counters add up to exactly
    what the driver sent, once every worker has mirrored its batchers. With ``uneven_shutdown``
    the second worker is still ending when hypercorn's parent sends it SIGTERM."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "hypercorn", "-k", "trio", "--workers", "2"),
            *("--bind", "127.0.0.1:0", application),
        ],
        cwd=ROOT,
        env={
            **ENV,
            "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("", "examples", "tests")),
            "MCS_EXAMPLE_USERS": str(USERS),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "MCS_METRICS_INTERVAL": "0.1",
            "UNEVEN_SHUTDOWN_DIR": str(tmp_path),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = read_port(process.stderr, r"Running on http://127\.0\.0\.1:(\d+) ")
        wait_until_accepting(port)
        expected = drive(port)
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, body = get(port, "/metrics")
            assert status == 200
            samples = parse(body.decode())
            try:
                check_exact(samples, expected)
                break
            except (AssertionError, KeyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        files = {path.name.split("_")[0] for path in metrics.glob("*.db")}
    finally:
        returncode = stop(process)
    assert returncode == 0
    assert files >= {"counter", "histogram", "gauge"}
    # one worker per process file: both workers wrote
    assert len({p.name.rsplit("_", 1)[1] for p in metrics.glob("counter_*.db")}) == 2
    # the live gauges of stopped workers were removed at their shutdown
    assert not list(metrics.glob("gauge_live*.db"))
    # and the uneven ending did happen
    assert (tmp_path / "first").exists() == application.startswith("uneven")


MIRROR_SHARED_LIMITS = """
import trio, mcs, mcs.prometheus
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

async def echo(items):
    return items

async def main():
    async with mcs.open_batcher(echo, name="pooled", max_in_flight=trio.CapacityLimiter(2)) as b:
        await b(1)
        mcs.prometheus.mirror()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    print(generate_latest(registry).decode())

trio.run(main)
"""


def test_mirror_writes_the_shared_limit_gauge(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", MIRROR_SHARED_LIMITS],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    got = parse(done.stdout)
    assert value(got, "mcs_batcher_shared_limit_available", "pooled", limit="in_flight") == 1
    assert value(got, "mcs_batcher_items_total", "pooled") == 1


def test_mirror_outside_multiprocess_mode_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"^mcs.prometheus.mirror needs prometheus-client's "):
        mcs.prometheus.mirror()


async def test_run_mirror_checks_its_interval() -> None:
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^interval must be a positive number of seconds, "):
            await mcs.prometheus.run_mirror(bad)


# ---------------------------------------------------------------------- the dashboard

GRAFANA = ROOT / "examples" / "grafana"
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and"}
_NOT_METRICS |= {"or", "unless", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label matchers, ranges or grouping labels."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):  # not in 5m, 0.9
        if not expr[match.end() :].lstrip().startswith("("):  # a function call
            names.add(match[0])
    return names - _NOT_METRICS


def test_metric_names_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (batcher, le) (rate(a_bucket{batcher=~"$b"}'
        "[$__rate_interval]))) / on (batcher) b_total + max without (x) (c) or d offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


async def test_the_dashboard_reads_only_metrics_that_a_scrape_has() -> None:
    dashboard = json.loads((GRAFANA / "dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*map(metric_names, exprs))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= set(re.findall(r"label_values\((\w+)", variable["definition"]))
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Queue depth", "Batch size", "In flight vs limit", "p99 queue wait"} <= titles
    assert any(
        e.startswith("histogram_quantile(0.99,") and "mcs_batcher_queue_wait_seconds_bucket" in e
        for e in exprs
    )

    registry = CollectorRegistry()
    mcs.prometheus.register(registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        async with mcs.open_batcher(_echo, name="echo") as batcher:
            await batcher(1)
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            text = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url).read())
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    scraped = {name for name, _ in parse(text.decode())}
    assert used
    assert used <= scraped, used - scraped
    assert {
        "mcs_batcher_queued",
        "mcs_batcher_in_flight",
        "mcs_batcher_max_in_flight",
        "mcs_batcher_batch_size_sum",
        "mcs_batcher_queue_wait_seconds_bucket",
    } <= used


def test_the_scrape_config_points_at_the_examples_metrics() -> None:
    import yaml  # type: ignore[import-untyped, unused-ignore]

    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]


async def _echo(items: list[int]) -> list[int]:
    return items
