"""One cgroup per task: memory, pids and CPU limits, and an end that takes every process with it.

Two layouts, found at start-up (`open_hierarchy`):

- cgroup v2 (the unified hierarchy at /sys/fs/cgroup, the default of current distributions):
  `<root>/<parent>/task-<id>`, with memory, pids and cpu enabled for the parent's children.
  The whole task is killed through `cgroup.kill` (Linux 5.14), or by freezing it and sending
  SIGKILL to every member where that file is missing. `memory.oom.group` makes the kernel's OOM
  killer take the whole task, not one of its processes.
- cgroup v1, alone or beside an empty unified hierarchy ("hybrid"): one directory per controller,
  `<memory|pids|cpu|freezer mount>/<agent's own cgroup>/<parent>/task-<id>`. The freezer stops
  the task so that nothing forks while it is killed.

Huge pages (hugetlbfs, `MAP_HUGETLB`, `SHM_HUGETLB`) come from the node's pools
(/sys/kernel/mm/hugepages), which the memory controller does not charge: without a limit one
task maps a whole pool and leaves none to the others. Where the hugetlb controller is there (v2,
or a v1 mount, or the unified hierarchy of a hybrid host, which a task then joins as well),
every pool's `hugetlb.<size>.max` and `.rsvd.max` is the task's `Limits.hugetlb_bytes` for it,
0 where it has none.

A docker container is the daemon's process, not the task's: `container_parent` names the
`--cgroup-parent` (docker's cgroupfs driver, a path below each hierarchy's root) that puts it
below the task's cgroup, where the task's limits bound it together with the task's own processes.

A process joins its task's cgroup before it becomes the task (agents.sandbox writes its pid to
`procs_files`), so every process the task starts, double-forked or `setsid`, is a member, and
`kill()` leaves none behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from agents.netwall import cgroup2_mount

log = logging.getLogger(__name__)

_V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
HUGETLB = "hugetlb"
HUGEPAGES = Path("/sys/kernel/mm/hugepages")
HELPER = "helper"
"""The v2 child directory of a task's cgroup where its helper (pasta) runs."""
_V2_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupError(RuntimeError):
    """The host cannot give tasks cgroups of their own; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int | None
    """None: no limit of the task's own (the node's memory bounds it)."""
    pids_max: int | None
    cpu_weight: int
    """cgroup v2's scale, 1..10000 with 100 the default share; v1 gets shares = weight × 10.24."""
    hugetlb_bytes: dict[str, int] = field(default_factory=dict)
    """Huge pages the task may hold, by the hugetlb controller's size name (`2MB`, `1GB`); a
    size not named: none."""


@dataclass(frozen=True, slots=True)
class HugePool:
    page_bytes: int
    pages: int
    """What the pool can hold at most: its pages and those it may add (`nr_overcommit`)."""


def huge_pools(root: Path = HUGEPAGES) -> dict[str, HugePool]:
    """The node's huge page pools by the hugetlb controller's name for their size."""
    pools: dict[str, HugePool] = {}
    for directory in sorted(root.glob("hugepages-*kB")):
        with contextlib.suppress(OSError, ValueError):
            kib = int(directory.name.removeprefix("hugepages-").removesuffix("kB"))
            pages = int((directory / "nr_hugepages").read_text())
            pages += int((directory / "nr_overcommit_hugepages").read_text())
            pools[_size_name(kib * 1024)] = HugePool(kib * 1024, pages)
    return pools


def _size_name(page_bytes: int) -> str:
    """The kernel's name for a huge page size in hugetlb's files (mm/hugetlb_cgroup.c)."""
    for unit, name in ((2**30, "GB"), (2**20, "MB"), (2**10, "KB")):
        if page_bytes >= unit:
            return f"{page_bytes // unit}{name}"
    return f"{page_bytes}B"


def _limit_hugetlb(directory: Path, hugetlb_bytes: dict[str, int]) -> None:
    """Every pool's limit in a task's hugetlb cgroup: its share, 0 for a pool not named."""
    for limit in directory.glob("hugetlb.*.max"):
        size = limit.name.split(".")[1]
        value = str(hugetlb_bytes.get(size, 0))
        limit.write_text(value)
        _write_if_present(directory / f"hugetlb.{size}.rsvd.max", value)


