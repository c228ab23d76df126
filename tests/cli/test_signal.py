"""`--signal [B:]SIG@SECONDS` end to end: a real server, a real `fairgpu agent` process (no
isolation), jobs that trap the signal and write what they saw to files."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.served import Served, serve, simulated_agent

# Traps USR1 in the batch shell and in a child process; each writes a line to $OUT when it gets
# one. The shell waits for the child in a loop, as a wait interrupted by a trap returns early.
_SCRIPT = f"""#!/bin/sh
#SBATCH --signal=USR1@50
trap 'echo "shell $(date +%s.%N)" >> "$OUT"' USR1
{sys.executable} -c '
import os, signal, time
def got(*_):
    with open(os.environ["OUT"], "a") as f:
        f.write(f"child {{time.time()}}\\n")
signal.signal(signal.SIGUSR1, got)
time.sleep(60)
' &
echo "start $(date +%s.%N)" >> "$OUT"
while kill -0 $! 2>/dev/null; do wait; done
"""


@pytest.fixture
def preempting(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Served]:
    """A server whose preemptions come at once, with a grace of 1 s."""
    monkeypatch.setenv("FAIRGPU_POLICY_PREEMPTION_GRACE_S", "1")
    monkeypatch.setenv("FAIRGPU_POLICY_MIN_RUNTIME_S", "0")
    yield from serve(database_url, tmp_path)


def member(served: Served, org: str, guaranteed: int) -> str:
    served.ok("org", "create", org)
    served.ok("quota", "set", org, "--gpu-type", "H100", "--guaranteed", str(guaranteed))
    user = json.loads(
        served.ok("user", "create", f"{org}-user", "--org", org, "--token", "-o", "json")
    )
    token: str = user["token"]
    return token


def wait_state(served: Served, job: str, states: set[str], timeout_s: float = 40) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := json.loads(served.ok("describe", job, "-o", "json"))["state"]) not in states:
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    return str(state)


def lines(path: Path) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        who, at = line.split()
        seen.setdefault(who, []).append(float(at))
    return seen


def test_the_signal_comes_its_lead_before_the_time_limit(served: Served, tmp_path: Path) -> None:
    token = member(served, "acme", 2)
    script = tmp_path / "train.sh"
    script.write_text(_SCRIPT)
    out_all, out_batch = tmp_path / "all.txt", tmp_path / "batch.txt"
    with simulated_agent(served, tmp_path, "--time-limit-grace-s", "1"):
        # The command line wins over the script's #SBATCH --signal=USR1@50.
        whole = served.ok(
            "submit", "--parsable", "-G", "H100:1", "-t", "8s", "--signal", "USR1@5",
            "-e", f"OUT={out_all}", str(script), token=token,
        ).strip()  # fmt: skip
        batch = served.ok(
            "submit", "--parsable", "-G", "H100:1", "-t", "8s", "--signal", "B:USR1@5",
            "-e", f"OUT={out_batch}", str(script), token=token,
        ).strip()  # fmt: skip
        described = served.ok("describe", batch, token=token)
        assert re.search(r"^\s*Signal:\s+B:USR1@5$", described, re.MULTILINE), described
        assert json.loads(served.ok("describe", whole, "-o", "json"))["signal"] == "USR1@5"
        assert wait_state(served, whole, {"TIMEOUT", "COMPLETED", "FAILED"}) == "TIMEOUT"
        assert wait_state(served, batch, {"TIMEOUT", "COMPLETED", "FAILED"}) == "TIMEOUT"
    every, shell_only = lines(out_all), lines(out_batch)
    # Without B: every process of the job gets it, once, about 3 s in (8 s limit, 5 s lead).
    assert sorted(every) == ["child", "shell", "start"], every
    for seen in (every["shell"][0], every["child"][0]):
        assert 1.5 < seen - every["start"][0] < 6.5, every
    # With B: the batch shell only.
    assert sorted(shell_only) == ["shell", "start"], shell_only
    assert len(shell_only["shell"]) == 1
    assert 1.5 < shell_only["shell"][0] - shell_only["start"][0] < 6.5, shell_only


def test_a_preempted_job_gets_its_signal_and_its_grace(preempting: Served, tmp_path: Path) -> None:
    served = preempting
    borrower = member(served, "lend", 0)
    owner = member(served, "own", 2)
    out = tmp_path / "preempted.txt"
    # On USR1 it checkpoints for 3 s, longer than the 1 s grace, within its own 5 s.
    job = (
        'trap \'echo "got $(date +%s.%N)" >> "$OUT"; sleep 3; '
        'echo "saved $(date +%s.%N)" >> "$OUT"; exit 0\' USR1; '
        "while :; do sleep 0.1; done"
    )
    with simulated_agent(served, tmp_path, "--time-limit-grace-s", "1"):
        lent = served.ok(
            "submit", "--parsable", "-G", "H100:2", "-t", "10m", "--preemptible",
            "--signal", "USR1@5", "-e", f"OUT={out}", "--", "sh", "-c", job, token=borrower,
        ).strip()  # fmt: skip
        wait_state(served, lent, {"RUNNING"})
        wanted = served.ok(
            "submit", "--parsable", "-G", "H100:2", "-t", "10m", "--", "sleep", "30",
            token=owner,
        ).strip()  # fmt: skip
        wait_state(served, wanted, {"RUNNING"})
        events = json.loads(served.ok("describe", lent, "-o", "json"))["events"]
        assert any(e["kind"] == "job.preempt" for e in events), events
    seen = lines(out)
    assert sorted(seen) == ["got", "saved"], seen  # not killed after 1 s: its grace was 5 s
    assert 2.5 < seen["saved"][0] - seen["got"][0] < 5, seen


def test_a_bad_signal_is_a_one_line_error(served: Served, tmp_path: Path) -> None:
    token = member(served, "acme", 2)
    for value, words in [
        ("NOPE@10", "unknown signal 'NOPE'"),
        ("KILL@10", "SIGKILL cannot be caught"),
        ("USR1@x", "seconds must be a positive integer"),
    ]:
        result = served.run("submit", "-t", "1h", "--signal", value, "--", "true", token=token)
        assert result.exit_code != 0, result.output
        assert words in result.output, result.output
        assert "Traceback" not in result.output
    result = served.run("submit", "-t", "1m", "--signal", "USR1@61", "--", "true", token=token)
    assert result.exit_code != 0, result.output
    assert "61 s is more than the time limit of 60 s" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/sh\n#SBATCH --signal=USR1@abc\ntrue\n")
    result = served.run("submit", "-t", "1h", str(script), token=token)
    assert result.exit_code != 0, result.output
    assert "positive integer" in result.output, result.output
