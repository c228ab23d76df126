"""`fairgpu bench cli`: what a person waits for at the shell, `fairgpu` process start to exit.

A real `fairgpu server` on a temporary SQLite (started by `scheduler.bench.cluster`, one
simulated node so that the cluster is a real one); then `fairgpu --help`, `fairgpu submit
--hold` and `fairgpu queue` (with `queue_jobs` held jobs in it) each run `runs` times as fresh
processes, as a user would type them. Figures are wall seconds from spawn to exit, and each
command's CPU seconds (user + system, `*_cpu`): on a shared machine the wall time is mostly
other people's work, while the CPU time is what the command itself costs.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from scheduler.bench.cluster import add_org, cluster
from scheduler.bench.latency import GPU_MODEL, summarise
from scheduler.bench.procs import fairgpu_command


def _cpu_s() -> float:
    """CPU seconds of the children waited for so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `runs` runs of `argv`."""
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        cpu_before = _cpu_s()
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        wall.append(time.perf_counter() - started)
        cpu.append(_cpu_s() - cpu_before)
        if done.returncode != 0:
            command = " ".join(argv[-3:])
            raise RuntimeError(f"{command}: exit {done.returncode}: {done.stderr[:200]}")
    return wall, cpu


def run_cli_bench(*, runs: int = 10, queue_jobs: int = 100) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-bench-cli-"))
    fairgpu = fairgpu_command()
    try:
        # The server's default clocks: held jobs and the queue do not wait for cycles.
        nodes = [("bench-1", "bench", f"8x{GPU_MODEL}")]
        with cluster(workdir, nodes=nodes, server_env={}) as c:
            with httpx.Client(
                base_url=c.url, headers={"Authorization": f"Bearer {c.admin_token}"}, timeout=30
            ) as admin:
                token = add_org(admin, "bench", quotas={GPU_MODEL: (8, 8)}, user="bench")
            env = {**os.environ, "FAIRGPU_SERVER": c.url, "FAIRGPU_TOKEN": token,
                   "FAIRGPU_CONFIG_DIR": str(workdir / "config")}  # fmt: skip
            submit = [*fairgpu, "submit", "--hold", "--parsable", "-G", f"{GPU_MODEL}:1",
                      "-t", "10", "--", "true"]  # fmt: skip
            with httpx.Client(
                base_url=c.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as member:
                for i in range(queue_jobs - runs):
                    body = {"name": f"q{i}", "command": ["true"], "gpu_type": GPU_MODEL,
                            "time_limit": 600, "hold": True}  # fmt: skip
                    r = member.post("/v1/jobs", json=body)
                    if r.status_code != 201:
                        raise RuntimeError(f"submit: {r.status_code} {r.text[:200]}")
            figures: dict[str, list[float]] = {}
            for name, argv in (
                ("help", [*fairgpu, "--help"]),
                ("submit_hold", submit),
                ("queue", [*fairgpu, "queue", "-t", "PENDING"]),
            ):
                figures[name], figures[f"{name}_cpu"] = _timed(argv, env, runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bench": "cli",
        "runs": runs,
        "queue_jobs": queue_jobs,
        "unit": "s",
        **{name: summarise(values) for name, values in figures.items()},
    }
