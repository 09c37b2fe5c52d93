"""The accumulators behind ``statistics()``: exact values, the window, the cache, and reading
from another thread while the trio thread records."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

import mcs
from mcs import _stats
from mcs._stats import _Samples, _Saturation


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads as often as CPython allows, so that reads land between writes."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.fixture
def summaries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the windows summarised (each one a sort)."""
    sizes: list[int] = []
    summarise = _stats._summarise

    def counting(values: list[float]) -> mcs.Percentiles:
        sizes.append(len(values))
        return summarise(values)

    monkeypatch.setattr(_stats, "_summarise", counting)
    return sizes


# ---------------------------------------------------------------------------- _Samples


def test_no_samples() -> None:
    assert _Samples().summary() == mcs.Percentiles(count=0, p50=0.0, p90=0.0, p99=0.0, max=0.0)


def test_nearest_rank() -> None:
    samples = _Samples()
    samples.extend([10.0, 1.0, 9.0, 2.0, 8.0])
    samples.add(3.0)
    samples.extend((7.0, 4.0))
    samples.add(6.0)
    samples.add(5.0)
    assert samples.summary() == mcs.Percentiles(count=10, p50=5.0, p90=9.0, p99=10.0, max=10.0)


def test_the_window_is_the_last_1024_samples() -> None:
    samples = _Samples()
    samples.extend([float(i) for i in range(1000)])
    for i in range(1000, 2000):
        samples.add(float(i))
    # 976.0 ... 1999.0: rank ceil(q * 1024) counts from 976.0
    assert samples.summary() == mcs.Percentiles(
        count=1024, p50=976.0 + 511, p90=976.0 + 921, p99=976.0 + 1013, max=1999.0
    )


def test_a_summary_is_cached_until_a_sample_arrives(summaries: list[int]) -> None:
    samples = _Samples()
    first = samples.summary()
    assert samples.summary() is first
    assert summaries == []  # nothing recorded yet: nothing to sort
    samples.extend([2.0, 1.0])
    second = samples.summary()
    assert second == mcs.Percentiles(count=2, p50=1.0, p90=2.0, p99=2.0, max=2.0)
    assert samples.summary() is second
    assert samples.summary() is second
    assert summaries == [2]
    samples.extend([])
    assert samples.summary() is second
    assert summaries == [2]
    samples.add(3.0)
    third = samples.summary()
    assert third == mcs.Percentiles(count=3, p50=2.0, p90=3.0, p99=3.0, max=3.0)
    assert samples.summary() is third
    assert summaries == [2, 3]


def test_a_repeated_sample_still_counts_as_new(summaries: list[int]) -> None:
    samples = _Samples()
    samples.extend([1.0] * 1024)
    assert samples.summary().count == 1024
    samples.add(1.0)  # same window contents, same summary, but a new sample
    assert samples.summary() == mcs.Percentiles(count=1024, p50=1.0, p90=1.0, p99=1.0, max=1.0)
    assert summaries == [1024, 1024]


def test_summary_from_another_thread_while_samples_arrive(busy_switching: None) -> None:
    samples = _Samples()
    done = threading.Event()
    seen: list[mcs.Percentiles] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not done.is_set():
                seen.append(samples.summary())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20_000):
            samples.add(float(i))
            samples.extend([float(i), float(i) + 0.5])
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen
    for summary in seen:
        assert 0 <= summary.count <= 1024
        assert summary.p50 <= summary.p90 <= summary.p99 <= summary.max
    # 1024 samples from the last 342 rounds of three: the cache is not stale once writing stops
    assert samples.summary() == mcs.Percentiles(
        count=1024, p50=19829.0, p90=19965.5, p99=19996.0, max=19999.5
    )


# ---------------------------------------------------------------------------- _Saturation


def test_saturation_share() -> None:
    saturation = _Saturation(now=0.0)
    assert saturation.share(0.0) == 0.0
    saturation.update(True, 0.25)
    assert saturation.share(0.5) == 0.5  # open since 0.25, over the 0.5 s since creation
    saturation.update(False, 0.75)
    assert saturation.share(1.0) == 0.5
    saturation.update(True, 1.5)
    assert saturation.share(1.5) == 0.25  # [0.5, 1.5]: 0.25 busy, the new stretch is empty
    assert saturation.share(2.0) == 0.5  # [1.0, 2.0]: only the open stretch
    assert saturation.share(1.25) == 0.5  # a "now" read before the stretch opened
    saturation.update(False, 3.0)
    assert saturation.share(3.0) == 1.0
    assert saturation.share(3.5) == 0.5
    assert saturation.share(10.0) == 0.0  # long after the run ended


def test_saturation_ignores_empty_and_repeated_updates() -> None:
    saturation = _Saturation(now=0.0, window=2.0)
    saturation.update(True, 1.0)
    saturation.update(False, 1.0)  # an empty stretch leaves nothing behind
    saturation.update(False, 1.5)
    saturation.update(True, 1.5)
    saturation.update(True, 1.75)  # still the stretch from 1.5
    saturation.update(False, 2.0)
    assert saturation.share(2.0) == 0.25
    assert saturation.share(3.0) == 0.25


def test_saturation_forgets_stretches_outside_the_window() -> None:
    saturation = _Saturation(now=0.0)
    for i in range(1000):
        saturation.update(True, i)
        saturation.update(False, i + 0.5)
    assert len(saturation._busy) == 1
    assert saturation.share(999.75) == 0.5


def test_share_from_another_thread_while_slots_fill_and_empty(busy_switching: None) -> None:
    saturation = _Saturation(now=0.0)
    done = threading.Event()
    shares: list[float] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not done.is_set():
                shares.append(saturation.share(50.0))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(50_000):
            saturation.update(True, i / 1000)
            saturation.update(False, i / 1000 + 0.0005)
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert shares
    assert all(0.0 <= share <= 1.0 for share in shares)
    assert saturation.share(50.0) == pytest.approx(0.5, abs=1e-9)