@dataclass(frozen=True, slots=True)
class ContainerParent:
    """Where docker's cgroupfs driver puts a task's container: `path` below the root of every
    hierarchy it joins (mkdir -p, the container a child of it)."""

    path: str
    bounded: tuple[str, ...]
    """The task's controllers whose directory is `path`: they bound the container."""
    unbounded: tuple[str, ...]
    """The task's controllers that are elsewhere (the agent's own cgroup differs between v1
    controllers): there the container has docker's own flags alone."""


class TaskCgroup(ABC):
    """The cgroup of one task, on whichever hierarchy the host has."""

    @property
    @abstractmethod
    def procs_files(self) -> list[Path]:
        """Where a process writes its pid to join (every controller's directory on v1)."""

    @property
    @abstractmethod
    def members_file(self) -> Path:
        """The `cgroup.procs` file that lists the task's own processes (what `pids()` reads)."""

    @abstractmethod
    def pids(self) -> list[int]: ...

    @abstractmethod
    def oom_killed(self) -> bool:
        """The kernel's OOM killer ended a process of this task."""

    @abstractmethod
    def helper_placement(self) -> tuple[Path | None, list[Path]]:
        """Where a helper process of the task that its signals must not reach (the task's pasta)
        is charged to the task's memory, pids and CPU: its cgroup v2 directory (made, empty;
        None: the v2 hierarchy holds no task cgroups here) and the `cgroup.procs` files of the
        v1 controllers it joins. Never where `pids()` (and so `signal_all`) looks, nor the v1
        freezer; `kill()` and the OOM killer may still take it, as the task ends anyway."""

    @abstractmethod
    def _kill_all(self) -> None: ...

    @abstractmethod
    def _directories(self) -> list[Path]: ...

    def exists(self) -> bool:
        return any(d.is_dir() for d in self._directories())

    def signal_all(self, sig: signal.Signals, *, signalled_group: int | None = None) -> None:
        """`sig` to every member, but not to those in process group `signalled_group`, which
        the caller has just signalled through `killpg`: a process must get a SIGTERM once, since
        a second one arriving while its handler runs re-enters that handler (in Python, a
        "reentrant call" error in the middle of its print, or a half-imported module)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if signalled_group is not None and os.getpgid(pid) == signalled_group:
                    continue
                os.kill(pid, sig)

    def kill(self, timeout_s: float = 10.0) -> bool:
        """SIGKILL every member and wait until none is left. False if some survived."""
        deadline = time.monotonic() + timeout_s
        while self.exists() and self.pids():
            self._kill_all()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def remove(self, timeout_s: float = 10.0) -> None:
        """Kill what is left and delete the cgroup (its counters with it). A killed process
        leaves `pids()` as it starts to exit but stays a member until it has exited, and the
        kernel refuses to delete a cgroup with members (EBUSY): a CUDA process takes a second
        or more to exit while the driver tears its context down (seen on an H200: the agent's
        poll failed and the task's directory stayed on the node's disk). Each directory is
        tried again until `timeout_s`; one still busy then is left, with a warning, for the
        node's operator: nothing of the task's is left running in it."""
        self.kill(timeout_s)
        deadline = time.monotonic() + timeout_s
        for directory in self._directories():
            remove_when_empty(directory, deadline, "cgroup")


class Hierarchy(ABC):
    """Where task cgroups are made on this host."""

    version: int
    limits_hugetlb: bool = False
    """Task cgroups have the hugetlb controller: their huge pages are bounded."""

    @abstractmethod
    def task(self, task_id: int) -> TaskCgroup:
        """The cgroup of a task, made or not (recovery finds the cgroups of adopted tasks)."""

    @abstractmethod
    def create(self, task_id: int, limits: Limits, *, gid: int | None = None) -> TaskCgroup:
        """The task's cgroup, made with its limits; readable by `gid` (the task's) and root
        alone where given (`_private`)."""

    @abstractmethod
    def parents(self) -> list[Path]: ...

    @abstractmethod
    def container_parent(self, task_id: int) -> ContainerParent:
        """docker's `--cgroup-parent` for the task's container (cgroupfs driver)."""

    def make_container_parent(self, task_id: int, gid: int) -> ContainerParent:
        """`container_parent`, made private to the task's gid (`_private`) in every hierarchy
        runc will put the container in, before it does."""
        return self.container_parent(task_id)

    @abstractmethod
    def pids_ceiling(self) -> int | None:
        """The lowest `pids.max` above the task cgroups (their parent and its ancestors: under
        systemd the agent unit's `TasksMax`, which the agent's own threads share with every
        task); None where none is set."""

    def remove(self) -> None:
        """End every task cgroup left under the parent(s), then delete them (tests, clusters
        that stop with their tasks, decommissioning)."""
        task_ids = {
            int(child.name.removeprefix("task-"))
            for parent in self.parents()
            for child in parent.glob("task-*")
            if child.name.removeprefix("task-").isdigit()
        }
        for task_id in task_ids:
            self.task(task_id).remove()
        for directory in self.parents():
            with contextlib.suppress(FileNotFoundError, OSError):
                directory.rmdir()


# cgroup v2 -------------------------------------------------------------------------------------
class _V2Task(TaskCgroup):
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def procs_files(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    @property
    def members_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        return _read_pids(self.members_file)

    def oom_killed(self) -> bool:
        return _counter(self.path / "memory.events", "oom_kill") > 0

    def helper_placement(self) -> tuple[Path | None, list[Path]]:
        # A child of the task's cgroup with no controllers of its own: its processes count
        # against the task's limits (v2 charges up the tree) but are not in the task's
        # cgroup.procs. Enabling none keeps the task's own directory free to hold processes.
        helper = self.path / HELPER
        helper.mkdir(exist_ok=True)
        return helper, []

    def _kill_all(self) -> None:
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists():
            with contextlib.suppress(FileNotFoundError):
                kill_file.write_text("1")
            return
        freeze = self.path / "cgroup.freeze"
        with contextlib.suppress(FileNotFoundError):
            freeze.write_text("1")
            self.signal_all(signal.SIGKILL)
            freeze.write_text("0")

    def _directories(self) -> list[Path]:
        # The helper's child first: the task's own directory is deleted only without it.
        return [self.path / HELPER, self.path]


class _V2(Hierarchy):
    version = 2

    def __init__(self, root: Path, parent: str) -> None:
        self.root = root
        self.parent = root / parent.strip("/")
        available = set((root / "cgroup.controllers").read_text().split())
        missing = set(_V2_CONTROLLERS) - available
        self.limits_hugetlb = HUGETLB in available
        self.controllers = [*_V2_CONTROLLERS, *([HUGETLB] if self.limits_hugetlb else [])]
        if missing:
            raise CgroupError(
                f"cgroup v2 at {root} lacks the {', '.join(sorted(missing))} controller(s)"
            )
        self.parent.mkdir(parents=True, exist_ok=True)
        _unlisted(self.parent, root)
        _enable_down(root, self.parent, self.controllers)
        self.sealed = _levels_to_seal(self.parent, root, _own_v2_cgroup(root))
        _seal(self.sealed)

    def task(self, task_id: int) -> TaskCgroup:
        return _V2Task(self.parent / f"task-{task_id}")

    def parents(self) -> list[Path]:
        return [self.parent]

    def pids_ceiling(self) -> int | None:
        return _lowest_pids_max(self.parent, self.root)

    def container_parent(self, task_id: int) -> ContainerParent:
        # The task's directory holds no process of a container task (docker's client runs
        # outside it), so runc may enable the controllers for the container's child there.
        path = "/" + str((self.parent / f"task-{task_id}").relative_to(self.root))
        return ContainerParent(path, tuple(self.controllers), ())

    def create(self, task_id: int, limits: Limits, *, gid: int | None = None) -> TaskCgroup:
        _seal(self.sealed)  # files a controller enabled since then brought
        group = _V2Task(self.parent / f"task-{task_id}")
        group.path.mkdir(exist_ok=True)
        _private(group.path, gid)
        if limits.memory_bytes is not None:
            (group.path / "memory.max").write_text(str(limits.memory_bytes))
            _write_if_present(group.path / "memory.swap.max", "0")
        _write_if_present(group.path / "memory.oom.group", "1")
        if limits.pids_max is not None:
            (group.path / "pids.max").write_text(str(limits.pids_max))
        (group.path / "cpu.weight").write_text(str(limits.cpu_weight))
        _limit_hugetlb(group.path, limits.hugetlb_bytes)
        return group


# cgroup v1 -------------------------------------------------------------------------------------
class _V1Task(TaskCgroup):
    def __init__(self, paths: dict[str, Path], leftovers: list[Path]) -> None:
        self.paths = paths
        self.leftovers = leftovers

    @property
    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.paths.values()]

    @property
    def members_file(self) -> Path:
        # Every member joined every controller; the freezer's list is the one kill() acts on.
        return self.paths["freezer"] / "cgroup.procs"

    def pids(self) -> list[int]:
        return _read_pids(self.members_file)

    def oom_killed(self) -> bool:
        return _counter(self.paths["memory"] / "memory.oom_control", "oom_kill") > 0

    def helper_placement(self) -> tuple[Path | None, list[Path]]:
        # The charging controllers, not the freezer (whose members are the task's processes).
        charged = [self.paths[c] / "cgroup.procs" for c in ("memory", "pids", "cpu")]
        return None, charged

    def _kill_all(self) -> None:
        state = self.paths["freezer"] / "freezer.state"
        try:
            state.write_text("FROZEN")
            self.signal_all(signal.SIGKILL)
        except FileNotFoundError:
            return
        finally:
            with contextlib.suppress(FileNotFoundError):
                state.write_text("THAWED")  # SIGKILL takes effect once thawed

    def _directories(self) -> list[Path]:
        return [*self.paths.values(), *self.leftovers]

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.paths.values())


class _V1(Hierarchy):
    version = 1

    def __init__(self, mounts: dict[str, Path], parent: str, unified: Path | None = None) -> None:
        own = _own_v1_cgroups()
        self.mounts = mounts
        self.by_controller = {
            controller: mounts[controller]
            / own.get(controller, "/").lstrip("/")
            / parent.strip("/")
            for controller in (*_V1_CONTROLLERS, *([HUGETLB] if HUGETLB in mounts else []))
        }
        self.roots = {controller: mounts[controller] for controller in self.by_controller}
        self.hierarchies = _cgroup_roots()
        """Every hierarchy's root, where docker's --cgroup-parent makes directories."""
        for controller, directory in self.by_controller.items():
            directory.mkdir(parents=True, exist_ok=True)
            _unlisted(directory, mounts[controller])
        # The levels `parent` names below the agent's own cgroup; the agent's own (its unit's
        # under systemd) is the host's: docs/ISOLATION.md says what it sums.
        self.sealed = [
            level
            for controller, directory in self.by_controller.items()
            for level in _levels_to_seal(
                directory, mounts[controller] / own.get(controller, "/").lstrip("/"), None
            )
        ]
        if HUGETLB not in mounts and unified is not None:
            # A hybrid host whose hugetlb is the unified hierarchy's: tasks join a cgroup
            # there too, at its top as on v2 (a level holding processes hands none down).
            with contextlib.suppress(OSError):
                if HUGETLB in (unified / "cgroup.controllers").read_text().split():
                    directory = unified / parent.strip("/")
                    directory.mkdir(parents=True, exist_ok=True)
                    _unlisted(directory, unified)
                    _enable_down(unified, directory, [HUGETLB])
                    self.by_controller[HUGETLB] = directory
                    self.roots[HUGETLB] = unified
                    self.sealed += _levels_to_seal(directory, unified, _own_v2_cgroup(unified))
        self.limits_hugetlb = HUGETLB in self.by_controller
        _seal(self.sealed)

    def task(self, task_id: int) -> TaskCgroup:
        return _V1Task(
            {c: p / f"task-{task_id}" for c, p in self.by_controller.items()},
            self._container_leftovers(task_id),
        )

    def _container_leftovers(self, task_id: int) -> list[Path]:
        """What docker's `--cgroup-parent` makes beside the task's directories (in every other
        hierarchy, cpuset and devices among them), which runc leaves when it removes the
        container's own: deleted with the task's cgroup, or every container task would leave
        empty cgroups on the node."""
        path = self.container_parent(task_id).path.lstrip("/")
        own = {p / f"task-{task_id}" for p in self.by_controller.values()}
        return [root / path for root in self.hierarchies if root / path not in own]

    def parents(self) -> list[Path]:
        # and where docker's --cgroup-parent made the same parent in the other hierarchies
        made = Path(self.container_parent(0).path.lstrip("/")).parent
        docker = [root / made for root in self.hierarchies]
        own = list(self.by_controller.values())
        return [*own, *(d for d in docker if d not in own)]

    def pids_ceiling(self) -> int | None:
        return _lowest_pids_max(self.by_controller["pids"], self.mounts["pids"])

    def _relative(self, task_id: int) -> dict[str, str]:
        """Each controller's task directory below its hierarchy's root."""
        return {
            controller: "/"
            + str((directory / f"task-{task_id}").relative_to(self.roots[controller]))
            for controller, directory in self.by_controller.items()
        }

    def make_container_parent(self, task_id: int, gid: int) -> ContainerParent:
        # runc makes the path in the hierarchies the task has no directory in (blkio, cpuset,
        # devices, ...) as readable by any uid: another org read the container's there.
        parent = self.container_parent(task_id)
        relative = Path(parent.path.lstrip("/"))
        for root in self.hierarchies:
            directory = root / relative
            if directory.is_dir():
                continue  # the task's own (made private with it)
            directory.mkdir(parents=True, exist_ok=True)
            _unlisted(directory.parent, root)
            # that parent sums every container task's I/O, CPUs, ...: sealed as the parent is
            _seal([directory.parent])
            _private(directory, gid)
        return parent

    def container_parent(self, task_id: int) -> ContainerParent:
        # One path for every hierarchy: the hugetlb directory's where there is one (what no
        # flag of docker's bounds), else the memory one's. The freezer is not a bound: the
        # agent stops a container through docker.
        relative = self._relative(task_id)
        path = relative.get(HUGETLB, relative["memory"])
        limits = [c for c in relative if c != "freezer"]
        bounded = tuple(c for c in limits if relative[c] == path)
        return ContainerParent(path, bounded, tuple(c for c in limits if relative[c] != path))

    def create(self, task_id: int, limits: Limits, *, gid: int | None = None) -> TaskCgroup:
        _seal(self.sealed)
        group = _V1Task(
            {c: p / f"task-{task_id}" for c, p in self.by_controller.items()},
            self._container_leftovers(task_id),
        )
        for directory in group.paths.values():
            directory.mkdir(exist_ok=True)
            _private(directory, gid)
        memory = group.paths["memory"]
        if limits.memory_bytes is not None:
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            # Swap would let a task run past its limit at the node's expense.
            _write_if_present(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        if limits.pids_max is not None:
            (group.paths["pids"] / "pids.max").write_text(str(limits.pids_max))
        (group.paths["cpu"] / "cpu.shares").write_text(str(max(2, limits.cpu_weight * 1024 // 100)))
        if HUGETLB in group.paths:
            _limit_hugetlb(group.paths[HUGETLB], limits.hugetlb_bytes)
        return group


# discovery -------------------------------------------------------------------------------------
def open_hierarchy(parent: str = "fairgpu", *, root: Path = Path("/sys/fs/cgroup")) -> Hierarchy:
    """The host's cgroups for task groups under `parent`; CgroupError says what is missing."""
    parts = parent.strip("/").split("/")
    if not parent or any(part in ("", ".", "..") for part in parts):
        raise CgroupError(f"cgroup parent must be a relative path of names, not {parent!r}")
    try:
        if (root / "cgroup.controllers").exists():
            return _V2(root, parent)
        mounts = _v1_mounts()
        missing = [c for c in _V1_CONTROLLERS if c not in mounts]
        if missing:
            raise CgroupError(
                f"no cgroup v2 hierarchy at {root} and no cgroup v1 "
                f"{', '.join(missing)} controller(s) mounted"
            )
        return _V1(mounts, parent, cgroup2_mount())
    except PermissionError as exc:
        raise CgroupError(f"cannot manage cgroups ({exc}): run the agent as root") from exc
    except OSError as exc:
        raise CgroupError(f"cannot manage cgroups: {exc}") from exc


