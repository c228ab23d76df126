"""The runner with real subprocesses: environment, logs, exits, time limits, stops, adoption."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.disk import DiskConfig
from agents.runner import Runner, RunnerConfig
from agents.state import StateDir
from protocol.agent import TaskSignal
from tests.agents.helpers import spec, wait_for

PY = sys.executable
# The stand-in clients' answer to `image inspect` (agents/imagelaunch.py asks it first): an image
# with no ENTRYPOINT or CMD of its own, run by its id.
INSPECTED = """if [ "$1" = image ]; then echo '[{"Id": "sha256:1d", "Config": {}}]'; exit 0; fi\n"""


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


@pytest.fixture(autouse=True)
def reap_children(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kill and reap whatever a test left running, so no Popen is collected while alive."""
    runners: list[Runner] = []
    original_init = Runner.__init__

    def tracking_init(self: Runner, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        runners.append(self)

    monkeypatch.setattr(Runner, "__init__", tracking_init)
    yield
    for runner in runners:
        for child in runner._children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def run_to_end(runner: Runner, task_id: int, timeout_s: float = 10.0) -> None:
    wait_for(
        lambda: runner.poll() or runner.records[task_id].state not in ("starting", "running"),
        timeout_s,
    )
    wait_for(
        lambda: (runner.poll(), runner.records[task_id].state)[1] not in ("starting", "running"),
        timeout_s,
    )


def test_environment_of_a_multi_node_task(
    state: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIRGPU_JOIN_TOKEN", "secret")  # the agent's secrets stay with the agent
    out = tmp_path / "env.json"
    code = (
        f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w')); print(os.getcwd())"
    )
    runner = Runner(state)
    task = spec(
        7,
        [PY, "-c", code],
        job_id=42,
        node_rank=1,
        num_nodes=2,
        gpus=[2, 3],
        gpu_uuids=["GPU-a", "GPU-b"],
        env={"MY_VAR": "x y"},
        workdir=str(tmp_path),
        master_addr="10.0.0.1",
        master_port=29500,
    )
    assert runner.start(task)
    run_to_end(runner, 7)
    record = runner.records[7]
    assert (record.state, record.exit_code, record.signal) == ("exited", 0, None)
    env = json.loads(out.read_text())
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["FAIRGPU_JOB_ID"] == "42"
    assert env["FAIRGPU_NODE_RANK"] == env["NODE_RANK"] == "1"
    assert env["FAIRGPU_NUM_NODES"] == env["WORLD_SIZE"] == "2"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "29500")
    assert env["MY_VAR"] == "x y"
    assert "FAIRGPU_JOIN_TOKEN" not in env
    assert state.read_log(record).decode().strip() == str(tmp_path)


def test_uuids_when_configured_and_no_torchrun_vars_for_one_node(
    state: StateDir, tmp_path: Path
) -> None:
    out = tmp_path / "env.json"
    code = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    runner = Runner(state, RunnerConfig(cuda_by_uuid=True))
    runner.start(spec(1, [PY, "-c", code], gpus=[0, 1], gpu_uuids=["GPU-a", "GPU-b"]))
    run_to_end(runner, 1)
    env = json.loads(out.read_text())
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert "WORLD_SIZE" not in env
    assert "MASTER_ADDR" not in env


def test_exit_code_and_log_capture(state: StateDir) -> None:
    runner = Runner(state)
    runner.start(spec(1, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    run_to_end(runner, 1)
    r = runner.records[1]
    assert (r.state, r.exit_code, r.signal) == ("exited", 3, None)
    assert sorted(state.read_log(r).decode().split()) == ["err", "out"]
    assert r.report().ended_at is not None


def test_killed_by_signal_is_reported(state: StateDir) -> None:
    runner = Runner(state)
    runner.start(spec(1, ["sh", "-c", "kill -SEGV $$"]))
    run_to_end(runner, 1)
    r = runner.records[1]
    assert (r.state, r.exit_code, r.signal) == ("exited", None, signal.SIGSEGV)


def test_missing_program_or_workdir_fails_to_start(state: StateDir, tmp_path: Path) -> None:
    runner = Runner(state)
    runner.start(spec(1, ["true"], workdir=str(tmp_path / "nope")))
    assert runner.records[1].state == "failed_to_start"
    assert "nope" in runner.records[1].reason
    runner.start(spec(2, ["/no/such/program"]))
    run_to_end(runner, 2)
    assert runner.records[2].exit_code == 127  # the shell's "command not found"


def test_a_task_never_starts_twice(state: StateDir) -> None:
    runner = Runner(state)
    assert runner.start(spec(1, ["true"]))
    assert not runner.start(spec(1, ["true"]))


def test_time_limit_gives_timeout(state: StateDir) -> None:
    runner = Runner(state, RunnerConfig(time_limit_grace_s=5))
    runner.start(spec(1, [PY, "-c", "import time; time.sleep(30)"], time_limit_s=0.3))
    run_to_end(runner, 1)
    r = runner.records[1]
    assert r.state == "timeout"
    assert r.signal == signal.SIGTERM
    assert not r.killed


def test_stop_sigterm_ignored_then_sigkill_after_grace(state: StateDir, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    runner = Runner(state)
    runner.start(spec(1, [PY, "-c", code]))
    wait_for(ready.exists)
    runner.stop(1, grace_s=0.5, reason="cancelled by user")
    runner.poll()
    assert runner.records[1].state == "running"  # SIGTERM ignored, still in its grace period
    run_to_end(runner, 1)
    r = runner.records[1]
    assert (r.state, r.signal, r.killed) == ("stopped", signal.SIGKILL, True)
    assert r.reason.startswith("cancelled by user")
    assert r.ended_at is not None
    assert r.started_at is not None
    assert (r.ended_at - r.started_at).total_seconds() >= 0.5


def test_stop_reaches_the_whole_process_group(state: StateDir, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    runner = Runner(state)
    runner.start(spec(1, ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]))
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    grandchild = int(pidfile.read_text())
    runner.stop(1, grace_s=5, reason="preempted")
    run_to_end(runner, 1)
    assert runner.records[1].state == "stopped"
    wait_for(lambda: not _running(grandchild))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[1].split()[0] != "Z"


def test_restart_adopts_a_running_task_and_sees_its_exit(state: StateDir, tmp_path: Path) -> None:
    go = tmp_path / "go"
    code = (
        f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\n"
        "raise SystemExit(5)"
    )
    first = Runner(state)
    first.start(spec(1, [PY, "-c", code]))
    pid = first.records[1].pid
    # A new agent process: same state directory, no child handles.
    second = Runner(state)
    second.recover()
    assert second.records[1].state == "running"
    assert not second.start(spec(1, [PY, "-c", code]))  # not started twice
    go.touch()
    wait_for(lambda: first._children[1].poll() is not None)  # reap it as init would
    run_to_end(second, 1)
    r = second.records[1]
    assert (r.state, r.exit_code, r.pid) == ("exited", 5, pid)


def test_restart_after_task_vanished_without_status_is_lost(state: StateDir) -> None:
    runner = Runner(state)
    runner.start(spec(1, [PY, "-c", "import time; time.sleep(60)"]))
    pid = runner.records[1].pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # the task and its wrapper die together, no exit file
    runner._children[1].wait()
    again = Runner(state)
    again.recover()
    run_to_end(again, 1)  # the copier (not killed: its own group) finishes the log first
    assert again.records[1].state == "lost"


def test_reused_pid_is_not_adopted(state: StateDir) -> None:
    runner = Runner(state)
    runner.start(spec(1, [PY, "-c", "import time; time.sleep(60)"]))
    record = runner.records[1]
    record.pid_create_time = (record.pid_create_time or 0) - 1000  # as if another process
    state.save(record)
    # The task's copier still holds the output lock (its writer lives on): no time to drain it.
    again = Runner(state, RunnerConfig(output_drain_s=0))
    again.recover()
    assert again.records[1].state == "lost"
    assert record.pid is not None
    os.killpg(record.pid, signal.SIGKILL)
    runner._children[1].wait()


def test_record_without_pid_is_lost_not_restarted(state: StateDir) -> None:
    state.save(__import__("agents.state", fromlist=["TaskRecord"]).TaskRecord(spec=spec(9)))
    runner = Runner(state)
    runner.recover()
    assert runner.records[9].state == "lost"
    assert not runner.start(spec(9))


def test_container_task_without_runtime_fails_to_start(state: StateDir) -> None:
    runner = Runner(state)
    runner.start(spec(1, ["python", "train.py"], image="nvcr.io/nvidia/pytorch:24.05-py3"))
    assert runner.records[1].state == "failed_to_start"
    assert "container runtime" in runner.records[1].reason


def test_container_task_runs_through_the_runtime(state: StateDir, tmp_path: Path) -> None:
    fake_docker = tmp_path / "docker"
    fake_docker.write_text(  # its argv, the job id in its own environment, its env file
        f'#!/bin/sh\n{INSPECTED}echo "$@" > {tmp_path}/argv\n'
        f'echo "[$FAIRGPU_JOB_ID]" >> {tmp_path}/argv\n'
        'while [ $# -gt 0 ]; do [ "$1" = --env-file ] && cat "$2" >> "$0.out"; shift; done\n'
    )
    fake_docker.chmod(0o755)
    runner = Runner(
        state, RunnerConfig(container_runtime="docker", container_binary=str(fake_docker))
    )
    runner.start(spec(1, ["python", "train.py"], image="pytorch:24", gpus=[4, 5]))
    run_to_end(runner, 1)
    argv, own = (tmp_path / "argv").read_text().splitlines()
    env_file = (tmp_path / "docker.out").read_text().splitlines()
    assert argv.startswith(f"run --rm --name fairgpu-{runner.tag}-task-1 ")
    assert '--gpus "device=4,5"' in argv
    assert argv.endswith("--entrypoint /run/fairgpu/exec sha256:1d -- python train.py")
    assert own == "[]"  # the client (root, outside any sandbox) does not have the job's variables
    assert "FAIRGPU_JOB_ID=101" in env_file  # the container does
    assert runner.records[1].exit_code == 0


@pytest.mark.parametrize("problem", ["missing", "writable"])
def test_a_container_task_is_refused_in_one_line_without_a_sound_exec_helper(
    state: StateDir, tmp_path: Path, problem: str
) -> None:
    """Every docker and podman container starts through the helper, which runs in every
    tenant's container: one that is not there, or that another user could change, runs none."""
    helper = tmp_path / "helper" / "fairgpu-exec"
    if problem == "writable":
        helper.parent.mkdir()
        helper.write_text("#!/bin/sh\n")
        helper.chmod(0o777)
    runner = Runner(
        state,
        RunnerConfig(container_runtime="docker", container_binary="true", exec_helper=helper),
    )
    runner.start(spec(1, ["python", "train.py"], image="pytorch:24"))
    record = runner.records[1]
    assert record.state == "failed_to_start", record
    expected = {
        "missing": f"no exec helper at {helper} (build it with `make helper`",
        "writable": f"{helper} is not root's, or others may change it",
    }
    assert record.reason.startswith(expected[problem]), record.reason
    assert "\n" not in record.reason


def test_reaped_child_subprocess_module_is_not_confused() -> None:
    # sanity for the test helper: a normal exit is not mistaken for a zombie
    p = subprocess.Popen(["true"])
    p.wait()
    assert not _running(p.pid)


def test_prune_forgets_only_fully_delivered_old_tasks(state: StateDir) -> None:
    runner = Runner(state)
    runner.start(spec(1, ["true"]))
    runner.start(spec(2, ["true"]))
    run_to_end(runner, 1)
    run_to_end(runner, 2)
    runner.acknowledge({1, 2})
    runner.records[1].log_complete = True  # task 2's log has not reached the server yet
    ended_at = runner.records[1].ended_at
    assert ended_at is not None
    later = ended_at + dt.timedelta(days=2)
    runner.prune(older_than_s=86_400, now=later)
    assert sorted(runner.records) == [2]
    assert not state.task_dir(1).exists()
    runner.prune(older_than_s=86_400)
    assert sorted(runner.records) == [2]


def test_the_warning_signal_comes_once_then_again_instead_of_sigterm_at_a_stop(
    state: StateDir, tmp_path: Path
) -> None:
    out, ready = tmp_path / "usr1", tmp_path / "ready"
    code = (
        "import pathlib, signal, time\n"
        f"out = pathlib.Path({str(out)!r})\n"
        "def got(*_):\n"
        "    with out.open('a') as f: f.write('usr1\\n')\n"
        "signal.signal(signal.SIGUSR1, got)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "while True: time.sleep(0.02)\n"
    )
    warning = TaskSignal(name="USR1", lead_s=50)
    first = Runner(state)
    first.start(spec(1, [PY, "-c", code], time_limit_s=60, signal=warning))
    wait_for(ready.exists)
    started = first.records[1].started_at
    assert started is not None
    first.poll(now=started + dt.timedelta(seconds=9))
    assert not out.exists()  # 51 s before the limit: not yet
    first.poll(now=started + dt.timedelta(seconds=10))
    wait_for(lambda: out.exists() and out.read_text() == "usr1\n")
    # Sent once, even by an agent that restarted since.
    second = Runner(state)
    second.recover()
    assert second.records[1].warned
    second.poll(now=started + dt.timedelta(seconds=20))
    time.sleep(0.3)
    assert out.read_text() == "usr1\n"
    # A stop that asks for the warning sends it instead of SIGTERM: the task lives on.
    assert second.stop(1, grace_s=0.5, reason="preempt", warn=True)
    wait_for(lambda: out.read_text() == "usr1\nusr1\n")
    assert second.records[1].state == "running"
    wait_for(lambda: (second.poll(), second.records[1].killed)[1])
    wait_for(lambda: first._children[1].poll() is not None)  # reap it as init would
    run_to_end(second, 1)
    r = second.records[1]
    assert (r.state, r.signal) == ("stopped", signal.SIGKILL)
    assert r.reason == "preempt; killed after the grace period"


def test_a_container_task_gets_its_warning_signal_through_the_runtime(
    state: StateDir, tmp_path: Path
) -> None:
    # The fake runtime: `run` stays up like a container; `kill` records what it was asked.
    fake_docker = tmp_path / "docker"
    fake_docker.write_text(
        f"#!/bin/sh\n{INSPECTED}"
        f'if [ "$1" = kill ]; then echo "$@" >> {tmp_path}/kills; exit 0; fi\n'
        f"trap '' TERM; touch {tmp_path}/ready; exec sleep 60\n"  # ends only at SIGKILL
    )
    fake_docker.chmod(0o755)
    runner = Runner(
        state, RunnerConfig(container_runtime="docker", container_binary=str(fake_docker))
    )
    warning = TaskSignal(name="USR1", lead_s=50, batch_only=True)
    runner.start(spec(1, ["python", "train.py"], image="pytorch:24", signal=warning))
    wait_for((tmp_path / "ready").exists)
    started = runner.records[1].started_at
    assert started is not None
    runner.poll(now=started + dt.timedelta(seconds=10))
    kills = tmp_path / "kills"
    assert kills.read_text() == f"kill --signal SIGUSR1 fairgpu-{runner.tag}-task-1\n"
    assert runner.records[1].state == "running"  # the runtime's client was not signalled
    runner.stop(1, grace_s=0, reason="done")
    wait_for(lambda: (runner.poll(), runner.records[1].state)[1] == "stopped")
    assert (
        kills.read_text().splitlines()[-1] == f"kill --signal SIGKILL fairgpu-{runner.tag}-task-1"
    )


def test_a_container_filling_its_writable_layer_is_ended_at_the_disk_limit(
    state: StateDir, tmp_path: Path
) -> None:
    # The fake runtime's container writes into its "writable layer", which `inspect` names.
    layer = tmp_path / "overlay" / "upper"
    layer.mkdir(parents=True)
    fake_docker = tmp_path / "docker"
    fake_docker.write_text(
        f"#!/bin/sh\n{INSPECTED}"
        f'if [ "$1" = inspect ]; then echo {layer}; exit 0; fi\n'
        f'if [ "$1" = kill ]; then exit 0; fi\n'
        f"head -c 8388608 /dev/zero > {layer}/fill; sync; exec sleep 60\n"
    )
    fake_docker.chmod(0o755)
    limits = DiskConfig(task_max_bytes=4 * 2**20, node_reserve_bytes=0)
    runner = Runner(
        state,
        RunnerConfig(container_runtime="docker", container_binary=str(fake_docker), disk=limits),
    )
    runner.start(spec(1, ["python", "train.py"], image="pytorch:24"))
    wait_for(runner.check_disk)
    run_to_end(runner, 1)
    record = runner.records[1]
    assert record.state == "stopped"
    assert record.reason.startswith("disk limit: the task holds ")
    assert "over its limit of 4.0 MiB" in record.reason


def test_an_interactive_container_task_gets_a_terminal(state: StateDir, tmp_path: Path) -> None:
    # No container daemon here: a stand-in client that says what it was given and whether its
    # standard input is a terminal (the terminal host's pty), as docker's client would see it.
    fake_docker = tmp_path / "docker"
    fake_docker.write_text(
        f'#!/bin/sh\n{INSPECTED}echo "$@" > {tmp_path}/argv\n'
        f"if [ -t 0 ]; then echo tty >> {tmp_path}/argv; else echo no-tty >> {tmp_path}/argv; fi\n"
    )
    fake_docker.chmod(0o755)
    runner = Runner(
        state,
        RunnerConfig(
            container_runtime="docker", container_binary=str(fake_docker), pty_attach_wait_s=0
        ),
    )
    runner.start(spec(1, ["bash"], image="pytorch:24", pty=True))
    run_to_end(runner, 1)
    argv, terminal = (tmp_path / "argv").read_text().splitlines()
    assert "--log-driver=none --interactive --tty" in argv
    assert argv.endswith("--entrypoint /run/fairgpu/exec sha256:1d -- bash")
    assert terminal == "tty"
    assert runner.records[1].exit_code == 0
