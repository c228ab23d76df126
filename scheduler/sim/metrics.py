"""Scheduling-quality figures of one simulated run: allocation, waits, preemption, fairness."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.sim.records import SimJob, SimResult
from scheduler.sim.timeline import FloatArray

SIZE_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("1", 1, 1),
    ("2-8", 2, 8),
    ("9-32", 9, 32),
    ("33+", 33, 1 << 30),
)
SLOWDOWN_BOUND_S = 10.0  # bounded slowdown's floor on run time, as in the batch literature
HOUR_S = 3_600.0


@dataclass(frozen=True, slots=True)
class Series:
    """Time series for the plots, bucketed at the simulation's resolution."""

    edges_s: FloatArray
    allocation_ratio: FloatArray
    waiting: FloatArray  # fraction of each bucket with work waiting
    tenant_alloc: dict[str, FloatArray]  # mean GPUs held per bucket
    tenant_demand: dict[str, FloatArray]
    guaranteed: dict[str, int]
    waits_by_size: dict[str, FloatArray]


def distribution(values: Sequence[float] | FloatArray) -> dict[str, float | int]:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return {
        "count": int(data.size),
        "mean": round(float(data.mean()), 3),
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
    }


def size_bucket(gpus: int) -> str:
    for name, low, high in SIZE_BUCKETS:
        if low <= gpus <= high:
            return name
    raise ValueError(gpus)


def water_fill(demand: FloatArray, weights: FloatArray, capacity: float) -> FloatArray:
    """Weighted max-min fair split of `capacity`: nobody gets more than it asks for."""
    share = np.zeros_like(demand)
    active = demand > 0
    left = capacity
    while active.any() and left > 1e-9:
        level = left / weights[active].sum()
        satisfied = active & (demand - share <= level * weights + 1e-9)
        if not satisfied.any():
            share[active] += level * weights[active]
            break
        left -= float((demand[satisfied] - share[satisfied]).sum())
        share[satisfied] = demand[satisfied]
        active &= ~satisfied
    return share


def _by_size(jobs: Sequence[SimJob], attr: str) -> dict[str, Any]:
    values: dict[str, list[float]] = {"all": []}
    for name, _, _ in SIZE_BUCKETS:
        values[name] = []
    for job in jobs:
        value = _value(job, attr)
        values["all"].append(value)
        values[size_bucket(job.gpus)].append(value)
    return {name: distribution(v) for name, v in values.items()}


def _value(job: SimJob, attr: str) -> float:
    jct = job.end_s - job.trace.submit_time_s
    if attr == "jct":
        return jct
    if attr == "wait":
        return job.wait_s
    return max(1.0, jct / max(job.trace.duration_s, SLOWDOWN_BOUND_S))


