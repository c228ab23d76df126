"""`fairgpu bench interactive --replicas 2` as a real command: two server replicas on one
PostgreSQL database, the agent reporting to the second, the CLI using the first; one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from scheduler.bench.procs import fairgpu_command


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRGPU_")}
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run(
        [*fairgpu_command(), "bench", "interactive", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_bench_interactive_across_two_replicas(database_url: str, tmp_path: Path) -> None:
    result = _bench(
        tmp_path, "--sessions", "1", "--megabytes", "2", "--replicas", "2",
        "--database-url", database_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = result.stdout.splitlines()
    row = json.loads(line)
    assert (row["database"], row["replicas"], row["attach_latency"]["n"]) == ("postgresql", 2, 1)
    assert row["relay"]["to_job_mb_s"] > 0
    assert row["relay"]["from_job_mb_s"] > 0


def test_two_replicas_need_a_shared_database(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--replicas", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fairgpu: error: --replicas 2 needs --database-url (PostgreSQL: replicas share one "
        "database)"
    ]
