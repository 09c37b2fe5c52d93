"""Prometheus metrics for every batcher of the process (``pip install 'trio-mcs[prometheus]'``).

One process::

    import mcs.prometheus
    mcs.prometheus.register()  # once, at start-up: the default prometheus_client registry

Every batcher open at scrape time is collected, labelled ``batcher="<name>"``: counters
(``mcs_batcher_batches_total``, ``…_items_total``, ``…_callers_served_total``, failures,
refusals, rate-limit waits), gauges (``mcs_batcher_queued``, ``…_in_flight``,
``…_max_in_flight``, ``…_saturation``) and histograms with fixed buckets
(``mcs_batcher_queue_wait_seconds``, ``mcs_batcher_batch_seconds``, ``mcs_batcher_batch_size``).
Batchers that share a name are added up (the histograms are cumulative, so they merge).
Collecting reads :meth:`mcs.Batcher.statistics` and :meth:`mcs.Batcher.histograms`, which are
safe from any thread: the exporter's own thread (``prometheus_client.start_http_server``) works.

Several worker processes (``hypercorn --workers N``). prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) merges the metrics that each process writes to files in that
folder, and ignores custom collectors: a collector here would report only the worker that
happened to answer the scrape. So in that mode each worker *mirrors* its values into the
folder, through prometheus-client's own multiprocess value files: :func:`mirror` writes them
once, :func:`run_mirror` every ``interval`` seconds (run it in the worker's nursery), and the
worker that answers a scrape calls :func:`mirror` first so its own numbers are current. The
folder is then read by ``prometheus_client.multiprocess.MultiProcessCollector`` as usual:
counters and histogram buckets are summed over the workers (a worker that stopped keeps its last
values, so totals never go down), gauges are summed over live workers (saturation: the highest
worker). Another worker's values are at most ``interval`` seconds old; the alternative, a
``worker`` label per process, multiplies the series by the workers and loses them at each
restart.

Shared limits (``on_batch_error="split"``, limits shared through Redis): their counters
(``mcs_batcher_split_batches_total``, ``…_failed_alone_total``, ``…_limit_errors_total``) are
exported with the others, and a batcher with a shared rate or in-flight limit has the gauge
``mcs_batcher_shared_limit_available{batcher, limit="rate"|"in_flight"}``: 1 while the store
behind it (Redis) answers, 0 while the batcher runs on its fallback or fails its callers (the
lowest live worker in multiprocess mode). With a shared in-flight limit,
``mcs_batcher_max_in_flight`` is the shared total, the same in every worker: take ``max``, not
``sum``, over workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import attrs
import trio
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import Batcher, BatcherHistograms, BatcherStatistics, Histogram
from ._registry import open_batchers

__all__ = ["METRIC_NAMES", "BatcherCollector", "mirror", "register", "run_mirror"]

_PREFIX = "mcs_batcher_"
_LABELS = ("batcher",)

# (metric name without _total, help, field of BatcherStatistics)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("batches", "batch_fn calls started", "batches"),
    ("items", "items sent to batch_fn (after dedupe)", "items"),
    ("callers_served", "callers who got a result or an error from a batch", "callers_served"),
    ("failed_batches", "batch_fn calls that raised or timed out", "failed_batches"),
    ("timed_out_batches", "batch_fn calls cut by batch_timeout", "timed_out_batches"),
    ("cancelled_batches", "batch_fn calls cancelled as every caller left", "cancelled_batches"),
    ("rejected", "calls refused with mcs.Overloaded", "rejected"),
    ("withdrawn", "callers who left before their item was sent", "withdrawn"),
    ("dropped", "callers who left while their batch was in flight", "dropped"),
    ("rate_limit_waits", "batches that waited for the rate limit", "rate_limit_waits"),
    (
        "rate_limit_wait_seconds",
        "seconds batches waited for the rate limit",
        "rate_limit_wait_time",
    ),
    ("busy_seconds", "seconds spent in batch_fn calls, summed over calls", "busy_time"),
    # with on_batch_error="split" and shared limits, where the statistics have them
    ("split_batches", "failed batch_fn calls cut in two and sent again", "split_batches"),
    ("failed_alone", "callers whose item failed in a batch_fn call of its own", "failed_alone"),
    ("limit_errors", "batches failed because a shared limit was unavailable", "limit_errors"),
)
_COUNTERS = tuple(c for c in _COUNTERS if c[2] in attrs.fields_dict(BatcherStatistics))

# (metric name, help, field, how workers combine in multiprocess mode)
_GAUGES: tuple[tuple[str, str, str, Literal["livesum", "livemax"]], ...] = (
    ("queued", "items accepted and waiting for a batch", "queued", "livesum"),
    ("waiting_for_room", "callers blocked on a full queue", "waiting_for_room", "livesum"),
    ("in_flight", "batch_fn calls running now", "in_flight", "livesum"),
    ("max_in_flight", "the limit on concurrent batch_fn calls", "max_in_flight", "livesum"),
    ("saturation", "share of the last second with every slot busy", "saturation", "livemax"),
)

_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("queue_wait_seconds", "seconds from a call to its batch starting", "queue_wait"),
    ("batch_seconds", "seconds of each batch_fn call", "batch_time"),
    ("batch_size", "items in each batch_fn call", "batch_size"),
)

_SHARED = _PREFIX + "shared_limit_available"
_SHARED_HELP = "1 while the store behind a shared limit answers, else 0"
_SHARED_LABELS = ("batcher", "limit")

METRIC_NAMES: tuple[str, ...] = (
    *(_PREFIX + name + "_total" for name, _, _ in _COUNTERS),
    *(_PREFIX + name for name, _, _, _ in _GAUGES),
    _SHARED,
    *(_PREFIX + name + end for name, _, _ in _HISTOGRAMS for end in ("_bucket", "_count", "_sum")),
)
"""Every sample name this module exports."""


def _snapshots(
    batchers: Iterable[Batcher[Any, Any]],
) -> dict[str, tuple[BatcherStatistics, BatcherHistograms]]:
    """One statistics record and one set of histograms per batcher name, same names added up."""
    merged: dict[str, tuple[BatcherStatistics, BatcherHistograms]] = {}
    for batcher in batchers:
        stats, hists = batcher.statistics(), batcher.histograms()
        seen = merged.get(stats.name)
        merged[stats.name] = (stats, hists) if seen is None else _add(seen, (stats, hists))
    return merged


def _shared_limits(batchers: Iterable[Batcher[Any, Any]]) -> dict[tuple[str, str], float]:
    """Per (batcher name, ``"rate"`` or ``"in_flight"``): 1.0 if every such shared limit's
    store answers, else 0.0."""
    available: dict[tuple[str, str], float] = {}
    for batcher in batchers:
        dispatcher = batcher._dispatcher
        for kind, limit in (("rate", dispatcher.shared_rate), ("in_flight", dispatcher.slots)):
            if limit is not None:
                key = (batcher.name, kind)
                available[key] = min(available.get(key, 1.0), 1.0 if limit.available else 0.0)
    return available


def _add(
    a: tuple[BatcherStatistics, BatcherHistograms], b: tuple[BatcherStatistics, BatcherHistograms]
) -> tuple[BatcherStatistics, BatcherHistograms]:
    (sa, ha), (sb, hb) = a, b
    summed: dict[str, Any] = {
        field: getattr(sa, field) + getattr(sb, field) for _, _, field in _COUNTERS
    }
    for _, _, field, how in _GAUGES:
        x, y = getattr(sa, field), getattr(sb, field)
        summed[field] = max(x, y) if how == "livemax" else x + y
    stats = attrs.evolve(sa, **summed)
    hists = BatcherHistograms(
        ha.name,
        _merge(ha.queue_wait, hb.queue_wait),
        _merge(ha.batch_time, hb.batch_time),
        _merge(ha.batch_size, hb.batch_size),
    )
    return stats, hists


def _merge(a: Histogram, b: Histogram) -> Histogram:
    counts = tuple(x + y for x, y in zip(a.counts, b.counts, strict=True))
    return Histogram(a.bounds, counts, a.count + b.count, a.sum + b.sum)


def _le(bound: float) -> str:
    """A bucket's ``le`` label, spelt as prometheus-client spells it."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    buckets = [(_le(bound), float(n)) for bound, n in zip(h.bounds, h.counts, strict=True)]
    buckets.append(("+Inf", float(h.count)))
    return buckets


