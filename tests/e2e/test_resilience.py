"""Time limits, cancels, a server that goes away and an agent killed mid-task, end to end.

The runner-level versions live in tests/agents; these prove the whole path: the server's
decision, the agent process acting on it, the report coming back and the job's final state.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import GRACE_S, running, wait_until


def test_time_limit_ends_the_job_as_timeout(tmp_path: Path) -> None:
    with running(tmp_path) as e2e:
        job_id = e2e.submit(["sleep", "60"], time_limit=2)
        started = time.monotonic()
        e2e.wait_state(job_id, ["RUNNING"])
        job = e2e.wait_state(job_id, ["TIMEOUT"], timeout_s=30)
        assert time.monotonic() - started >= 2.0
        assert job["ended_at"] is not None


def test_cancel_kills_a_job_that_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    # The shell notes SIGTERM and carries on; only SIGKILL after the grace period ends it.
    script = (
        f'trap "echo got TERM" TERM; echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; '
        "echo ready; while true; do sleep 0.1; done"
    )
    with running(tmp_path / "cluster") as e2e:
        job_id = e2e.submit(["sh", "-c", script])
        e2e.wait_state(job_id, ["RUNNING"])
        wait_until(pid_file.exists, 15, "the job wrote its pid")
        pgid = os.getpgid(int(pid_file.read_text()))
        assert pgid != os.getpgid(0)
        cancelled_at = time.monotonic()
        r = e2e.member.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 200, r.text
        e2e.wait_state(job_id, ["CANCELLED"], timeout_s=30)
        took_s = time.monotonic() - cancelled_at
        assert took_s >= GRACE_S - 0.2, took_s  # it outlived SIGTERM until the grace ran out
        wait_until(lambda: not _group_alive(pgid), 10, "the process group is gone")
        log = e2e.logs(job_id)
    assert log.startswith("ready\n"), log
    assert "got TERM" in log, log


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("database_url", "sig"),
    [
        pytest.param("sqlite", signal.SIGTERM, id="sqlite-sigterm"),
        pytest.param("sqlite", signal.SIGKILL, id="sqlite-sigkill"),
        pytest.param("postgres", signal.SIGKILL, id="postgres-sigkill", marks=pytest.mark.postgres),
    ],
    indirect=["database_url"],
)
def test_task_outlives_a_server_outage_and_its_end_is_recorded_after(
    database_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    go, finished = tmp_path / "go", tmp_path / "finished"
    script = f"echo started; while [ ! -e {go} ]; do sleep 0.1; done; echo done; touch {finished}"
    with running(tmp_path / "cluster", database_url=database_url) as e2e:
        procs = e2e.cluster.fleet.procs
        job_id = e2e.submit(["sh", "-c", script])
        e2e.wait_state(job_id, ["RUNNING"])
        procs["server"].kill(sig)
        go.touch()  # the task ends while there is no server to tell
        wait_until(finished.exists, 10, "the task ended without the server")
        time.sleep(1.0)  # the agent tries, fails, and keeps the report
        e2e.restart_server()
        job = e2e.wait_state(job_id, ["COMPLETED"], timeout_s=40)
        assert (job["exit_code"], job["requeue_count"]) == (0, 0)
        assert e2e.logs(job_id) == "started\ndone\n"
        assert procs["n1"].alive()  # the agent rode it out


def test_agent_killed_and_restarted_finds_its_task_and_does_not_start_it_again(
    tmp_path: Path,
) -> None:
    go, starts = tmp_path / "go", tmp_path / "starts"
    script = f"echo x >> {starts}; while [ ! -e {go} ]; do sleep 0.1; done; echo done"
    with running(tmp_path / "cluster") as e2e:
        procs = e2e.cluster.fleet.procs
        job_id = e2e.submit(["sh", "-c", script])
        e2e.wait_state(job_id, ["RUNNING"])
        wait_until(starts.exists, 10, "the task started")
        assert procs["n1"].kill(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(1.0)  # the server keeps offering nothing new; the task runs on alone
        procs["n1"].start()
        time.sleep(3.0)  # a restarted agent that lost the task would start it again now
        go.touch()
        job = e2e.wait_state(job_id, ["COMPLETED"], timeout_s=30)
        assert (job["exit_code"], job["requeue_count"]) == (0, 0)
        assert e2e.logs(job_id) == "done\n"
    assert starts.read_text() == "x\n"