def _v1_mounts() -> dict[str, Path]:
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup":
            for option in fields[3].split(","):
                if option in (*_V1_CONTROLLERS, HUGETLB):
                    mounts.setdefault(option, Path(fields[1]))
    return mounts


def remove_when_empty(directory: Path, deadline: float, what: str) -> None:
    """Delete a cgroup directory, trying again while the kernel says it still has members
    (EBUSY: a killed process stays one until it has exited) until `deadline` (monotonic); one
    still busy then, or refused otherwise, is left with a warning naming it as `what`."""
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove %s %s: %s", what, directory, exc)
                return
            time.sleep(0.01)


def _cgroup_roots() -> list[Path]:
    """Every cgroup hierarchy mounted here (v1 controllers, named ones, a hybrid's unified)."""
    roots = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
            roots.append(Path(fields[1]))
    return roots


def _enable_down(root: Path, parent: Path, controllers: list[str]) -> None:
    """Hand `controllers` down from `root` to the children of `parent`, level by level; none
    of these levels may hold a process itself (v2's rule), which is why a systemd unit gives
    the agent a subgroup of its own (DelegateSubgroup=) and tasks a sibling."""
    chain = [root]
    for part in parent.relative_to(root).parts:
        chain.append(chain[-1] / part)
    for directory in chain:
        enabled = set((directory / "cgroup.subtree_control").read_text().split())
        wanted = [f"+{c}" for c in controllers if c not in enabled]
        if wanted:
            (directory / "cgroup.subtree_control").write_text(" ".join(wanted))


