"""`fairgpu bench latency` as a real command: a few jobs, one JSON line with the figures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from scheduler.bench.latency import percentile
from scheduler.bench.procs import fairgpu_command


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile([3.0], 0.99)) == (
        51.0,
        100.0,
        3.0,
    )


def test_bench_latency_prints_one_json_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRGPU_")}
    env["TMPDIR"] = str(tmp_path)
    result = subprocess.run(
        [*fairgpu_command(), "bench", "latency", "--jobs", "3", "--warmup", "0", "--nodes", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = result.stdout.splitlines()
    row = json.loads(line)
    assert (row["n"], row["database"], row["unit"]) == (3, "sqlite", "s")
    assert 0 < row["p50"] <= row["p99"] <= row["max"] < 30
    split = row["split"]
    assert 0 < split["submit_http"]["p50"] < row["max"]
    assert split["scheduled_to_start"]["max"] > 0
    assert split["cycle_mean"] > 0
    assert list(tmp_path.iterdir()) == []  # its work directory is gone
