"""The demo service behind ``python -m mcs demo``, and its parts for benchmarks and examples.

A profile page per request, written as an mcs graph over three batched SQLite lookups (users,
timelines, follower counts), run on a data set generated on the fly, once with batching and once
with one query per lookup::

    from mcs._demo import run_comparison, run_demo

    summary = run_comparison(requests=10_000, concurrency=1_000)   # both modes, one data set
    print(summary.speedup, summary.batched.requests_per_second)

    one = run_demo(requests=5_000, batching=False, database=folder)  # one mode, in this process

Several processes may run :func:`run_demo` over one data set from :func:`create_dataset` (it is
opened read-only), which is how a scale-out benchmark can use it. Nothing here imports rich or
matplotlib; only the command line's report does.
"""

from ._db import ConnectionPool as ConnectionPool
from ._db import Dataset as Dataset
from ._db import Post as Post
from ._db import User as User
from ._db import create_dataset as create_dataset
from ._db import open_dataset as open_dataset
from ._run import DEFAULT_RATE as DEFAULT_RATE
from ._run import DemoSummary as DemoSummary
from ._run import ModeSummary as ModeSummary
from ._run import StageSummary as StageSummary
from ._run import request_mix as request_mix
from ._run import run_comparison as run_comparison
from ._run import run_demo as run_demo
from ._service import Service as Service
from ._service import open_service as open_service

__all__ = [
    "DEFAULT_RATE",
    "ConnectionPool",
    "Dataset",
    "DemoSummary",
    "ModeSummary",
    "Post",
    "Service",
    "StageSummary",
    "User",
    "create_dataset",
    "open_dataset",
    "open_service",
    "request_mix",
    "run_comparison",
    "run_demo",
]
