"""`fairgpu attach JOB --new`: a new shell in a running task's sandbox, beside its own terminal.

End to end on SQLite and PostgreSQL: the real server (uvicorn on loopback), a real `fairgpu
agent` process and the CLI as a process. The shell sees the task's uid, GPUs, working directory
and (on a strict node) its cgroup and mount namespace; only the owner and the org's admins may
open one; it is an event on the job and a `new` session in the metrics; it ends with the task.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from agents.sandbox import TASK_OOM_SCORE_ADJ
from scheduler.bench.procs import fairgpu_command
from tests.cli.test_interactive import Org, Terminal, agent, fairgpu, org  # noqa: F401 - fixtures
from tests.harness.served import Served, wait_for

# What the task itself says, then what a new shell says: the same lines, to compare.
PROBE = (
    'echo "uid=$(id -u)"; echo "gpus=$CUDA_VISIBLE_DEVICES"; echo "cwd=$(pwd)"; '
    'echo "mnt=$(readlink /proc/self/ns/mnt)"; echo "cgroup=$(cut -d: -f3 /proc/self/cgroup | '
    'tr \'\\n\' ,)"; echo "oom=$(cat /proc/self/oom_score_adj)"; '
    'echo "seccomp=$(grep ^Seccomp: /proc/self/status | cut -f2)"'
)
FIELDS = ("uid", "gpus", "cwd", "mnt", "cgroup", "oom", "seccomp")
UNCONFINED = ("uid", "gpus", "cwd", "cgroup")
"""What an unconfined task and its new shell share (`ip netns exec` gives each process of a
private network a mount namespace of its own)."""
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _seen(text: str) -> dict[str, str]:
    """The probe's answers (`name=value` lines; an echoed command line has `$` in it)."""
    found: dict[str, str] = {}
    for line in ESCAPES.sub("", text).replace("\r", "").splitlines():
        match = re.fullmatch(r"(uid|gpus|cwd|mnt|cgroup|oom|seccomp)=([^$\"]*)", line.strip())
        if match:
            found.setdefault(match[1], match[2])
    return found


def _task_says(served: Served, token: str, job: str) -> dict[str, str]:
    said: dict[str, str] = {}

    def answered() -> bool:
        said.update(_seen(served.ok("logs", job, token=token)))
        return all(name in said for name in FIELDS)

    wait_for(answered, timeout_s=60)
    return said


def _events(served: Served, job: str) -> list[dict[str, object]]:
    return list(json.loads(served.ok("describe", job, "-o", "json"))["events"])


def _submit(served: Served, token: str, *args: str) -> str:
    return served.ok(
        "submit", "--parsable", "-G", "H100:1", "-t", "10m", *args, token=token
    ).strip()


def test_a_new_shell_sees_the_tasks_values_and_only_the_owner_and_admins_open_one(
    served: Served,
    org: Org,  # noqa: F811
    agent: object,  # noqa: F811
) -> None:
    # A batch job on the second GPU (the first is held by another job): the shell must see 1.
    first = _submit(served, org.owner, "--", "sleep", "600")
    job = _submit(served, org.owner, "--", "sh", "-c", f"{PROBE}; sleep 600")
    task = _task_says(served, org.owner, job)
    assert task["gpus"] == "1", task

    code, out, err = fairgpu(
        served, org.owner, "attach", job, "--new", stdin=f"{PROBE}\nexit 7\n".encode()
    )
    assert code == 7, (out, err)  # the shell's own status
    shell = _seen(out)
    assert {name: shell.get(name) for name in UNCONFINED} == {n: task[n] for n in UNCONFINED}, out

    served.ok("org", "create", "rival")
    rival = json.loads(
        served.ok("user", "create", "eve", "--org", "rival", "--token", "-o", "json")
    )["token"]
    code, _, err = fairgpu(served, rival, "attach", job, "--new", stdin=b"id\n")
    assert code == 5, err  # another org's job: not there
    assert f"job {job} not found" in err
    code, _, err = fairgpu(served, org.member, "attach", job, "--new", stdin=b"id\n")
    assert code == 4, err  # the same org, not the owner
    assert "forbidden" in err
    code, out, err = fairgpu(
        served, org.admin, "attach", job, "--new", stdin=b'echo "uid=$(id -u)"\nexit\n'
    )
    assert code == 0, (out, err)
    assert _seen(out)["uid"] == task["uid"]

    shells = [e for e in _events(served, job) if e["kind"] == "job.shell"]
    assert [(e["actor"], e["reason"]) for e in shells] == [
        ("user:ada", "opened a new shell in the sandbox of rank 0"),
        ("user:cy", "opened a new shell in the sandbox of rank 0"),
    ]
    # The task never noticed: it still runs, its log has no shell in it.
    assert json.loads(served.ok("describe", job, "-o", "json"))["state"] == "RUNNING"
    assert "exit 7" not in served.ok("logs", job, token=org.owner)
    served.ok("cancel", first, job)


