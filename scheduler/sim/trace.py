"""Workload input for the simulator: trace and quota CSV files, and a synthetic generator."""

from __future__ import annotations

import csv
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TRACE_COLUMNS = ("job_id", "submit_time_s", "duration_s", "num_gpus", "tenant")


class TraceError(ValueError):
    """A trace or quota file that cannot be read as the README describes it."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job as recorded: when it was submitted, how long it ran, how many GPUs it held."""

    name: str
    tenant: str
    submit_time_s: float
    duration_s: float
    num_gpus: int
    gpu_type: str | None = None
    # What a recorded job asked for (`--from-db`); None: the simulator's models decide.
    gpus_per_node: int | None = None  # gang shape; None: the fewest equal tasks
    time_limit_s: float | None = None  # None: SimConfig's time-limit model
    preemptible: bool | None = None  # None: SimConfig.preemptible
    site: str | None = None
    priority_class: str = "normal"


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's guaranteed GPUs of one type (one row of the quotas file).

    A tenant may have one row per GPU type. `gpu_type` None means the cluster's only type;
    `limit` None, no limit; `shares` None, shares in proportion to the tenant's guarantees.
    """

    tenant: str
    gpus: int
    gpu_type: str | None = None
    limit: int | None = None
    shares: float | None = None
    line: int = field(default=0, compare=False)  # in the file, for errors against the cluster


def _rows(path: Path, required: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
        yield from enumerate(reader, start=2)


def load_trace(path: Path, time_scale: float = 1.0) -> list[TraceJob]:
    """Read a trace sorted by submit time; `time_scale` K divides submit times to add contention."""
    if time_scale <= 0:
        raise TraceError("time scale must be positive")
    jobs: list[TraceJob] = []
    for line, row in _rows(path, TRACE_COLUMNS):
        try:
            submit_s = float(row["submit_time_s"]) / time_scale
            duration_s = float(row["duration_s"])
            num_gpus = int(row["num_gpus"])
        except ValueError as exc:
            raise TraceError(f"{path}:{line}: {exc}") from exc
        if num_gpus < 1 or duration_s < 0 or submit_s < 0 or not math.isfinite(duration_s):
            raise TraceError(f"{path}:{line}: GPUs, duration and submit time must be positive")
        gpu_type = (row.get("gpu_type") or "").strip() or None
        jobs.append(
            TraceJob(row["job_id"], row["tenant"], submit_s, duration_s, num_gpus, gpu_type)
        )
    jobs.sort(key=lambda j: j.submit_time_s)  # stable: ties keep file order
    return jobs


def load_quotas(path: Path) -> list[Quota]:
    """Read guarantees: `tenant, gpus[, gpu_type][, limit][, shares]`, one row per tenant and type.

    The README's file (`tenant, nodes, gpus`) is the one-type case: its `nodes` is ignored.
    """
    quotas: list[Quota] = []
    typed: dict[str, set[str | None]] = {}
    shares_of: dict[str, float] = {}
    for line, row in _rows(path, ("tenant", "gpus")):
        tenant = (row["tenant"] or "").strip()
        if not tenant:
            raise TraceError(f"{path}:{line}: tenant must not be empty")
        gpus = _whole(path, line, "gpus", row["gpus"])
        gpu_type = (row.get("gpu_type") or "").strip() or None
        raw_limit = (row.get("limit") or "").strip()
        limit = _whole(path, line, "limit", raw_limit) if raw_limit else None
        if limit is not None and limit < gpus:
            raise TraceError(f"{path}:{line}: limit {limit} is below gpus {gpus} for {tenant}")
        shares = _positive(path, line, (row.get("shares") or "").strip())
        types = typed.setdefault(tenant, set())
        if gpu_type in types:
            what = f"{tenant} {gpu_type}" if gpu_type else tenant
            raise TraceError(f"{path}:{line}: a second row for {what}")
        if types and (gpu_type is None or None in types):
            raise TraceError(
                f"{path}:{line}: {tenant} has several rows; each must name its gpu_type"
            )
        types.add(gpu_type)
        if shares is not None and shares_of.setdefault(tenant, shares) != shares:
            raise TraceError(
                f"{path}:{line}: shares {shares:g} for {tenant}, "
                f"which another row gives {shares_of[tenant]:g}"
            )
        quotas.append(Quota(tenant, gpus, gpu_type, limit, shares, line))
    if not quotas:
        raise TraceError(f"{path}: no quotas")
    return quotas


def _whole(path: Path, line: int, column: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise TraceError(f"{path}:{line}: {column} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise TraceError(f"{path}:{line}: {column} must not be negative, got {value}")
    return value


def _positive(path: Path, line: int, raw: str) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise TraceError(f"{path}:{line}: shares must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise TraceError(f"{path}:{line}: shares must be positive, got {raw}")
    return value


def write_trace(path: Path, jobs: Iterable[TraceJob]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TRACE_COLUMNS)
        for job in jobs:
            writer.writerow(
                [
                    job.name,
                    f"{job.submit_time_s:g}",
                    f"{job.duration_s:g}",
                    job.num_gpus,
                    job.tenant,
                ]
            )


def write_quotas(path: Path, quotas: Iterable[Quota], gpus_per_node: int = 8) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tenant", "nodes", "gpus"])
        for quota in quotas:
            writer.writerow([quota.tenant, quota.gpus // gpus_per_node, quota.gpus])


# Shapes of the whole Philly extract (traces/README.md): GPUs per job and duration percentiles.
_SIZE_WEIGHTS = ((1, 76_627), (2, 1_818), (4, 1_870), (8, 1_643), (16, 199), (32, 67), (64, 6))
_DURATION_PCTS = (
    (0.0, 30.0),
    (0.10, 61.0),
    (0.25, 115.0),
    (0.50, 1_144.0),
    (0.75, 2_932.0),
    (0.90, 11_265.0),
    (0.95, 43_646.0),
    (0.99, 254_758.0),
    (1.0, 600_000.0),
)


def _duration(rng: random.Random) -> float:
    """Log-linear interpolation between the README's duration percentiles."""
    u = rng.random()
    for (p0, d0), (p1, d1) in itertools.pairwise(_DURATION_PCTS):
        if u <= p1:
            frac = (u - p0) / (p1 - p0)
            return round(math.exp(math.log(d0) + frac * (math.log(d1) - math.log(d0))))
    return _DURATION_PCTS[-1][1]


