"""New shells in a running task's sandbox (`fairgpu attach --new`, docs/INTERACTIVE.md).

Each shell gets a terminal host of its own (agents/ptyhost.py in its `--new` mode), started by
the agent when the stream's WebSocket is open and listening in a directory of the agent's state
(hidden from tasks). Under strict isolation the host's command is the sandbox's enter mode
(agents/sandbox.py): the shell joins the task's cgroup and network namespace, enters the mount
and IPC namespaces the sandbox made for it, and runs as the task's uid in its working directory,
with the task's environment (its GPUs' `CUDA_VISIBLE_DEVICES` included). Unconfined, it runs as
the agent's user in the task's directory and network. The host watches the task's wrapper
through a pidfd: the shell ends when its connection does, or when the task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from agents import ptyhost, sandbox
from agents.isolation import TaskRefused
from agents.runner import Runner
from agents.state import TaskRecord
from agents.taskenv import launch_environment

_PTYHOST = str(Path(ptyhost.__file__).resolve())
_SANDBOX = str(Path(sandbox.__file__).resolve())
SHELLS = ("/bin/bash", "/bin/sh")
"""The first of these the node has is the new shell."""
ATTACH_WAIT_S = 15.0
"""How long a new shell's host waits for the agent's relay before it gives up (no shell)."""
CLOSE_WAIT_S = ptyhost.HANGUP_S + 5.0
"""After the relay: how long the host has to hang up its shell and exit before SIGKILL."""


class ShellRefused(Exception):
    """No shell can be opened in this task here; the message says why, in one line."""


@dataclass
class NewShell:
    """A new shell's terminal host: connect to `directory`'s socket as to a task's terminal."""

    directory: Path
    process: asyncio.subprocess.Process

    async def close(self) -> None:
        """Once the relay is over: the host hangs its shell up and exits (killed if it does
        not in time); its directory goes."""
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            await self.process.wait()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


ShellOpener = Callable[[], Awaitable[NewShell]]


def opener(runner: Runner, task_id: int) -> ShellOpener | None:
    """What opens a new shell in the task, once its stream is connected; None when the task
    is not running on this node."""
    record = runner.records.get(task_id)
    if record is None or record.state != "running" or record.pid is None:
        return None
    return functools.partial(_start, runner, record)


async def _start(runner: Runner, record: TaskRecord) -> NewShell:
    if record.spec.image or record.container_name:
        raise ShellRefused("the task runs in a container: no new shell beside it")
    try:
        argv, cwd = _command(runner, record)
    except TaskRefused as exc:
        raise ShellRefused(str(exc)) from None
    home = runner.confinement.task_dir(record.spec.task_id)
    env = launch_environment(
        record.spec,
        cuda_by_uuid=runner.config.cuda_by_uuid,
        home=home,
        carried=runner.confinement.cgroups is not None,
    )
    directory = runner.state.root / "shells" / secrets.token_hex(8)
    directory.mkdir(mode=0o700, parents=True)
    assert record.pid is not None
    try:
        watch = os.pidfd_open(record.pid)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        raise ShellRefused("the task has ended") from None
    try:
        if not _same_process(record):  # the pid was reused before the pidfd held it
            shutil.rmtree(directory, ignore_errors=True)
            raise ShellRefused("the task has ended")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", _PTYHOST, "--new", str(watch), str(directory),
            str(ATTACH_WAIT_S), *argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True, pass_fds=(watch,),
        )  # fmt: skip
    finally:
        os.close(watch)
    return NewShell(directory, process)


def _command(runner: Runner, record: TaskRecord) -> tuple[list[str], Path]:
    """The host's command (the shell, entering the sandbox first when the task has one) and
    the directory the host starts in."""
    confinement, spec = runner.confinement, record.spec
    shell = next((path for path in SHELLS if os.access(path, os.X_OK)), None)
    if shell is None:
        raise ShellRefused(f"this node has no shell ({', '.join(SHELLS)})")
    cwd = confinement.workdir(spec)
    group = confinement.cgroup(spec.task_id)
    netns = confinement.netns(spec.task_id)
    if group is None:  # unconfined: the agent's user, in the task's directory and network
        namespaces = confinement.namespaces
        if netns is None or namespaces is None:
            return [shell], cwd
        return [namespaces.ip, "netns", "exec", namespaces.name(spec.task_id), shell], cwd
    uid = confinement.task_uid(spec)
    config: dict[str, object] = {
        "enter": True,
        "uid": uid,
        "gid": uid,
        "cwd": str(cwd),
        "cgroup_procs": [str(path) for path in group.procs_files],
        "members": str(group.members_file),
    }
    if netns is not None:
        config["netns"] = str(netns)
    # The task's own filter, as its sandbox installed it: the shell is one of its processes,
    # and an agent restarted with another `--seccomp` must not open it unfiltered.
    program = record.seccomp if record.seccomp is not None else confinement.seccomp_program(spec)
    if program:
        config["seccomp"] = program
    entering = [sys.executable, "-I", "-S", _SANDBOX, json.dumps(config, separators=(",", ":"))]
    return [*entering, shell], confinement.task_dir(spec.task_id)


def _same_process(record: TaskRecord) -> bool:
    try:
        process = psutil.Process(record.pid)
        started = process.create_time()
    except psutil.Error:
        return False
    return record.pid_create_time is None or abs(started - record.pid_create_time) <= 0.01
