"""A batcher's counters, and the frozen statistics record built from them.

The counters are plain attributes of one slotted object, written by the Trio thread only. A
metrics exporter reads them from its own thread through :meth:`_Counters.snapshot`: each value is
read once, so each is exact, though two of them may be a moment apart.
"""

from __future__ import annotations

from ._histogram import BATCH_SIZE_BOUNDS, SECONDS_BOUNDS, BatcherHistograms, _Buckets
from ._stats import BatcherStatistics, _Samples, _Saturation

__all__ = ["_Counters"]


class _Counters:
    """Everything :class:`mcs.BatcherStatistics` reports that is counted rather than looked up."""

    __slots__ = (
        "batch_size_buckets",
        "batch_time_buckets",
        "batch_times",
        "batches",
        "busy_time",
        "callers_served",
        "cancelled_batches",
        "dropped",
        "ended_items",
        "failed_alone",
        "failed_batches",
        "items",
        "limit_errors",
        "peak_batch",
        "queue_wait_buckets",
        "queue_waits",
        "rate_wait_time",
        "rate_waits",
        "rejected",
        "saturation",
        "split_batches",
        "timed_out_batches",
        "withdrawn",
    )

    def __init__(self) -> None:
        self.batches = 0  # batch_fn calls started
        self.items = 0  # items sent to batch_fn (after dedupe)
        self.callers_served = 0  # callers who got a result or an error from a batch
        self.peak_batch = 0
        self.busy_time = 0.0  # seconds in batch_fn, summed over calls
        self.ended_items = 0  # items of the calls counted in busy_time (autoscale's model)
        self.failed_batches = 0  # batch_fn raised or timed out
        self.timed_out_batches = 0  # cut by batch_timeout
        self.cancelled_batches = 0  # cancelled because every caller left (cancel_abandoned)
        self.rejected = 0
        self.withdrawn = 0
        self.dropped = 0
        self.rate_waits = 0
        self.split_batches = 0  # failed batches cut in two (on_batch_error="split")
        self.failed_alone = 0  # items that failed in a call of their own (split mode)
        self.limit_errors = 0  # batches failed because a shared limit was unavailable
        self.rate_wait_time = 0.0
        self.queue_waits = _Samples()
        self.batch_times = _Samples()
        self.saturation: _Saturation | None = None
        # Cumulative and mergeable (Prometheus histograms), fed where the samples above are.
        self.queue_wait_buckets = _Buckets(SECONDS_BOUNDS)
        self.batch_time_buckets = _Buckets(SECONDS_BOUNDS)
        self.batch_size_buckets = _Buckets(BATCH_SIZE_BOUNDS)

    def histograms(self, name: str) -> BatcherHistograms:
        return BatcherHistograms(
            name,
            self.queue_wait_buckets.snapshot(),
            self.batch_time_buckets.snapshot(),
            self.batch_size_buckets.snapshot(),
        )

    def snapshot(
        self,
        *,
        name: str,
        queued: int,
        waiting_for_room: int,
        in_flight: int,
        max_in_flight: int,
        now: float | None,
    ) -> BatcherStatistics:
        saturation = self.saturation
        batches, items = self.batches, self.items
        return BatcherStatistics(
            name=name,
            queued=queued,
            waiting_for_room=waiting_for_room,
            in_flight=in_flight,
            max_in_flight=max_in_flight,
            batches=batches,
            items=items,
            callers_served=self.callers_served,
            mean_batch_size=items / batches if batches else 0.0,
            peak_batch_size=self.peak_batch,
            queue_wait=self.queue_waits.summary(),
            batch_time=self.batch_times.summary(),
            busy_time=self.busy_time,
            failed_batches=self.failed_batches,
            timed_out_batches=self.timed_out_batches,
            cancelled_batches=self.cancelled_batches,
            rejected=self.rejected,
            withdrawn=self.withdrawn,
            dropped=self.dropped,
            rate_limit_waits=self.rate_waits,
            rate_limit_wait_time=self.rate_wait_time,
            split_batches=self.split_batches,
            failed_alone=self.failed_alone,
            limit_errors=self.limit_errors,
            saturation=0.0 if saturation is None or now is None else saturation.share(now),
        )
