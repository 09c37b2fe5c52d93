"""Benchmarks for mcs: ``python -m bench --help``.

Each workload family lives in its own module (``w1_batcher``, ``w2_graph3``, ``w3_deps_tree``),
the obvious implementations it is compared with in ``baselines``, and the timing and report
writing in ``_harness``. Results go to ``bench/results/`` (markdown, JSON and a PNG chart).
"""