def generate_trace(
    *,
    jobs: int,
    tenants: Sequence[str],
    mean_interarrival_s: float = 114.0,
    max_gpus: int = 64,
    seed: int = 0,
) -> list[TraceJob]:
    """A Philly-shaped synthetic workload, for tests and demos that must not need the real files.

    One tenant submits about half the jobs, as in the README; the rest share the remainder.
    """
    rng = random.Random(seed)
    sizes = [s for s, _ in _SIZE_WEIGHTS if s <= max_gpus]
    weights = [w for s, w in _SIZE_WEIGHTS if s <= max_gpus]
    tenant_weights = [float(len(tenants))] + [1.0] * (len(tenants) - 1)
    out: list[TraceJob] = []
    t = 0.0
    for i in range(jobs):
        t += rng.expovariate(1.0 / mean_interarrival_s)
        out.append(
            TraceJob(
                name=f"synth-{i:06d}",
                tenant=rng.choices(tenants, tenant_weights)[0],
                submit_time_s=round(t),
                duration_s=_duration(rng),
                num_gpus=rng.choices(sizes, weights)[0],
            )
        )
    return out


# Jobs of 64 and 128 GPUs per job of the whole Philly extract (traces/README.md: 6 and 3 of
# 82,247), which the Sep-Oct extract lacks.
BIG_GANG_RATES = ((64, 6 / 82_247), (128, 3 / 82_247))


def add_big_gangs(trace: Sequence[TraceJob], seed: int, rate_factor: float = 1.0) -> list[TraceJob]:
    """The trace plus 64- and 128-GPU gangs at the README's rates (times `rate_factor`).

    Each trace job, independently with each size's rate, brings a gang submitted at the same
    time by the same tenant, with a duration drawn from the README's percentiles: the gangs
    arrive where the trace's load is, from the tenants that submit, reproducibly for a seed.
    """
    rng = random.Random(seed)
    out = list(trace)
    for job in trace:
        for gpus, rate in BIG_GANG_RATES:
            if rng.random() < rate * rate_factor:
                out.append(
                    TraceJob(
                        name=f"big{gpus}-{len(out):06d}",
                        tenant=job.tenant,
                        submit_time_s=job.submit_time_s,
                        duration_s=_duration(rng),
                        num_gpus=gpus,
                    )
                )
    out.sort(key=lambda j: j.submit_time_s)  # stable: a gang follows the job that brought it
    return out