def summarize(result: SimResult, bucket_s: float, grace_s: float) -> tuple[dict[str, Any], Series]:
    """All figures of one run (deterministic: no wall-clock times in here) and its series."""
    jobs = result.jobs
    done = [j for j in jobs if j.outcome in ("COMPLETED", "TIMEOUT")]
    outcomes = {
        k: sum(1 for j in jobs if j.outcome == k)
        for k in ("COMPLETED", "TIMEOUT", "UNSCHEDULABLE", "UNFINISHED")
    }
    horizon = max(result.stats.end_s, bucket_s)
    edges = np.arange(0.0, horizon + bucket_s, bucket_s)
    last_arrival = max((j.trace.submit_time_s for j in jobs), default=0.0)

    cluster = result.timeline.cluster
    alloc, waiting = cluster.column(0), cluster.column(1)
    alloc_b = np.diff(cluster.cumulative(alloc, edges))
    waiting_b = np.diff(cluster.cumulative(waiting, edges))
    busy_waiting_b = np.diff(cluster.cumulative(alloc * waiting, edges))
    total = float(result.total_gpus)
    arrival_edges = np.array([0.0, max(last_arrival, 1.0)])
    alloc_arrivals = float(np.diff(cluster.cumulative(alloc, arrival_edges))[0])
    allocation = {
        "overall_ratio": round(float(alloc_b.sum()) / (total * horizon), 4),
        "during_arrivals_ratio": round(alloc_arrivals / (total * float(arrival_edges[1])), 4),
        "while_waiting_ratio": round(
            float(busy_waiting_b.sum()) / max(total * float(waiting_b.sum()), 1e-9), 4
        ),
        "time_with_waiting_work_h": round(float(waiting_b.sum()) / HOUR_S, 2),
        "idle_while_waiting_gpu_h": _idle(result, total * float(waiting_b.sum()), busy_waiting_b),
    }
    delivered_gpu_h = float(alloc_b.sum()) / HOUR_S
    lost_gpu_h = sum(j.lost_gpu_s for j in jobs) / HOUR_S

    tenants, series_alloc, series_demand, fair_inputs = _tenants(result, edges, bucket_s, grace_s)
    fair = water_fill_over_time(fair_inputs, result, total, bucket_s)
    ratios = []
    for name, figures in tenants.items():
        figures["entitled_fair_gpu_h"] = round(float(fair[name]) / HOUR_S, 2)
        if fair[name] > 0:
            ratio = float(series_alloc[name].sum()) * bucket_s / fair[name]
            figures["received_over_fair"] = round(ratio, 4)
            ratios.append(ratio)
    x = np.asarray(ratios)
    squares = float((x**2).sum())
    jain = float(x.sum() ** 2 / (x.size * squares)) if squares > 0 else 1.0
    worst = max(tenants.items(), key=lambda kv: kv[1]["worst_1h_shortfall_gpus"], default=None)
    starved = max(tenants.items(), key=lambda kv: kv[1]["longest_in_quota_wait_s"], default=None)

    preempted = [j for j in jobs if j.preemptions]
    wait_s = _by_size(done, "wait")
    summary: dict[str, Any] = {
        "policy": result.policy,
        "gpus": result.total_gpus,
        "jobs": {"total": len(jobs), **{k.lower(): v for k, v in outcomes.items()}},
        "allocation": allocation,
        "jct_s": _by_size(done, "jct"),
        "wait_s": wait_s,
        "wait_p99_33plus_over_all": _p99_ratio(wait_s["33+"], wait_s["all"]),
        "bounded_slowdown": _by_size(done, "slowdown"),
        "preemptions": {
            "count": sum(j.preemptions for j in jobs),
            "jobs_preempted": len(preempted),
            "gpu_hours_lost": round(lost_gpu_h, 2),
            "gpu_hours_delivered": round(delivered_gpu_h, 2),
            "lost_over_delivered": round(lost_gpu_h / delivered_gpu_h, 6)
            if delivered_gpu_h
            else 0.0,
        },
        "fairness": {
            "jain_index": round(jain, 4),
            "worst_1h_shortfall_gpus": worst[1]["worst_1h_shortfall_gpus"] if worst else 0.0,
            "worst_1h_shortfall_tenant": worst[0] if worst else None,
            "longest_in_quota_wait_s": starved[1]["longest_in_quota_wait_s"] if starved else 0.0,
            "longest_in_quota_wait_tenant": starved[0] if starved else None,
        },
        "tenants": tenants,
        "makespan_s": round(max((j.end_s for j in done), default=0.0), 1),
    }
    waits = {
        name: np.sort(np.array([j.wait_s for j in done if size_bucket(j.gpus) == name]))
        for name, _, _ in SIZE_BUCKETS
    }
    series = Series(
        edges_s=edges,
        allocation_ratio=alloc_b / (total * bucket_s),
        waiting=waiting_b / bucket_s,
        tenant_alloc=series_alloc,
        tenant_demand=series_demand,
        guaranteed={o.name: sum(o.guaranteed.values()) for o in result.orgs},
        waits_by_size=waits,
    )
    return summary, series


