"""A docker or podman task's own variables, kept off the node's disk.

Whatever docker or podman is given as a container's environment they store on disk in clear
(docker's /var/lib/docker/containers/<id>/config.v2.json and containerd's metadata, podman's
container store). So the job's own variables (its `env`, secret variables included, which the
node cannot tell apart) and FAIRGPU_JOB_SECRET never reach the runtime: the agent writes them to
a file on a memory filesystem (`memory_backed`), in a directory of the task's own, which the
container mounts read-only at `MOUNT`; the agent's helper, the container's entrypoint
(agents/helper/fairgpu-exec.c), adds them to its environment and then execs what the image and
the job ask for, as Kubernetes and swarm hand secrets over in a tmpfs file. The runtime sees only
fairgpu's own variables (`env_file`) and the path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from protocol.agent import TaskSpec

log = logging.getLogger(__name__)

MOUNT = "/run/fairgpu/env"
"""Where a container sees its task's directory of variables."""
_FILE = "env"
FILE = f"{MOUNT}/{_FILE}"
"""The file of variables, as the container sees it (the helper's `-e`)."""
_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class ContainerEnvError(RuntimeError):
    """The task's variables cannot be kept off the node's disk; the message is one line."""


def private_variables(spec: TaskSpec, env: Mapping[str, str]) -> dict[str, str]:
    """The job's own variables (their final values) and its secret: never given to the runtime."""
    names = set(spec.env) | {"FAIRGPU_JOB_SECRET"}
    return {name: value for name, value in env.items() if name in names}


def variables_file(env: Mapping[str, str]) -> bytes:
    """`env` as the helper reads it: NAME=value entries, each ended by a NUL byte (which no
    value holds: the protocol refuses one), so line breaks and quotes survive as they are.
    ContainerEnvError for a value holding one all the same."""
    entries = []
    for name, value in sorted(env.items()):
        if "\0" in name or "\0" in value or "=" in name or not name:
            raise ContainerEnvError(f"the variable {name[:64]!r} cannot be handed to a container")
        entries.append(f"{name}={value}\0")
    return "".join(entries).encode()


def memory_backed(path: Path) -> bool:
    """Whether `path` lies on a tmpfs or ramfs: the innermost mount holding it, from
    /proc/self/mountinfo."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, fields[separator + 1]
    return fstype in _MEMORY_FILESYSTEMS


def default_root(tag: str) -> Path:
    """/run/fairgpu/<tag> where /run/fairgpu is on a memory filesystem (root's alone: /run on a
    systemd host, or the host's /run/fairgpu mounted into the agent's pod), else under
    /dev/shm."""
    run = Path("/run/fairgpu")
    if run.parent.is_dir() and memory_backed(run):
        return run / tag
    return Path("/dev/shm") / f"fairgpu-{tag}"  # noqa: S108 - created and checked as root's


class ContainerEnv:
    """The agent's directory of task variable files: root's, mode 0700, on a memory filesystem;
    one read-only subdirectory per running container task."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, task_id: int, variables: Mapping[str, str]) -> Path:
        """The task's directory holding `variables`, to mount at `MOUNT`. ContainerEnvError
        where the file would land on the node's disk."""
        content = variables_file(variables)
        self._ensure_root()
        directory = self.root / str(task_id)
        _remove_task(directory)  # what a crash left
        directory.mkdir(mode=0o700)
        path = directory / _FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(content)
        # The container's user (any uid under docker's --user, the image's own otherwise)
        # reads it through the mount; on the node only root reaches it (the root is 0700).
        path.chmod(0o444)
        directory.chmod(0o555)
        return directory

    def remove(self, task_id: int) -> None:
        """Remove the task's files, and the agent's directory once it holds no other task's."""
        if not self._ours():
            return
        _remove_task(self.root / str(task_id))
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def sweep(self, keep: set[int]) -> None:
        """Remove the files of tasks not in `keep`: what an agent that stopped abruptly left."""
        if not self._ours():
            return
        for entry in self.root.iterdir():
            if not entry.name.isdigit():
                _remove(entry)
            elif int(entry.name) not in keep:
                self.remove(int(entry.name))
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def _ours(self) -> bool:
        """The root is this agent's directory, not a link or anything someone else made under
        a world-writable parent (nothing is followed there, or removed through it). Once it is
        root's, the parent's sticky bit keeps anyone else from renaming it away."""
        try:
            info = self.root.lstat()
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()

    def _ensure_root(self) -> None:
        parent = self.root.parent
        if not memory_backed(parent):
            raise ContainerEnvError(
                f"{parent} is not a memory filesystem (tmpfs): the job's variables would be "
                "written to the node's disk"
            )
        if parent != Path("/dev/shm"):  # noqa: S108
            parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        try:
            self.root.mkdir(mode=0o700)
        except FileExistsError:
            if self._ours():
                self.root.chmod(0o700)
                return
            # Not ours (a world-writable parent lets anyone make the name first): replaced.
            log.warning("replacing %s, which is not this agent's directory", self.root)
            _remove(self.root)
            self.root.mkdir(mode=0o700)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_task(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        directory.chmod(0o700)  # read-only once written
        shutil.rmtree(directory)
