"""The full fault and abuse suite (`make test-faults`; not collected by `make test`, whose quick
variants live in test_*.py): more kills, the full schemathesis run, and a two-minute soak."""

from __future__ import annotations

import json
from pathlib import Path

from scheduler.bench.procs import PgInstance
from scheduler.bench.soak import run_soak
from tests.faults.test_server_faults import pg, sigkill_mid_cycle
from tests.security.conftest import Live, live
from tests.security.test_fuzz import fuzz

__all__ = ["live", "pg"]  # fixtures used here


def test_server_sigkill_mid_cycle_many_times(tmp_path: Path, pg: PgInstance) -> None:
    sigkill_mid_cycle(tmp_path, pg, kills=8)


def test_schemathesis_full(live: Live) -> None:
    fuzz(live, examples=40)


def test_soak_two_minutes() -> None:
    result = run_soak(duration_s=120, nodes=100, rate_per_s=3, fault_interval_s=20)
    print(json.dumps(result))
    assert result["ok"], json.dumps(result, indent=1)[:4000]
    assert result["invariants_ok"]
    assert not result["lost"]
    assert len(result["faults"]) >= 5
    assert result["submissions_acknowledged"] >= 200
