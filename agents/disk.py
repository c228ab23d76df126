"""What tasks may hold of the node's local disk: a limit per task and a reserve for the node.

A task writes into its own directory (its HOME and default working directory), which lies on
the node's local disk beside the agent's state and the other tasks' directories. Filesystems
with project quotas are not everywhere, so the agent measures instead, as kubelet does for a
pod's ephemeral storage: every `check_interval_s` it adds up the blocks each running task's
directory holds, plus the files its processes hold open after deleting them (which a walk of the
directory cannot see) and its container's writable layer, and ends a task over
`task_max_bytes` or `task_max_files`. When the filesystem's free space falls under
`node_reserve_bytes`, it ends the task that holds the most, one per check, so that a job filling
the disk between two checks cannot take the node (the agent's state and logs, the other tasks)
with it.

The walk is bounded: it stops at `task_max_files` entries (a task over the file limit is ended
for that), so a task making millions of empty files costs the agent one bounded walk, and it
runs in a thread (`measure_all` touches nothing but the file system and the container
runtime's `inspect`), never in the agent's loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DiskConfig:
    task_max_bytes: int | None = None
    """The most a task's directory may hold (blocks allocated, not apparent sizes). None: no
    limit of its own (the node's reserve still holds)."""
    task_max_files: int | None = 500_000
    """The most files and directories a task's directory may hold: inodes are a disk too."""
    node_reserve_bytes: int | None = None
    """Free space under which the task holding the most is ended. 0: none. None:
    `node_reserve_ratio` of the filesystem's size."""
    node_reserve_ratio: float = 0.05
    pressure_min_task_bytes: int = 64 * 2**20
    """Under the reserve, a task holding less is never ended: it frees too little to matter
    (the disk is full of something else, which ending every small task would not change)."""
    check_interval_s: float = 10.0

    @property
    def enabled(self) -> bool:
        reserve = self.node_reserve_bytes != 0 and (
            self.node_reserve_bytes is not None or self.node_reserve_ratio > 0
        )
        return bool(self.task_max_bytes or self.task_max_files or reserve)

    def reserve_bytes(self, space: Space) -> int:
        if self.node_reserve_bytes is not None:
            return self.node_reserve_bytes
        return int(space.total_bytes * self.node_reserve_ratio)


@dataclass(frozen=True, slots=True)
class Space:
    free_bytes: int
    """What unprivileged writers may still use (tasks are not root)."""
    total_bytes: int


PATH_MAX = 4096
"""Linux's longest path, its NUL included: a directory nested deeper cannot be walked by path."""


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int
    files: int
    too_deep: bool = False
    """The directory nests a path of PATH_MAX bytes or more: what lies below went unmeasured
    (a task hid 48 MiB from a 16 MiB limit there), so the task is ended as over its limits."""


@dataclass(frozen=True, slots=True)
class Target:
    """A running task to measure: its directory and the processes that may hold files open."""

    task_id: int
    directory: Path
    pids: tuple[int, ...] = ()
    container: tuple[str, str] | None = None
    """(runtime binary, container name) of a docker or podman task: its container's writable
    layer is on the node's disk too."""


def measure(directory: Path, *, max_files: int | None) -> Usage:
    """Blocks held under `directory` (each inode once, this filesystem only, symlinks not
    followed); the walk stops past `max_files` entries."""
    try:
        top = os.lstat(directory)
    except OSError:
        return Usage(0, 0)
    seen: set[int] = {top.st_ino}
    total, files = top.st_blocks * 512, 0
    pending = [str(directory)]
    while pending:
        path = pending.pop()
        with contextlib.suppress(OSError), os.scandir(path) as entries:
            for entry in entries:
                files += 1
                if max_files is not None and files > max_files:
                    return Usage(total, files)
                if len(os.fsencode(entry.path)) + 1 >= PATH_MAX:
                    return Usage(total, files, too_deep=True)  # beyond what a path can name
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                if info.st_dev != top.st_dev or info.st_ino in seen:
                    continue  # a mount point (not this disk) or a hard link counted already
                seen.add(info.st_ino)
                total += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
    return Usage(total, files)


def deleted_open_bytes(pids: Iterable[int], device: int, *, max_fds: int = 100_000) -> int:
    """Blocks on `device` held by files these processes keep open after deleting them."""
    total, looked = 0, 0
    seen: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # ended meanwhile
        for fd in fds:
            looked += 1
            if looked > max_fds:
                return total
            try:
                info = os.stat(f"{fd_dir}/{fd}")  # the open file itself, wherever it was
            except OSError:
                continue
            if (
                stat.S_ISREG(info.st_mode)
                and info.st_nlink == 0
                and info.st_dev == device
                and info.st_ino not in seen
            ):
                seen.add(info.st_ino)
                total += info.st_blocks * 512
    return total


def container_layer(binary: str, name: str) -> Path | None:
    """The writable layer of a running docker or podman container (overlay's upper directory);
    None when the runtime cannot say (another storage driver, the container gone)."""
    argv = [binary, "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    path = done.stdout.strip()
    return Path(path) if done.returncode == 0 and path.startswith("/") else None


def measure_all(targets: Iterable[Target], *, max_files: int | None) -> dict[int, Usage]:
    """Every target's usage: its directory, its deleted-but-open files on that disk, and its
    container's writable layer."""
    usage: dict[int, Usage] = {}
    for target in targets:
        found = measure(target.directory, max_files=max_files)
        layer = container_layer(*target.container) if target.container else None
        if layer is not None:
            inside = measure(layer, max_files=max_files)
            found = Usage(
                found.bytes + inside.bytes,
                found.files + inside.files,
                found.too_deep or inside.too_deep,
            )
        try:
            device = os.lstat(target.directory).st_dev
        except OSError:
            usage[target.task_id] = found
            continue
        hidden = deleted_open_bytes(target.pids, device)
        usage[target.task_id] = Usage(found.bytes + hidden, found.files, found.too_deep)
    return usage


def space(directory: Path) -> Space | None:
    """The free and total space of `directory`'s filesystem."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    return Space(fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize)


def over_limit(usage: Mapping[int, Usage], config: DiskConfig) -> dict[int, str]:
    """Task id → the one-line reason it is ended, for every task over its own limits."""
    ended: dict[int, str] = {}
    for task_id, used in usage.items():
        if used.too_deep:  # whatever the limits: its usage is unknown, and could be the disk
            ended[task_id] = (
                f"disk limit: the task's directory nests deeper than the node measures (a path "
                f"of {PATH_MAX} bytes or more)"
            )
        elif config.task_max_files is not None and used.files > config.task_max_files:
            ended[task_id] = (
                f"disk limit: the task's directory holds more than {config.task_max_files} "
                "files, this node's limit"
            )
        elif config.task_max_bytes is not None and used.bytes > config.task_max_bytes:
            ended[task_id] = (
                f"disk limit: the task holds {size(used.bytes)} of the node's local disk, over "
                f"its limit of {size(config.task_max_bytes)}"
            )
    return ended


def largest_under_pressure(
    usage: Mapping[int, Usage], found: Space | None, config: DiskConfig
) -> tuple[int, str] | None:
    """The task to end because the node's free space is under its reserve: the one holding the
    most (as kubelet ranks pods under disk pressure). None when there is no pressure, or no task
    holds at least `pressure_min_task_bytes`."""
    if found is None:
        return None
    reserve = config.reserve_bytes(found)
    if found.free_bytes >= reserve:
        return None
    floor = max(config.pressure_min_task_bytes, 1)
    holding = [(used.bytes, task_id) for task_id, used in usage.items() if used.bytes >= floor]
    if not holding:
        return None
    held, task_id = max(holding)
    return task_id, (
        f"disk limit: the node's free disk space ({size(found.free_bytes)}) fell under its "
        f"reserve of {size(reserve)}, and this task held the most of it ({size(held)})"
    )


def size(n: int) -> str:
    """Rounded up: a task just over its limit never reads as holding exactly the limit."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{math.ceil(n * 10 / scale) / 10:.1f} {unit}"
    return f"{n} B"
