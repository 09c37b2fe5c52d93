"""The demo (``python -m mcs demo`` and ``mcs._demo``) on tiny data sets.

Nothing here asserts on wall-clock time: only on what was served and what was sent downstream.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import mcs
from mcs._demo import (
    ConnectionPool,
    Dataset,
    DemoSummary,
    create_dataset,
    open_dataset,
    request_mix,
    run_comparison,
    run_demo,
)
from mcs._demo._db import (
    MAX_POSTS_PER_USER,
    TIMELINE_LENGTH,
    fetch_follower_counts,
    fetch_timelines,
    fetch_users,
)
from mcs._demo._service import render

ROOT = Path(__file__).resolve().parent.parent
USERS = 300
TINY = ["--users", "200", "--requests", "150", "--concurrency", "15"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return create_dataset(tmp_path_factory.mktemp("demo-data"), users=USERS, seed=3)


@pytest.fixture(scope="module")
def comparison(dataset: Dataset) -> DemoSummary:
    return run_comparison(requests=300, concurrency=30, database=dataset.directory, seed=3)


def run_cli(*args: str, cwd: Path, code: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mcs"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------------------- the data set


def test_dataset_has_the_requested_size(dataset: Dataset) -> None:
    assert dataset.users == USERS
    assert USERS * 5 <= dataset.posts <= USERS * MAX_POSTS_PER_USER
    assert USERS * 5 <= dataset.follows <= USERS * 20
    assert dataset.size_bytes > 0
    assert open_dataset(dataset.directory) == Dataset(
        directory=dataset.directory,
        users=dataset.users,
        posts=dataset.posts,
        follows=dataset.follows,
        seed=3,
        size_bytes=dataset.size_bytes,
    )


def test_dataset_is_determined_by_its_seed(tmp_path: Path, dataset: Dataset) -> None:
    again = create_dataset(tmp_path / "again", users=USERS, seed=3)
    other = create_dataset(tmp_path / "other", users=USERS, seed=4)
    assert (again.posts, again.follows) == (dataset.posts, dataset.follows)
    assert (other.posts, other.follows) != (dataset.posts, dataset.follows)
    with ConnectionPool(again.directory, 1) as a, ConnectionPool(dataset.directory, 1) as b:
        ids = list(range(1, USERS + 1))
        assert a.run(fetch_timelines, ids) == b.run(fetch_timelines, ids)


def test_create_dataset_refuses_bad_arguments(tmp_path: Path, dataset: Dataset) -> None:
    with pytest.raises(ValueError, match=r"^users must be >= 1, got 0$"):
        create_dataset(tmp_path, users=0)
    with pytest.raises(ValueError, match=r"^seed must be >= 0, got -1$"):
        create_dataset(tmp_path, seed=-1)
    with pytest.raises(FileExistsError):
        create_dataset(dataset.directory, users=10)
    with pytest.raises(FileNotFoundError, match="no data set"):
        open_dataset(tmp_path)


def test_batched_queries_answer_like_one_query_per_id(dataset: Dataset) -> None:
    unknown = USERS + 1
    ids = [1, 2, 3, 2, 150, USERS, unknown]
    with ConnectionPool(dataset.directory, 1) as pool:
        queries: list[Callable[[sqlite3.Connection, Sequence[int]], Mapping[int, Any]]] = [
            fetch_users,
            fetch_timelines,
            fetch_follower_counts,
        ]
        for query in queries:
            batched = pool.run(query, ids)
            assert set(batched) == set(ids)
            for i in ids:
                assert batched[i] == pool.run(query, [i])[i]
        users = pool.run(fetch_users, ids)
        timelines = pool.run(fetch_timelines, ids)
        followers = pool.run(fetch_follower_counts, ids)
    assert users[unknown] is None
    assert timelines[unknown] == []
    assert followers[unknown] == 0
    user = users[2]
    assert user is not None
    assert (user.id, user.handle) == (2, "user2")
    for user_id in ids[:-1]:
        posts = timelines[user_id]
        assert len(posts) <= TIMELINE_LENGTH
        assert [p.created for p in posts] == sorted((p.created for p in posts), reverse=True)
        assert all(1 <= p.author_id <= USERS and 20 <= len(p.body) <= 200 for p in posts)
    assert followers[1] > followers[USERS]  # low ids are the popular ones


def test_render_answers_404_for_an_unknown_user() -> None:
    assert render(7, None, [], 0) == {"status": 404, "user_id": 7}


def test_request_mix_is_seeded_and_skewed() -> None:
    mix = request_mix(2_000, 1_000, seed=5)
    assert mix == request_mix(2_000, 1_000, seed=5)
    assert mix != request_mix(2_000, 1_000, seed=6)
    known = [i for i in mix if i <= 1_000]
    assert all(i >= 1 for i in mix)
    assert 0 < len(mix) - len(known) < 100  # about 1% unknown users
    assert sum(i <= 250 for i in known) > len(known) / 3  # popular users are asked for more


# ---------------------------------------------------------------------------- the runs


def test_both_modes_serve_every_request(comparison: DemoSummary) -> None:
    for mode in (comparison.batched, comparison.unbatched):
        assert mode.requests == 300
        assert mode.errors == 0
        assert mode.ok + mode.not_found == 300
        assert len(mode.latencies) == 300
        assert 0 < mode.latency_p50_ms <= mode.latency_p99_ms <= mode.latency_max_ms
    # the same requests, hence the same answers and the same lookups
    b, u = comparison.batched, comparison.unbatched
    assert (b.ok, b.not_found) == (u.ok, u.not_found)
    assert [s.lookups for s in b.stages] == [s.lookups for s in u.stages]
    assert b.lookups == u.lookups > 300 * 2


def test_batching_issues_far_fewer_queries(comparison: DemoSummary) -> None:
    b, u = comparison.batched, comparison.unbatched
    assert u.queries == u.lookups  # one query per lookup
    assert u.mean_batch_size == 1.0
    assert u.batch_sizes == {1: u.queries}
    assert b.mean_batch_size > 1
    assert b.queries * 5 <= u.queries
    assert comparison.query_reduction == u.queries / b.queries
    assert sum(b.batch_sizes.values()) == b.queries
    assert max(b.batch_sizes) <= 100
    for stage in b.stages:
        assert stage.queries < stage.lookups
        assert 1 < stage.mean_batch_size <= stage.peak_batch_size <= 100


def test_memo_and_dedupe_save_lookups(comparison: DemoSummary) -> None:
    b, u = comparison.batched, comparison.unbatched
    # unbatched: no memo, no dedupe, one query per id asked
    assert (u.memo_hits, u.deduped) == (0, 0)
    assert u.ids_sent == u.lookups == u.queries
    # batched: a page's author who is its user, or appears twice, is answered by the memo; an
    # id already queued or in flight for another request is joined rather than sent again
    assert b.memo_hits > 0
    assert b.deduped > 0
    assert b.ids_sent == b.lookups - b.memo_hits - b.deduped
    assert b.ids_sent == sum(b.batch_sizes.get(n, 0) * n for n in b.batch_sizes)
    for stage in b.stages:
        assert stage.ids_sent == stage.lookups - stage.memo_hits - stage.deduped
        assert stage.memo_hits >= 0
        assert stage.deduped >= 0
    users, timelines, followers = b.stages
    assert users.memo_hits > 0
    assert timelines.memo_hits == followers.memo_hits == 0  # one lookup each per request


def test_summary_to_dict_is_json(comparison: DemoSummary) -> None:
    data = json.loads(json.dumps(comparison.to_dict(), allow_nan=False))
    assert set(data) >= {"dataset", "batched", "unbatched", "speedup", "query_reduction"}
    assert "latencies" not in data["batched"]
    assert {"memo_hits", "deduped", "ids_sent"} <= set(data["batched"])
    assert {"memo_hits", "deduped", "ids_sent"} <= set(data["batched"]["stages"][0])
    assert data["batched"]["requests"] == data["unbatched"]["requests"] == 300
    assert data["dataset"]["users"] == USERS


def test_run_demo_runs_one_mode(dataset: Dataset) -> None:
    seen: list[int] = []
    summary = run_demo(
        requests=40,
        concurrency=8,
        batching=False,
        database=dataset.directory,
        rate=mcs.RateLimit(count=100_000, burst=10),
        progress=seen.append,
    )
    assert summary.mode == "unbatched"
    assert summary.requests == 40
    assert summary.queries == summary.lookups
    assert seen[-1] == 40
    assert seen == sorted(seen)


def test_run_demo_generates_its_own_data_set() -> None:
    summary = run_demo(requests=30, concurrency=5, users=50, rate=None)
    assert summary.mode == "batched"
    assert summary.requests == 30
    assert summary.errors == 0


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("requests", 0, r"^requests must be >= 1, got 0$"),
        ("concurrency", -1, r"^concurrency must be >= 1, got -1$"),
        ("max_in_flight", 0, r"^max_in_flight must be >= 1, got 0$"),
    ],
)
def test_run_demo_refuses_bad_arguments(
    dataset: Dataset, argument: str, value: int, message: str
) -> None:
    arguments: dict[str, Any] = {argument: value}
    with pytest.raises(ValueError, match=message):
        run_demo(database=dataset.directory, **arguments)


# ---------------------------------------------------------------------------- the command line


def test_cli_json(tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    result = run_cli("demo", *TINY, "--json", "--out", str(plot), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["batched"]["requests"] == data["unbatched"]["requests"] == 150
    assert data["batched"]["errors"] == data["unbatched"]["errors"] == 0
    assert data["batched"]["queries"] < data["unbatched"]["queries"]
    assert data["batched"]["mean_batch_size"] > 1
    assert data["plot"] == str(plot.resolve())
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert result.stderr == ""  # no progress display in JSON mode


def test_cli_table(tmp_path: Path) -> None:
    result = run_cli("demo", *TINY, "--no-plot", "--db-rate", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in (
        "requests/s",
        "latency p99",
        "database queries",
        "mean batch size",
        "ids asked for by requests",
        "answered by the request's memo",
        "joined a pending lookup (dedupe)",
        "ids sent to the database",
    ):
        assert text in result.stdout
    assert "fewer queries" in result.stdout
    assert "plot saved" not in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--requests", "0"], "argument --requests: must be >= 1, got 0"),
        (["--concurrency", "-5"], "argument --concurrency: must be >= 1, got -5"),
        (["--users", "many"], "argument --users: must be an integer, got 'many'"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--db-rate", "-1"], "argument --db-rate: must be >= 0 and finite, got -1"),
        (["--db-in-flight", "65"], "argument --db-in-flight: must be <= 64, got 65"),
        (["--users", "2_000_000"], "argument --users: must be <= 1_000_000, got 2_000_000"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_cli_refuses_bad_options(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_cli("demo", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("nope/x.png", "argument --out: no such folder: "),
        (".", "argument --out: the plot is a PNG file: the name must end in .png, got '.'"),
        ("plot.svg", "the name must end in .png, got 'plot.svg'"),
        ("folder.png", "argument --out: "),
    ],
)
def test_cli_checks_the_plot_path_before_running(tmp_path: Path, out: str, expected: str) -> None:
    (tmp_path / "folder.png").mkdir()
    result = run_cli("demo", *TINY, "--out", out, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_needs_a_command(tmp_path: Path) -> None:
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: python -m mcs" in result.stderr


def test_cli_says_how_to_install_missing_extras(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['rich'] = sys.modules['matplotlib'] = None; "
        "from mcs.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    result = run_cli("demo", *TINY, cwd=tmp_path, code=code)
    assert result.returncode == 2
    assert "rich and matplotlib" in result.stderr
    assert "pip install 'trio-mcs[demo]'" in result.stderr
    assert "Traceback" not in result.stderr
