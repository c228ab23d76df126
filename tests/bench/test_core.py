"""`fairgpu bench core` runs as a real command and prints one JSON object per size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scheduler.bench import core as bench
from scheduler.core import schedule


def test_bench_core_prints_one_json_line_per_size() -> None:
    exe = Path(sys.executable).with_name("fairgpu")
    out = subprocess.run(
        [str(exe), "bench", "core", "--size", "tiny", "--size", "tiny", "--repeats", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key in (
            "nodes",
            "gpus",
            "pending",
            "running",
            "orgs",
            "cycle_ms_p50",
            "cycle_ms_p95",
            "peak_rss_mb",
        ):
            assert key in row
        assert row["nodes"] == 32
        assert row["gpus"] == 256
        assert row["cycle_ms_p95"] >= row["cycle_ms_p50"] > 0


def test_bench_rejects_an_unknown_size() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["bench", "core", "--size", "galactic"])
    assert result.exit_code != 0
    assert "galactic" in result.output


def test_synthetic_snapshots_are_deterministic_and_schedulable() -> None:
    a = bench.build(bench.SIZES["tiny"], seed=3)
    b = bench.build(bench.SIZES["tiny"], seed=3)
    assert a == b
    d = schedule(a)
    assert len(d.pending) + len(d.starts) == len(a.pending)
    assert len(a.orgs) == 10


def test_the_hetero_size_mixes_seven_types_and_four_node_widths() -> None:
    snap = bench.build(bench.SIZES["hetero"])
    assert {n.gpu_type for n in snap.nodes} == set(bench.HETERO_TYPES)
    assert {len(n.gpus) for n in snap.nodes} == {1, 2, 4, 8}
    assert len(snap.nodes) == 1_200
    assert len(snap.pending) == 20_000
    assert {j.gpu_type for j in snap.pending} >= set(bench.HETERO_TYPES)


def test_bench_core_runs_the_policy_it_is_given() -> None:
    exe = Path(sys.executable).with_name("fairgpu")
    args = [str(exe), "bench", "core", "--size", "tiny", "--repeats", "1", "--policy", "fifo"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120)
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["policy"] == "fifo"
    assert row["preemptions"] == 0  # fifo never preempts
    refused = subprocess.run([*args[:-1], "lottery"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "lottery" in refused.stderr
