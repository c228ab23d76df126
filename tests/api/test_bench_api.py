"""`fairgpu bench api` end to end, kept tiny: it must run and print the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL

FAIRGPU = str(Path(sys.executable).parent / "fairgpu")


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_bench_api_prints_submissions_and_heartbeats(database_url: str) -> None:
    r = subprocess.run(
        [
            FAIRGPU, "bench", "api", "--postgres-url", POSTGRES_URL, "--workers", "1",
            "--connections", "4", "--submit-s", "1", "--heartbeat-s", "1", "--nodes", "8",
        ],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for phase in ("submit", "heartbeat"):
        figures = result[phase]
        assert figures["requests"] > 0
        assert figures["errors"] == 0, figures
        assert figures["p50_ms"] <= figures["p99_ms"]
        assert figures["server_cpu_ms_per_request"] > 0
    assert set(result["submit"]["statuses"]) == {"201"}
    assert result["heartbeat"]["nodes"] == 8
