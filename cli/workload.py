"""Synthetic workloads shaped like Microsoft's Philly trace, generated from its published figures.

Nothing of the trace itself is copied: job sizes follow the trace's GPUs-per-job counts, durations
follow its duration quantiles (log-linear between them), larger jobs run longer so that GPU-hours
by job size come out as in the trace, and arrivals come in bursts: the number of jobs in each
trace hour is log-normal with the trace's median (11) and mean (31.5) jobs per hour.

`time_scale` compresses time: 360 means one trace hour becomes ten seconds, for submit times and
durations alike, so the shape (who waits behind whom) is kept.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

# GPUs per job: counts of the whole Philly extract (82,247 jobs).
SIZE_COUNTS: dict[int, int] = {
    1: 76_627,
    2: 1_818,
    4: 1_870,
    8: 1_643,
    12: 7,
    16: 199,
    24: 7,
    32: 67,
    64: 6,
    128: 3,
}
# Share of GPU-hours by job size (the rest goes to the few larger jobs).
GPU_HOUR_SHARE: dict[int, float] = {1: 0.181, 2: 0.032, 4: 0.167, 8: 0.484, 16: 0.115, 32: 0.018}
# Duration quantiles in seconds; the ends (p0, p100) are our own bounds, not trace figures.
DURATION_QUANTILES: tuple[tuple[float, float], ...] = (
    (0.0, 30.0),
    (0.10, 61.0),
    (0.25, 115.0),
    (0.50, 1_144.0),
    (0.75, 2_932.0),
    (0.90, 11_265.0),
    (0.95, 43_646.0),
    (0.99, 254_758.0),
    (1.0, 1_500_000.0),
)
ARRIVALS_PER_HOUR_MEDIAN = 11.0
ARRIVALS_PER_HOUR_MEAN = 31.5


def _size_duration_factors() -> dict[int, float]:
    """How much longer a job of each size runs than a 1-GPU job, from the GPU-hour shares.

    GPU-hours(s) ∝ count(s) · s · mean_duration(s), so mean_duration(s) ∝ share(s) / (count · s);
    sizes without a published share run as long as 8-GPU jobs.
    """
    total = sum(SIZE_COUNTS.values())
    per_job = {s: share / (SIZE_COUNTS[s] / total * s) for s, share in GPU_HOUR_SHARE.items()}
    base = per_job[1]
    factors = {s: v / base for s, v in per_job.items()}
    return {s: factors.get(s, factors[8]) for s in SIZE_COUNTS}


SIZE_DURATION_FACTOR = _size_duration_factors()


@dataclass(frozen=True, slots=True)
class WorkloadJob:
    submit_at_s: float  # after the start of the workload, compressed
    gpus: int
    duration_s: float  # compressed run time
    trace_duration_s: float  # the uncompressed duration it stands for
    org: str


def sample_size(rng: random.Random, max_gpus: int) -> int:
    sizes = [s for s in SIZE_COUNTS if s <= max_gpus]
    return rng.choices(sizes, weights=[SIZE_COUNTS[s] for s in sizes])[0]


def sample_duration_s(rng: random.Random) -> float:
    """Inverse CDF through the published quantiles, log-linear in between."""
    u = rng.random()
    qs = [q for q, _ in DURATION_QUANTILES]
    i = max(1, bisect.bisect_right(qs, u))
    (q0, d0), (q1, d1) = DURATION_QUANTILES[i - 1], DURATION_QUANTILES[min(i, len(qs) - 1)]
    frac = 0.0 if q1 == q0 else (u - q0) / (q1 - q0)
    return math.exp(math.log(d0) + frac * (math.log(d1) - math.log(d0)))


def sample_hourly_arrivals(rng: random.Random) -> float:
    """Log-normal with the trace's median and mean: bursty, a few hours with 10x the median."""
    sigma = math.sqrt(2 * math.log(ARRIVALS_PER_HOUR_MEAN / ARRIVALS_PER_HOUR_MEDIAN))
    return rng.lognormvariate(math.log(ARRIVALS_PER_HOUR_MEDIAN), sigma)


def generate(
    rng: random.Random,
    *,
    trace_hours: int,
    orgs: dict[str, float],
    time_scale: float,
    rate_scale: float = 1.0,
    max_gpus: int = 8,
    min_duration_s: float = 1.0,
    max_duration_s: float = float("inf"),
) -> list[WorkloadJob]:
    """Jobs for `trace_hours` of trace time, compressed by `time_scale`, sorted by submit time.

    `orgs` maps an org to its weight in submissions (Philly: one tenant submits about half);
    `rate_scale` scales arrivals to the cluster at hand; durations are clamped to the bounds
    after compression (a demo cannot wait for a three-day job).
    """
    names, weights = list(orgs), list(orgs.values())
    hour_s = 3_600.0 / time_scale
    jobs: list[WorkloadJob] = []
    for hour in range(trace_hours):
        count = round(sample_hourly_arrivals(rng) * rate_scale)
        for _ in range(count):
            size = sample_size(rng, max_gpus)
            trace_s = sample_duration_s(rng) * SIZE_DURATION_FACTOR[size]
            compressed = min(max_duration_s, max(min_duration_s, trace_s / time_scale))
            jobs.append(
                WorkloadJob(
                    submit_at_s=(hour + rng.random()) * hour_s,
                    gpus=size,
                    duration_s=round(compressed, 1),
                    trace_duration_s=round(trace_s),
                    org=rng.choices(names, weights=weights)[0],
                )
            )
    jobs.sort(key=lambda j: j.submit_at_s)
    return jobs


def offered_gpu_seconds(jobs: list[WorkloadJob]) -> float:
    return sum(j.gpus * j.duration_s for j in jobs)