def _own_v1_cgroups() -> dict[str, str]:
    """The agent's own cgroup in each v1 controller: tasks nest below it (and its limits)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            own[controller] = path
    return own


def node_pid_space(kernel: Path = Path("/proc/sys/kernel")) -> int | None:
    """How many processes and threads the node can hold at once (`kernel.pid_max`, or
    `kernel.threads-max` where lower); None where neither can be read."""
    found = []
    for name in ("pid_max", "threads-max"):
        with contextlib.suppress(OSError, ValueError):
            found.append(int((kernel / name).read_text()))
    return min(found) if found else None


def _lowest_pids_max(directory: Path, top: Path) -> int | None:
    """The lowest `pids.max` from `directory` up to `top` (the hierarchy's root, which has
    none); None where every level says "max"."""
    lowest: int | None = None
    while True:
        with contextlib.suppress(OSError, ValueError):
            value = int((directory / "pids.max").read_text())
            lowest = value if lowest is None else min(lowest, value)
        if directory == top or directory.parent == directory:
            return lowest
        directory = directory.parent


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _counter(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (FileNotFoundError, ValueError):
        pass
    return 0


def _private(directory: Path, gid: int | None) -> None:
    """A task's cgroup directory, entered by root and the task's gid alone. Every cgroup file
    is readable by any uid: another org's task read a task's members (the pids hidepid hides),
    memory, CPU time, I/O and pressure there while it ran. The task still reads its own (Go,
    the JVM and others size themselves from the limits there): its gid is the group."""
    if gid is None:
        return
    os.chown(directory, -1, gid)
    directory.chmod(0o750)


def _unlisted(parent: Path, root: Path) -> None:
    """The task cgroups' parent: passed through, never listed (which tasks the node runs is
    nobody's business but the agent's). Never a hierarchy's root, which the host owns."""
    if parent != root:
        parent.chmod(0o711)