def test_a_new_shell_beside_a_terminal_is_a_new_session_and_ends_with_the_task(
    served: Served,
    org: Org,  # noqa: F811
    agent: object,  # noqa: F811
) -> None:
    run = Terminal.start(
        served, org.owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
        "sh", "-c", "echo main-ready; exec sleep 600", rows=30, cols=100,
    )  # fmt: skip
    job = run.expect(r"job (\d+) submitted")[1]
    run.expect(r"main-ready")
    shell = Terminal.start(served, org.owner, "attach", job, "--new", rows=20, cols=70)
    shell.expect(r"[#$] ")  # its prompt: the CLI is in raw mode (which drops keys typed before)
    shell.type(b"stty size; echo shell-$((40+2))\r")
    shell.expect(r"20 70")  # a terminal of its own, at this window's size
    shell.expect(r"shell-42")

    def sessions(kind: str) -> float:
        text = httpx.get(served.url + "/metrics", timeout=30).text
        match = re.search(rf'fairgpu_interactive_sessions_open\{{kind="{kind}"\}} (\S+)', text)
        return float(match[1]) if match else 0.0

    assert sessions("new") >= 1
    assert sessions("attach") >= 1  # the job's own terminal, still attached beside it
    served.ok("cancel", job)
    code = shell.wait(timeout_s=60)  # the task ended: so did its shell
    assert code != 0, shell.seen
    run.wait(timeout_s=60)
    wait_for(lambda: sessions("new") == 0, timeout_s=30)


def test_a_new_shell_needs_a_running_job(served: Served, org: Org) -> None:  # noqa: F811
    job = _submit(served, org.owner, "--hold", "--", "sleep", "60")
    code, _, err = fairgpu(served, org.owner, "attach", job, "--new", stdin=b"id\n")
    assert code == 1, err
    assert "only a running job takes a new shell" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")
def test_on_a_strict_node_the_new_shell_is_in_the_tasks_sandbox(
    served: Served, tmp_path: Path
) -> None:
    from tests.cli.test_isolated_agent import UID_BASE, Pool

    pool = Pool(served, tmp_path)
    try:
        workdir = tmp_path / "data" / "acme" / "run"
        workdir.mkdir()
        os.chown(workdir, UID_BASE + pool.org_ids["acme"], UID_BASE + pool.org_ids["acme"])
        job = pool.submit(
            "acme", "--workdir", str(workdir), "--", "sh", "-c", f"{PROBE}; sleep 600"
        )
        task = _task_says(served, pool.tokens["acme"], job)
        assert task["uid"] == str(UID_BASE + pool.org_ids["acme"])
        assert task["cwd"] == str(workdir)
        assert pool.cgroup_parent in task["cgroup"]
        result = subprocess.run(
            [*fairgpu_command(), "attach", job, "--new"],
            env={**os.environ, **served.env(pool.tokens["acme"])},
            input=f"{PROBE}\nexit 3\n".encode(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        out = result.stdout.decode(errors="replace")
        assert result.returncode == 3, (out, result.stderr.decode())
        shell = _seen(out)
        # The same uid, GPUs, directory, cgroup, mount namespace, oom_score_adj and seccomp
        # filter as the task: the shell is the agent's child too, and kept the agent's value
        # before.
        assert task["oom"] == str(TASK_OOM_SCORE_ADJ)
        assert task["seccomp"] == "2"  # its filter, which the shell must be under too
        assert {name: shell.get(name) for name in FIELDS} == task, out
        code, _, err = fairgpu(served, pool.tokens["rival"], "attach", job, "--new", stdin=b"")
        assert code == 5, err
    finally:
        pool.close()
