"""A job really runs: a `fairgpu agent --simulate` process takes it, `logs -f` follows it to the
end, and `queue`, `history` and `usage` show it; then `fairgpu demo` end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from scheduler.bench.procs import fairgpu_command
from tests.harness.served import Served, simulated_agent


def test_a_job_runs_on_an_agent_and_its_logs_follow(served: Served, tmp_path: Path) -> None:
    served.ok("org", "create", "acme")
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "2")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    with simulated_agent(served, tmp_path):
        job = served.ok(
            "submit", "--parsable", "-G", "H100:1", "-t", "5m", "--",
            "sh", "-c", "echo hello from $CUDA_VISIBLE_DEVICES; sleep 1; echo bye",
            token=ada["token"],
        ).strip()  # fmt: skip
        out = served.ok("logs", job, "-f", token=ada["token"])
        assert out.splitlines() == ["hello from 0", "bye"]
        deadline = time.monotonic() + 20
        while (state := json.loads(served.ok("describe", job, "-o", "json"))["state"]) not in (
            "COMPLETED",
            "FAILED",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert state == "COMPLETED"
        history = json.loads(served.ok("history", "-o", "json", token=ada["token"]))
        assert [(j["id"], j["state"], j["exit_code"]) for j in history] == [
            (int(job), "COMPLETED", 0)
        ]
        assert served.ok("logs", job, "--tail", "4") == "bye\n"
        assert "n1" in served.ok("node", "list")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    """`fairgpu demo` in a clean environment: the three moments, the summary, nothing left."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRGPU_")}
    env["TMPDIR"] = str(tmp_path)
    started = time.monotonic()
    result = subprocess.run(
        [*fairgpu_command(), "demo", "--no-live"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    took_s = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for moment in ("gang: seen", "backfill: seen", "reclaim: seen"):
        assert moment in out, out[-3000:]
    assert "Per organisation" in out
    assert "/docs" in out
    assert "/metrics" in out
    assert took_s < 150, took_s
    assert list(tmp_path.iterdir()) == []  # the work dir is gone
    leftover = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == "", leftover.stdout
