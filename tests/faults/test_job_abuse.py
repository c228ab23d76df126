"""Jobs that misbehave on a real agent: one floods its log, one forks children, one ignores
SIGTERM. The log cap holds on the node, the node keeps reporting, and stopping a job ends its
whole process group (SIGTERM, grace, SIGKILL)."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

from scheduler.bench.procs import wait_for
from tests.faults.helpers import Org, assert_invariants, fleet, setup_org

LOG_CAP_BYTES = 256 * 1024
FLOOD = "import sys\nline = 'x' * 1023 + '\\n'\nwhile True:\n    sys.stdout.write(line)\n"


def _log_sizes(state_dir: Path) -> list[int]:
    return [p.stat().st_size for p in state_dir.rglob("log") if p.is_file()]


def _cancel(org: Org, job_id: int) -> None:
    r = org.member.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text


def test_flooding_forking_and_sigterm_ignoring_jobs(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fairgpu.db'}"
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        url = f.server()
        org = stack.enter_context(setup_org(url, f.bootstrap(), tmp_path / "pids"))
        f.agent("n1", url, org.join_token, extra=("--log-max-bytes", str(LOG_CAP_BYTES)))
        wait_for("node ready", lambda: org.node_state("n1") == "ready", 30)
        kids = tmp_path / "pids"

        flood = org.submit(command=[sys.executable, "-c", FLOOD], time_limit=8)
        forker = org.submit(
            command=[
                "sh", "-c",
                f'echo $$ >> {kids}/"$FAIRGPU_JOB_ID"; '
                f'for i in 1 2 3; do sleep 600 & echo $! >> {kids}/"$FAIRGPU_JOB_ID"; done; '
                f'(sleep 600 & echo $! >> {kids}/"$FAIRGPU_JOB_ID"; wait) & wait',
            ]
        )  # fmt: skip
        stubborn = org.submit(
            command=["sh", "-c", f'trap "" TERM; echo $$ >> {kids}/"$FAIRGPU_JOB_ID"; sleep 600']
        )
        org.wait_states([flood, forker, stubborn], {"RUNNING"}, timeout_s=40)
        wait_for("forker's 5 processes", lambda: len(org.live_pids(forker)) == 5, 20)
        wait_for("stubborn process", lambda: org.live_pids(stubborn), 20)

        # The flood runs into its time limit; meanwhile the log on disk stays near its cap.
        peak = 0
        state = tmp_path / "n1-state"
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and org.job(flood)["state"] == "RUNNING":
            peak = max([peak, *_log_sizes(state)])
            time.sleep(0.1)
        org.wait_states([flood], {"TIMEOUT"}, timeout_s=30)
        # The agent truncates every 0.1 s: the peak is the cap plus what a writer manages in
        # one interval (hundreds of MB at disk speed), never a full disk.
        assert peak <= 1024**3, f"log reached {peak} bytes"
        assert max(_log_sizes(state)) <= 2 * LOG_CAP_BYTES
        logs = org.member.get(f"/v1/jobs/{flood}/logs", params={"tail": 4096})
        assert logs.status_code == 200, logs.text
        assert logs.json()["data"].endswith("Terminated\n"), logs.json()["data"][-200:]
        assert org.node_state("n1") == "ready", "the node kept reporting through the flood"

        _cancel(org, forker)
        _cancel(org, stubborn)
        org.wait_states([forker], {"CANCELLED"}, timeout_s=20)
        wait_for("forker's whole group gone", lambda: not org.live_pids(forker), 10)
        # SIGTERM is ignored: the grace (2 s) passes, then SIGKILL ends it.
        org.wait_states([stubborn], {"CANCELLED"}, timeout_s=30)
        wait_for("stubborn group gone", lambda: not org.live_pids(stubborn), 10)
        print(f"flood log peak on disk: {peak} bytes (cap {LOG_CAP_BYTES})")
        assert_invariants(db)
