"""The `sh` wrapper each task runs under, and the log copier it starts beside the command.

The wrapper is the leader of a new session (so a signal to the group reaches everything the job
started) and writes the command's exit status to a file; the exit file gives the exit status
even when the agent that started the task is not the one that sees it end. The task's output
goes through a pipe to a copier the wrapper starts in the same session (agents.logcap), never to
the agent, so neither the log nor the task dies with the agent, and the copier keeps the log on
disk within its byte limit however fast the task writes. The copier holds a lock the agent took
for it until it has written the last byte: a task has ended once its wrapper has exited and that
lock is free (or the runner's drain time has passed: processes the task left behind may keep
the pipe open).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from agents import logcap, ptyhost

# Started with the output pipe's read end on stdin, its write end on stdout and the copier's lock
# on stderr. The copier inherits "ignore" for TERM, INT and HUP, the read end and the lock (as fd
# 3); the wrapper then keeps only the write end (for its own "Terminated" lines too). `trap :`
# (a handler, not "ignore") lets the wrapper outlive SIGTERM to record the status while the
# command itself still gets SIGTERM's default action: ignored signals would be inherited.
# (A background command's stdin would be /dev/null without an explicit redirection: hence fd 4.)
_WRAPPER = (
    "trap '' TERM INT HUP; exec 4<&0; "
    '"$1" -I -S "$2" "$3" "$4" "$5" <&4 4<&- 3>&2 >/dev/null 2>>"$3/logcap.err" & '
    "trap : TERM INT HUP; exec 2>&1 </dev/null 4<&-; shift 5; "
    '"$@"; s=$?; echo $s > "$0.tmp" && mv "$0.tmp" "$0"; exit $s'
)
_LOGCAP = str(Path(logcap.__file__).resolve())
_PTYHOST = str(Path(ptyhost.__file__).resolve())
_SIGNALS = frozenset(int(s) for s in signal.Signals)


def on_terminal(task_dir: Path, attach_wait_s: float, argv: list[str]) -> list[str]:
    """`argv` on a terminal that streams attach to (agents/ptyhost.py); the terminal's output
    is the task's log as any task's output is."""
    return [sys.executable, "-I", "-S", _PTYHOST, str(task_dir), str(attach_wait_s), *argv]


def start(
    argv: list[str],
    *,
    task_dir: Path,
    exit_path: Path,
    lock_path: Path,
    log_max_bytes: int,
    log_max_rate_bytes_per_s: int,
    cwd: Path,
    env: dict[str, str],
    handed: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """The wrapper running `argv`, its copier writing the output under `task_dir` and holding
    the lock at `lock_path` until the last byte is written. The descriptors `handed` reach
    `argv` under their numbers, and are closed here once they have (or the start failed)."""
    exit_path.unlink(missing_ok=True)
    copier = [
        sys.executable,
        _LOGCAP,
        str(task_dir),
        str(log_max_bytes),
        str(log_max_rate_bytes_per_s),
    ]
    read_fd, write_fd = os.pipe()
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # the copier holds it from here on
            return subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, str(exit_path), *copier, *argv],
                stdin=read_fd,
                stdout=write_fd,
                stderr=lock_fd,
                cwd=cwd,
                env=env,
                start_new_session=True,
                pass_fds=handed,
            )
        finally:
            os.close(lock_fd)
    finally:
        for fd in (read_fd, write_fd, *handed):
            os.close(fd)


def exit_status(exit_path: Path) -> tuple[int | None, int | None] | None:
    """(exit code, signal) as the wrapper recorded them; None when it recorded nothing."""
    try:
        status = int(exit_path.read_text().strip())
    except (OSError, ValueError):
        return None
    if status > 128 and status - 128 in _SIGNALS:  # the shell's encoding of a signal
        return None, status - 128
    return status, None


def is_copier(process: psutil.Process) -> bool:
    """The wrapper's log copier (agents.logcap), as opposed to the task's command."""
    try:
        return _LOGCAP in process.cmdline()
    except psutil.Error:
        return False


def lock_free(path: Path) -> bool:
    """Nobody holds the lock (a task started before the copier existed has no lock file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases the lock if it was taken
    return True