class BatcherCollector(Collector):
    """A prometheus-client collector over batchers: by default every batcher open in the
    process at collect time; or the fixed ``batchers`` given."""

    def __init__(self, batchers: Sequence[Batcher[Any, Any]] | None = None) -> None:
        self._batchers = None if batchers is None else list(batchers)

    def _current(self) -> list[Batcher[Any, Any]]:
        return open_batchers() if self._batchers is None else self._batchers

    def describe(self) -> list[Metric]:
        return []  # the batchers come and go: describe nothing, so registering never collects

    def collect(self) -> Iterator[Metric]:
        batchers = self._current()
        snapshots = _snapshots(batchers)
        counters = {
            name: CounterMetricFamily(_PREFIX + name, doc, labels=_LABELS)
            for name, doc, _ in _COUNTERS
        }
        gauges = {
            name: GaugeMetricFamily(_PREFIX + name, doc, labels=_LABELS)
            for name, doc, _, _ in _GAUGES
        }
        histograms = {
            name: HistogramMetricFamily(_PREFIX + name, doc, labels=_LABELS)
            for name, doc, _ in _HISTOGRAMS
        }
        for label, (stats, hists) in sorted(snapshots.items()):
            for name, _, field in _COUNTERS:
                counters[name].add_metric([label], float(getattr(stats, field)))
            for name, _, field, _ in _GAUGES:
                gauges[name].add_metric([label], float(getattr(stats, field)))
            for name, _, field in _HISTOGRAMS:
                h: Histogram = getattr(hists, field)
                histograms[name].add_metric([label], _buckets(h), sum_value=h.sum)
        shared = GaugeMetricFamily(_SHARED, _SHARED_HELP, labels=_SHARED_LABELS)
        for (label, kind), value in sorted(_shared_limits(batchers).items()):
            shared.add_metric([label, kind], value)
        yield from counters.values()
        yield from gauges.values()
        yield shared
        yield from histograms.values()


