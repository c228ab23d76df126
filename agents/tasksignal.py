"""Signals to a task: to its wrapper's process group, its warning signal to its command alone or
to all its processes, or through docker or podman to a container task."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

import psutil

from agents import wrapper
from agents.isolation import Confinement
from agents.procs import alive
from agents.state import TaskRecord

log = logging.getLogger(__name__)


def warning_signal(record: TaskRecord) -> signal.Signals | None:
    """The task's warning signal, if it has one that this platform knows."""
    if record.spec.signal is None:
        return None
    try:
        return signal.Signals["SIG" + record.spec.signal.name]
    except KeyError:
        log.warning("task %d: no signal %s here", record.task_id, record.spec.signal.name)
        return None


def send_warning(
    record: TaskRecord,
    sig: signal.Signals,
    *,
    confinement: Confinement,
    container_cli: str | None,
) -> None:
    """To the batch shell alone (`B:`), or to every process of the task. Never to the wrapper
    or the log copier, which a signal they do not handle would end: so not to the group."""
    assert record.spec.signal is not None
    if record.pid is None or not alive(record.pid, record.pid_create_time):
        return
    if container_kill(record, sig, container_cli):
        return
    try:
        children = psutil.Process(record.pid).children()
    except psutil.Error:
        return
    commands = [c for c in children if not wrapper.is_copier(c)]
    if record.spec.signal.batch_only:
        targets = commands  # under strict isolation the sandbox has exec'd the command
    elif confinement.cgroup(record.task_id) is not None:
        confinement.signal(record.task_id, sig)
        return
    else:
        targets = [*commands]
        for command in commands:
            with contextlib.suppress(psutil.Error):
                targets.extend(command.children(recursive=True))
    for process in targets:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def container_kill(record: TaskRecord, sig: signal.Signals, container_cli: str | None) -> bool:
    """Through docker or podman (`container_cli`, None on a node with neither) for a container
    task (False for any other task): the container's processes are the runtime's, in no cgroup
    or process group of the agent's. The signal goes to the container's main process, whose
    init (`--init`) hands it to the job's command, inside the container and as the task's uid's
    process."""
    if not record.container_name or container_cli is None:
        return False
    argv = [container_cli, "kill", "--signal", sig.name, record.container_name]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(argv, capture_output=True, timeout=30)
    return True


def signal_group(record: TaskRecord, sig: signal.Signals) -> bool:
    """`sig` to the wrapper's process group (it leads its own session and group); False if
    the wrapper is gone, so nothing was sent."""
    if record.pid is None or not alive(record.pid, record.pid_create_time):
        return False
    try:
        os.killpg(record.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
