"""The generated workload keeps the Philly figures it is built from."""

from __future__ import annotations

import random
import statistics

from cli.workload import (
    SIZE_COUNTS,
    WorkloadJob,
    generate,
    sample_duration_s,
    sample_hourly_arrivals,
    sample_size,
)


def test_durations_follow_the_published_quantiles() -> None:
    rng = random.Random(7)
    xs = sorted(sample_duration_s(rng) for _ in range(20_000))

    def q(p: float) -> float:
        return xs[int(p * len(xs))]

    assert 50 < q(0.10) < 75
    assert 950 < q(0.50) < 1_350
    assert 9_000 < q(0.90) < 14_000


def test_sizes_and_bursty_arrivals() -> None:
    rng = random.Random(3)
    sizes = [sample_size(rng, 8) for _ in range(20_000)]
    assert 0.90 < sizes.count(1) / len(sizes) < 0.96
    assert set(sizes) <= {s for s in SIZE_COUNTS if s <= 8}
    hours = [sample_hourly_arrivals(rng) for _ in range(20_000)]
    assert 9 < statistics.median(hours) < 13
    assert 25 < statistics.mean(hours) < 40
    assert max(hours) > 10 * statistics.median(hours)  # bursts


def test_generate_compresses_time_and_is_reproducible() -> None:
    def make() -> list[WorkloadJob]:
        return generate(
            random.Random(1),
            trace_hours=6,
            orgs={"a": 0.5, "b": 0.5},
            time_scale=360.0,
            min_duration_s=3.0,
            max_duration_s=30.0,
        )

    jobs = make()
    assert jobs == make()
    assert jobs
    assert all(0 <= j.submit_at_s < 60 for j in jobs)
    assert all(3.0 <= j.duration_s <= 30.0 for j in jobs)
    assert [j.submit_at_s for j in jobs] == sorted(j.submit_at_s for j in jobs)
    assert {j.org for j in jobs} <= {"a", "b"}
