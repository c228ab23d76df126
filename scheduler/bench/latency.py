"""`fairgpu bench latency`: submit → process start of 1-GPU jobs on an idle simulated cluster.

A real `fairgpu server` and `fairgpu agent --simulate` processes (started by
`scheduler.bench.cluster`, which also stops them and their tasks). Jobs go one at a time: the
next is submitted once the previous one's process has started. The job's command writes
`date +%s.%N` as its first act; the submit time is `time.time()` just before the POST, on the
same machine and clock.

The split shows where the time goes, from the job's own events (server clock, same machine):
`submit_http` (the POST), `to_scheduled` (submit → the cycle's PENDING→STARTING), and
`scheduled_to_start` (→ the process runs: long-poll release, heartbeat reply, agent spawn).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from scheduler.bench.cluster import add_org, cluster
from scheduler.settings import Settings

GPU_MODEL = "H100"
PROCESS_START_TIMEOUT_S = 30.0
POLL_S = 0.002


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, the convention of `fairgpu bench api`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 4),
        "p99": round(percentile(values, 0.99), 4),
        "max": round(max(values), 4),
        "mean": round(statistics.fmean(values), 4),
    }


def _wait_started(marker: Path, deadline: float) -> float:
    while not marker.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no process start within {PROCESS_START_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)
    return float(marker.read_text().strip())


def _scheduled_at(member: httpx.Client, job_id: int) -> float | None:
    """Server time of the cycle's PENDING → STARTING for this job."""
    r = member.get(f"/v1/jobs/{job_id}/events", params={"limit": 50})
    for event in r.json().get("data", []) if r.status_code == 200 else []:
        if event["kind"] == "job.state" and event["to_state"] == "STARTING":
            return datetime.fromisoformat(event["at"]).timestamp()
    return None


def _cycle_mean_s(url: str) -> float | None:
    """Mean scheduling cycle duration from the server's /metrics (all cycles of the run)."""
    totals = {"_sum": 0.0, "_count": 0.0}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for suffix in totals:
            if name.split("{")[0] == f"fairgpu_scheduling_cycle_duration_seconds{suffix}":
                totals[suffix] += float(value)
    return round(totals["_sum"] / totals["_count"], 4) if totals["_count"] else None


def _settings_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The server settings this run changed from the defaults (never a URL or a token)."""
    names = {f"FAIRGPU_{n.upper()}" for n in Settings.model_fields} - {"FAIRGPU_DATABASE_URL"}
    merged = {**os.environ, **extra}
    return {k: merged[k] for k in sorted(names & merged.keys())}


def run_latency_bench(
    *,
    jobs: int = 100,
    warmup: int = 3,
    nodes: int = 2,
    gpus_per_node: int = 4,
    database_url: str | None = None,
    server_env: Mapping[str, str] | None = None,
    isolation: str = "none",
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready result (seconds). Under strict isolation
    (root only) each job runs as its org's uid and writes its marker into a data root."""
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-bench-latency-"))
    markers = workdir / "started"
    markers.mkdir()
    agent_args: tuple[str, ...] = ()
    if isolation == "strict":
        os.chmod(markers, 0o1777)  # noqa: S103 - the bench org's uid writes its markers here
        agent_args = ("--org-root", str(markers))
    spec = f"{gpus_per_node}x{GPU_MODEL}"
    node_specs = [(f"bench-{i + 1}", "bench", spec) for i in range(nodes)]
    env = dict(server_env or {})
    rows: list[dict[str, float]] = []
    cycle_mean_s: float | None = None
    try:
        with cluster(
            workdir,
            nodes=node_specs,
            server_env=env,
            database_url=database_url,
            agent_args=agent_args,
            isolation=isolation,
        ) as c:
            admin_headers = {"Authorization": f"Bearer {c.admin_token}"}
            with httpx.Client(base_url=c.url, headers=admin_headers, timeout=30) as admin:
                gpus = nodes * gpus_per_node
                token = add_org(admin, "bench", quotas={GPU_MODEL: (gpus, gpus)}, user="bench")
            c.wait_nodes()
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=c.url, headers=headers, timeout=30) as member:
                for i in range(warmup + jobs):
                    marker = markers / str(i)
                    script = f"date +%s.%N > {marker}.tmp && mv {marker}.tmp {marker}"
                    body = {"name": f"lat-{i}", "command": ["sh", "-c", script],
                            "gpu_type": GPU_MODEL, "time_limit": 600}  # fmt: skip
                    submitted = time.time()
                    r = member.post("/v1/jobs", json=body)
                    answered = time.time()
                    if r.status_code != 201:
                        raise RuntimeError(f"submit: {r.status_code} {r.text[:200]}")
                    started = _wait_started(marker, time.monotonic() + PROCESS_START_TIMEOUT_S)
                    c.fleet.check_alive()
                    if i >= warmup:
                        rows.append(
                            {"job": r.json()["id"], "submit": submitted, "answered": answered,
                             "started": started}
                        )  # fmt: skip
                for row in rows:
                    at = _scheduled_at(member, int(row["job"]))
                    row["scheduled"] = at if at is not None else float("nan")
            cycle_mean_s = _cycle_mean_s(c.url)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    latency = [r["started"] - r["submit"] for r in rows]
    scheduled = [r for r in rows if r["scheduled"] == r["scheduled"]]  # not NaN
    return {
        "bench": "latency",
        "n": len(latency),
        "p50": round(percentile(latency, 0.50), 4),
        "p99": round(percentile(latency, 0.99), 4),
        "max": round(max(latency), 4),
        "unit": "s",
        "database": "postgresql" if database_url and "postgres" in database_url else "sqlite",
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "isolation": isolation,
        "warmup_jobs": warmup,
        "server_env": _settings_env(env),
        "split": {
            "submit_http": summarise([r["answered"] - r["submit"] for r in rows]),
            "to_scheduled": summarise([r["scheduled"] - r["submit"] for r in scheduled]),
            "scheduled_to_start": summarise([r["started"] - r["scheduled"] for r in scheduled]),
            "cycle_mean": cycle_mean_s,
        },
    }