def _idle(result: SimResult, idle_gpu_s: float, busy_waiting: FloatArray) -> dict[str, float]:
    """Idle GPU-hours while work waits, by cause, with their total from the timeline.

    The causes come from the engine's ledger (none for a recorded history); `total` is the
    same quantity integrated from the cluster timeline, which the causes add up to.
    """
    out = {cause: round(gpu_s / HOUR_S, 2) for cause, gpu_s in result.stats.idle_gpu_s.items()}
    out["total"] = round((idle_gpu_s - float(busy_waiting.sum())) / HOUR_S, 2)
    return out


def _p99_ratio(big: dict[str, float | int], every: dict[str, float | int]) -> float | None:
    """Wait p99 of the 33+ GPU jobs over that of all jobs (None without such jobs or waits)."""
    if not big.get("count") or not every.get("p99"):
        return None
    return round(float(big["p99"]) / float(every["p99"]), 3)


def _tenants(
    result: SimResult, edges: FloatArray, bucket_s: float, grace_s: float
) -> tuple[dict[str, dict[str, Any]], dict[str, FloatArray], dict[str, FloatArray], FloatArray]:
    window = max(1, round(HOUR_S / bucket_s))
    tenants: dict[str, dict[str, Any]] = {}
    series_alloc: dict[str, FloatArray] = {}
    series_demand: dict[str, FloatArray] = {}
    demand_rows = []
    finished: list[list[SimJob]] = [[] for _ in result.orgs]
    for job in result.jobs:
        if job.outcome in ("COMPLETED", "TIMEOUT"):
            finished[job.org_index].append(job)
    for index, org in enumerate(result.orgs):
        log = result.timeline.orgs[index]
        alloc, demand, borrowed = log.column(0), log.column(1), log.column(2)
        guaranteed = float(sum(org.guaranteed.values()))
        owed = np.maximum(np.minimum(demand, guaranteed) - alloc, 0.0)
        alloc_b = np.diff(log.cumulative(alloc, edges))
        demand_b = np.diff(log.cumulative(demand, edges))
        owed_b = np.diff(log.cumulative(owed, edges))
        guar_b = np.diff(log.cumulative(np.minimum(demand, guaranteed), edges))
        hourly = np.convolve(owed_b, np.ones(window), mode="valid") if owed_b.size else owed_b
        worst_1h = float(hourly.max()) / HOUR_S if hourly.size else 0.0
        series_alloc[org.name] = alloc_b / bucket_s
        series_demand[org.name] = demand_b / bucket_s
        demand_rows.append(demand_b / bucket_s)
        starved_s = result.stats.starved_max_s[index] if result.stats.starved_max_s else 0.0
        tenants[org.name] = {
            "guaranteed_gpus": int(guaranteed),
            "jobs": sum(1 for j in result.jobs if j.org_index == index),
            "received_gpu_h": round(float(alloc_b.sum()) / HOUR_S, 2),
            "borrowed_gpu_h": round(
                float(np.diff(log.cumulative(borrowed, edges)).sum()) / HOUR_S, 2
            ),
            "demanded_gpu_h": round(float(demand_b.sum()) / HOUR_S, 2),
            "entitled_guarantee_gpu_h": round(float(guar_b.sum()) / HOUR_S, 2),
            "worst_1h_shortfall_gpus": round(worst_1h, 2),
            "longest_in_quota_wait_s": round(starved_s, 1),
            "in_quota_wait_within_bound": starved_s <= HOUR_S + grace_s,
            "wait_s": distribution([j.wait_s for j in finished[index]]),
            "jct_s": distribution([_value(j, "jct") for j in finished[index]]),
        }
    return tenants, series_alloc, series_demand, np.array(demand_rows)


def water_fill_over_time(
    demand: FloatArray, result: SimResult, capacity: float, bucket_s: float
) -> dict[str, float]:
    """Each tenant's fair share of what was demanded, bucket by bucket, in GPU-seconds."""
    weights = np.array([o.shares for o in result.orgs], dtype=np.float64)
    totals = np.zeros(len(result.orgs))
    if demand.size:
        for column in demand.T:
            if column.sum() <= capacity:
                totals += column
            else:
                totals += water_fill(column, weights, capacity)
    return {o.name: float(totals[i]) * bucket_s for i, o in enumerate(result.orgs)}