def register(registry: CollectorRegistry = REGISTRY) -> BatcherCollector:
    """Register a :class:`BatcherCollector` over every open batcher with ``registry``; returns
    it (``registry.unregister(collector)`` undoes it)."""
    collector = BatcherCollector()
    registry.register(collector)
    return collector


# ---------------------------------------------------------------------- multiprocess mode

# Batchers this process has mirrored, kept until a last write after they close (so that the
# final counts of a drained batcher reach the folder); by id, as in the registry.
_mirrored: dict[int, Batcher[Any, Any]] = {}
_values: dict[tuple[str, str, tuple[str, ...], str], Any] = {}


def _value(
    typ: str, metric: str, sample: str, labels: dict[str, str], help_text: str, mode: str
) -> Any:
    from prometheus_client import values

    names = tuple(labels)
    key = (metric, sample, tuple(labels.values()), mode)
    value = _values.get(key)
    if value is None:
        value = _values[key] = values.ValueClass(
            typ, metric, sample, names, tuple(labels.values()), help_text, multiprocess_mode=mode
        )
    return value


def mirror() -> None:
    """Write this process's batcher metrics to ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
    multiprocess mode), for ``MultiProcessCollector`` in any worker to merge.

    Covers every batcher open now and those mirrored before that have closed since (their
    final values), which are then forgotten.

    Raises:
        RuntimeError: if prometheus-client is not in multiprocess mode (the variable must be set
            before prometheus_client is first imported).
    """
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False) or not os.environ.get(
        "PROMETHEUS_MULTIPROC_DIR"
    ):
        raise RuntimeError(
            "mcs.prometheus.mirror needs prometheus-client's multiprocess mode: set "
            "PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported"
        )
    current = open_batchers()
    closed = [b for key, b in _mirrored.items() if key not in {id(c) for c in current}]
    for batcher in current:
        _mirrored[id(batcher)] = batcher
    for label, (stats, hists) in _snapshots([*current, *closed]).items():
        labels = {"batcher": label}
        for name, doc, field in _COUNTERS:
            metric = _PREFIX + name
            _value("counter", metric, metric + "_total", labels, doc, "").set(
                float(getattr(stats, field))
            )
        for name, doc, field, how in _GAUGES:
            metric = _PREFIX + name
            _value("gauge", metric, metric, labels, doc, how).set(float(getattr(stats, field)))
        for name, doc, field in _HISTOGRAMS:
            metric = _PREFIX + name
            h: Histogram = getattr(hists, field)
            below = 0
            for bound, n in [*zip(h.bounds, h.counts, strict=True), (math.inf, h.count)]:
                # the files hold each bucket's own count; the collector cumulates them
                bucket = {**labels, "le": _le(bound)}
                _value("histogram", metric, metric + "_bucket", bucket, doc, "").set(n - below)
                below = n
            _value("histogram", metric, metric + "_sum", labels, doc, "").set(h.sum)
    for (label, kind), value in _shared_limits(current).items():
        labels = {"batcher": label, "limit": kind}
        _value("gauge", _SHARED, _SHARED, labels, _SHARED_HELP, "livemin").set(value)
    for batcher in closed:
        _mirrored.pop(id(batcher), None)


async def run_mirror(interval: float = 1.0) -> None:
    """Call :func:`mirror` every ``interval`` seconds, and once more when cancelled (so that a
    worker's last counts reach the folder as it stops). Run it in a nursery of each worker.

    Raises:
        RuntimeError: as :func:`mirror`, at once.
        ValueError: if ``interval`` is not a positive number of seconds.
    """
    if not interval > 0 or math.isinf(interval):
        raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
    mirror()
    try:
        while True:
            await trio.sleep(interval)
            mirror()
    finally:
        mirror()