def _levels_to_seal(parent: Path, root: Path, own: Path | None) -> list[Path]:
    """The task cgroups' parent and the levels above it that hold nothing but the agent and its
    tasks: up to where the agent's own cgroup (`own`, below `root`) branches off (a systemd
    unit's, whose `agent` subgroup sits beside `tasks`), else up to `root`, which is the
    host's as is every level above that branch."""
    levels: list[Path] = []
    level = parent
    while level != root and level.is_relative_to(root):
        levels.append(level)
        if own is not None and own.is_relative_to(level):
            break
        level = level.parent
    return levels


def _own_v2_cgroup(root: Path) -> Path | None:
    """The agent's own cgroup in the v2 hierarchy mounted at `root`, where /proc says one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].strip().lstrip("/")
    return None


def _seal(levels: list[Path]) -> None:
    """The interface files of the levels above tasks read by root alone. Each sums the tasks
    below it (memory.current, memory.stat, cpu.stat, io.stat, pids.current, the *.pressure
    files; on v1 memory.usage_in_bytes, cpuacct.usage, blkio.*, ...) and cgroupfs makes them
    readable by any uid: on a node with two tasks, a rival's figure was the parent's minus
    one's own. The agent reads and writes there as root; a task reads its own directory."""
    for level in levels:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(level):
                if not entry.is_file(follow_symlinks=False):
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode & 0o777
                if mode & 0o077:
                    with contextlib.suppress(FileNotFoundError):
                        os.chmod(entry.path, mode & 0o700)


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        with contextlib.suppress(OSError):  # e.g. swap accounting off: the limit still holds
            path.write_text(value)
