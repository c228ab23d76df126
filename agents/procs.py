"""A task's processes by pid: whether the one started is still there (not a reused pid), and
what runs under it."""

from __future__ import annotations

import contextlib

import psutil


def create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int | None, started: float | None) -> bool:
    """The process is there, is the one we started (not a reused pid), and is not a zombie."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - started) > 0.01:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(pid: int | None, started: float | None) -> list[int]:
    """The processes under an unconfined task's wrapper (it has no cgroup to list them)."""
    if pid is None or not alive(pid, started):
        return []
    with contextlib.suppress(psutil.Error):
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    return []
