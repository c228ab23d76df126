"""`fairgpu bench array`: submitting and cancelling a 10,000-task array on a real server.

A real `fairgpu server` (started by `scheduler.bench.cluster`, with one simulated node) on a
temporary SQLite, or on the EMPTY PostgreSQL database given; its pending-job caps are raised
above the array's size (the default per-user cap, 5,000, would refuse it). Each run submits one
held array in one request (held: nothing starts, so the cancel finds every task pending) and
cancels it with one; figures are wall seconds of each request.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from scheduler.bench.cluster import QUICK_SERVER_ENV, add_org, cluster
from scheduler.bench.latency import GPU_MODEL, summarise


def run_array_bench(
    *, tasks: int = 10_000, runs: int = 3, database_url: str | None = None
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-bench-array-"))
    caps = str(tasks * (runs + 1))
    # No submission rate limit: an array of N jobs is N submissions, and this times inserts.
    env = {**QUICK_SERVER_ENV, "FAIRGPU_MAX_PENDING_JOBS_PER_USER": caps,
           "FAIRGPU_MAX_PENDING_JOBS_PER_ORG": caps, "FAIRGPU_SUBMIT_RATE_PER_S": "0",
           "FAIRGPU_ORG_SUBMIT_RATE_PER_S": "0"}  # fmt: skip
    submit_s: list[float] = []
    cancel_s: list[float] = []
    try:
        node = ("bench-1", "bench", f"1x{GPU_MODEL}")
        with cluster(workdir, nodes=[node], server_env=env, database_url=database_url) as c:
            with httpx.Client(
                base_url=c.url, headers={"Authorization": f"Bearer {c.admin_token}"}, timeout=120
            ) as admin:
                token = add_org(admin, "bench", quotas={GPU_MODEL: (8, 8)}, user="bench")
            with httpx.Client(
                base_url=c.url, headers={"Authorization": f"Bearer {token}"}, timeout=120
            ) as member:
                for run in range(runs):
                    body = {"name": f"sweep{run}", "command": ["true"], "time_limit": 600,
                            "hold": True, "array": f"0-{tasks - 1}%8"}  # fmt: skip
                    started = time.perf_counter()
                    r = member.post("/v1/jobs", json=body)
                    submit_s.append(time.perf_counter() - started)
                    if r.status_code != 201:
                        raise RuntimeError(f"submit: {r.status_code} {r.text[:200]}")
                    started = time.perf_counter()
                    r = member.post(f"/v1/jobs/{r.json()['id']}/cancel")
                    cancel_s.append(time.perf_counter() - started)
                    if r.status_code != 200:
                        raise RuntimeError(f"cancel: {r.status_code} {r.text[:200]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bench": "array",
        "database": "postgresql" if database_url else "sqlite",
        "tasks": tasks,
        "runs": runs,
        "unit": "s",
        "submit": summarise(submit_s),
        "cancel": summarise(cancel_s),
        "submit_runs": [round(v, 3) for v in submit_s],
        "cancel_runs": [round(v, 3) for v in cancel_s],
    }
