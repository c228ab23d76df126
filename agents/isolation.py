"""What confines a task on its node: its uid, its directories, its cgroup, its GPUs' device files,
its network namespace.

`Confinement` holds the agent's settings and prepares each task: `prepare(spec)` checks what the
job asks for against them (a refusal is one line, reported as the task's reason) and returns the
command prefix that confines it (agents.sandbox) with the directory it runs in; `finish(task_id)`
ends whatever the task left running and removes its cgroup and directory. docs/ISOLATION.md has
the threat model.

With `mode="none"` (asked for explicitly, e.g. a demo as an ordinary user) tasks still get a
directory and HOME of their own and the data-root check, but run as the agent's user, unconfined.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agents import sandbox, seccomp
from agents.cgroups import (
    HUGEPAGES,
    CgroupError,
    Hierarchy,
    Limits,
    TaskCgroup,
    huge_pools,
    node_pid_space,
    open_hierarchy,
)
from agents.dri import foreign_dri_nodes, foreign_driver_dirs
from agents.kernelcheck import kernel_exposures, unbounded_huge_pages
from agents.netns import Namespaces, NetnsError
from agents.netopen import open_namespaces
from agents.netwall import FLOWS_MAX, NODE_SERVICE_PORTS, UID_MAX
from agents.wallwatch import WallWatch
from protocol.agent import Isolation, TaskSpec

log = logging.getLogger(__name__)

_SANDBOX = str(Path(sandbox.__file__).resolve())
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "unchanged" to setresuid
TASKS_PID_SHARE = 0.75
"""Of the processes and threads the node can hold (its pid space, or the agent's cgroup
ceiling where lower), what its tasks may hold together: the rest stays for the agent and the
node's own services. Each task gets its GPUs' share of it (`Confinement.limits`)."""
AGENT_OOM_SCORE_ADJ = -900
"""The agent's own `oom_score_adj` under strict isolation: out of the node's memory, the
kernel's OOM killer ends tasks (sandbox.TASK_OOM_SCORE_ADJ) and the node's services before it.
Not -1000 (never): an agent that itself grew without bound must still be the one to go."""
MEMORY_RESERVE_MIN_BYTES = 4 * 2**30
MEMORY_RESERVE_SHARE = 0.05
CAP_SYS_RESOURCE = 24


class TaskRefused(Exception):
    """The task cannot run here as asked; the message is the one-line reason users see."""


class IsolationUnavailable(RuntimeError):
    """The agent cannot give the isolation it was asked for; the message says what to do."""


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    mode: Isolation = "none"
    task_root: Path | None = None
    """Parent of every task's own directory (its HOME, and its working directory unless the job
    names one). Default: `<state dir>-tasks` beside the state directory."""
    task_uid_base: int | None = None
    """Task uid (and gid) = this + the org's id, where `org_uids` has no entry for the org."""
    org_uids: Mapping[str, int] = field(default_factory=dict)
    org_roots: tuple[str, ...] = ()
    """Directories an org's jobs may work in, `{org}` standing for the org's name."""
    memory_per_gpu_bytes: int | None = None
    """A task's memory limit per GPU unless its job asks for its own. None: the tasks' memory
    (`node_memory_reserve_bytes`) divided by the node's GPUs; never more than that."""
    node_memory_reserve_bytes: int | None = None
    """The node's memory no task's limit counts on (the kernel, page cache, the agent, sshd,
    the container runtime): tasks share the rest. None: `default_memory_reserve`."""
    pids_max: int | None = 8192
    cgroup_parent: str = "fairgpu"
    dev_dir: Path = Path("/dev")
    gpu_minors: Mapping[int, int] = field(default_factory=dict)
    """GPU index → device minor number (/dev/nvidiaN); the index where absent."""
    sys_dir: Path = Path("/sys")
    nvidia_driver_dir: Path = Path("/proc/driver/nvidia")
    """Where the kernel tells which GPU each DRI node (`dev_dir/dri`) is (agents/dri.py)."""
    hide: tuple[Path, ...] = ()
    """Directories a task must not see at all (the agent's state directory)."""
    network_namespaces: bool = True
    """Give tasks that ask for it (`TaskSpec.network="private"`) a network namespace of their
    own, where the node can (agents/netns.py); False: never (the agent then does not say
    "netns", and the server places no such job here)."""
    task_flow_limit: int = FLOWS_MAX
    """The flows (TCP connections, UDP flows) a private task's pasta, or one task uid on the
    host network, may hold in the node's connection tracking table (agents/netwall.py)."""
    node_service_ports: tuple[int, ...] = NODE_SERVICE_PORTS
    """TCP ports of the node's own services that the wall closes to every task uid on the node's
    addresses (agents/netwall.py `NODE_SERVICE_PORTS`: DCGM's host engine, Fabric Manager)."""
    seccomp: bool = True
    """Confine strict tasks' system calls with agents/seccomp.py's filter (`--seccomp off`:
    every call their uid allows). docker and podman containers get their runtime's profile."""
    wall_check_interval_s: float = 5.0
    """How often the nftables wall of the private tasks' pastas is checked and put back if
    anything removed or changed it (agents/wallwatch.py), besides at once on every change
    `nft monitor` reports: the backstop should the monitor be down."""


@dataclass(frozen=True, slots=True)
class Prepared:
    prefix: list[str]
    """Put before the job's command; empty when the task runs unconfined."""
    cwd: Path
    home: Path
    container_mounts: tuple[Path, ...]
    """Directories a container of this task may mount: its own and its org's data roots."""
    uid: int | None
    network: list[str] = field(default_factory=list)
    """Put before everything else: enters the task's own network namespace (empty: the
    node's)."""
    netns: Path | None = None
    """The task's own network namespace, if it has one."""
    seccomp: str | None = None
    """The seccomp filter the sandbox installs (hex), None without one."""


class Confinement:
    def __init__(
        self,
        config: IsolationConfig,
        *,
        total_gpus: int = 1,
        namespaces: Namespaces | None = None,
        no_namespaces: str = "",
    ) -> None:
        self.config = config
        self.total_gpus = max(total_gpus, 1)
        self.cgroups: Hierarchy | None = None
        self.tasks_pids: int | None = None
        """What every task of the node may hold together of its processes and threads."""
        self.tasks_memory_bytes = 0
        """What every task of the node may hold together of its memory (strict isolation)."""
        self.hugepages = HUGEPAGES
        """The node's huge page pools, which tasks share by their GPUs."""
        self.namespaces = namespaces
        self.no_namespaces = no_namespaces or "network namespaces are off on this node"
        """Why tasks here cannot have a network namespace of their own (without `namespaces`)."""
        self.wall = WallWatch(namespaces) if namespaces is not None else None
        """The watch over the namespaces' wall (the agent runs it)."""
        self._seccomp: dict[bool, str] = {}
        """The tasks' seccomp filters, by whether they may make user namespaces."""
        if config.mode == "strict":
            if os.geteuid() != 0:
                raise IsolationUnavailable(
                    "strict isolation needs the agent to run as root (to give each task its "
                    "org's uid, a cgroup and a mount namespace); pass --isolation none to run "
                    "tasks unconfined as this user"
                )
            if config.task_uid_base is None and not config.org_uids:
                raise IsolationUnavailable(
                    "strict isolation needs task uids: pass --task-uid-base (uid = base + org "
                    "id) or --org-uid ORG=UID"
                )
            try:
                self.cgroups = open_hierarchy(config.cgroup_parent)
            except CgroupError as exc:
                raise IsolationUnavailable(str(exc)) from exc
            self.tasks_memory_bytes = tasks_memory(config.node_memory_reserve_bytes)
            shield_agent_from_oom()
            self.tasks_pids = tasks_pid_budget(self.cgroups)
            if self.tasks_pids is not None:
                log.info(
                    "tasks hold at most %d processes and threads together, %d per GPU",
                    self.tasks_pids,
                    self.tasks_pids // self.total_gpus,
                )
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # what tasks inherit
            tasks_pids = self.tasks_pids or node_pid_space()
            for line in kernel_exposures(tasks_pids=tasks_pids, nofile=nofile):
                log.warning("%s", line)
            huge = unbounded_huge_pages(
                huge_pools(self.hugepages), limited=self.cgroups.limits_hugetlb
            )
            if huge is not None:
                log.warning("%s", huge)
            if sandbox.landlock_abi() < sandbox.LANDLOCK_SCOPE_ABI:
                log.warning(
                    "this kernel has no Landlock scoping (Linux 6.12 or later): tasks of "
                    "different orgs can reach each other's abstract unix sockets"
                )
            self._seccomp = seccomp_programs(config.seccomp)

    def seccomp_program(self, spec: TaskSpec) -> str | None:
        """The task's seccomp filter as the sandbox takes it (hex), None without one. A task
        with an image runs it inside the sandbox only under apptainer, whose containers are
        user namespaces the task makes: it may, and mount in them."""
        return self._seccomp.get(spec.image is not None)

    @property
    def mode(self) -> Isolation:
        return self.config.mode

    # per task ---------------------------------------------------------------------------------
    def prepare(self, spec: TaskSpec, error_file: Path, *, adopt: int | None = None) -> Prepared:
        """Make the task's directory and cgroup; TaskRefused when the job cannot run here.
        `adopt`: the process whose network namespace a private task gets (a docker pod's)."""
        roots = self.org_roots(spec.org)
        cwd = self._workdir(spec, roots)
        uid = self.task_uid(spec) if self.cgroups is not None else None
        home = self.task_dir(spec.task_id)
        home.parent.mkdir(parents=True, exist_ok=True)
        # Tasks pass through to their own directory and list nothing.
        os.chmod(home.parent, 0o711)  # noqa: S103
        home.mkdir(mode=0o700, exist_ok=True)
        if uid is not None:
            os.chown(home, uid, uid)
        if cwd is None:
            cwd = home
        mounts = (home, *(root for root in roots if root.is_dir()))
        if self.cgroups is None or uid is None:
            network, netns = self._network(spec, None, adopt)
            return Prepared([], cwd, home, mounts, None, network, netns)
        limits = self.limits(spec)
        minors = [self.config.gpu_minors.get(i, i) for i in spec.gpus]
        group = self.cgroups.create(spec.task_id, limits, gid=uid)
        network, netns = self._network(spec, group, adopt)
        config = {
            "uid": uid,
            "gid": uid,
            "cwd": str(cwd),
            "cgroup_procs": [str(p) for p in group.procs_files],
            "dev_dir": str(self.config.dev_dir),
            "gpu_minors": minors,
            "cover": foreign_dri_nodes(
                self.config.dev_dir,
                minors,
                sys_dir=self.config.sys_dir,
                driver_dir=self.config.nvidia_driver_dir,
            ),
            "hide": [str(p) for p in self.config.hide]
            + foreign_driver_dirs(minors, driver_dir=self.config.nvidia_driver_dir),
            "keep": [str(p) for p in {home, cwd, self.config.dev_dir, *mounts}],
            "error_file": str(error_file),
            "tmpfs_bytes": limits.memory_bytes,
        }
        program = self.seccomp_program(spec)
        if program is not None:
            config["seccomp"] = program
        if netns is not None and self.namespaces is not None:
            # The sandbox joins it itself (`ip netns exec` would unmount the cgroups it joins).
            network = []
            config["netns"] = str(netns)
            config["resolv_conf"] = str(self.namespaces.resolv_conf(spec.task_id))
        prefix = [sys.executable, "-I", "-S", _SANDBOX, json.dumps(config, separators=(",", ":"))]
        return Prepared(prefix, cwd, home, mounts, uid, network, netns, program)

    def _network(
        self, spec: TaskSpec, group: TaskCgroup | None, adopt: int | None
    ) -> tuple[list[str], Path | None]:
        """The prefix entering the task's own network namespace, made now, and its path. Its
        pasta is charged to the task's cgroup where it has one, out of reach of its signals."""
        if spec.network != "private":
            return [], None
        if self.namespaces is None:
            raise TaskRefused(
                f"this node cannot give the task a network of its own ({self.no_namespaces}); "
                "submit with --network host to run in the node's network"
            )
        if self.wall is not None and not self.wall.intact:
            raise TaskRefused(
                "this node cannot give the task a network of its own now (its nftables wall "
                "was removed and cannot be made anew); submit again: it is placed on a node "
                "that can"
            )
        cgroup, charge_to = group.helper_placement() if group is not None else (None, [])
        try:
            prefix = self.namespaces.create(
                spec.task_id, cgroup=cgroup, charge_to=charge_to, adopt=adopt
            )
        except NetnsError as exc:
            raise TaskRefused(f"making the task's network namespace: {exc}") from exc
        return prefix, self.namespaces.path(spec.task_id)

    def netns(self, task_id: int) -> Path | None:
        """The task's own network namespace while it has one."""
        if self.namespaces is None or not self.namespaces.exists(task_id):
            return None
        return self.namespaces.path(task_id)

    def close_network(self) -> None:
        """The agent stops: its nftables wall goes unless a task's pasta still needs it."""
        if self.namespaces is not None:
            self.namespaces.close_if_idle()

    def sweep_namespaces(self, keep: set[int]) -> None:
        """Remove the network namespaces (and their pasta) of tasks not in `keep`: those an
        agent that stopped before their task ended left behind."""
        if self.namespaces is not None:
            self.namespaces.sweep(keep)

    @property
    def memory_per_gpu_bytes(self) -> int | None:
        """Each GPU's share of the tasks' memory: the tasks' memory ÷ the node's GPUs, at most
        `--mem-per-gpu`. A task gets its GPUs' share, and a job asking more is refused at
        start (`limits`), so the agent reports it and the server places `--mem` jobs only on
        nodes whose share holds them. None without a task cgroup (no strict isolation): no
        limit is set, and none refused."""
        if self.cgroups is None:
            return None
        per_gpu = self.tasks_memory_bytes // self.total_gpus
        if self.config.memory_per_gpu_bytes is not None:
            per_gpu = min(per_gpu, self.config.memory_per_gpu_bytes)
        return per_gpu

    def limits(self, spec: TaskSpec) -> Limits:
        """The task's cgroup limits; TaskRefused when its job asks for more memory than its
        GPUs' share of the tasks' memory (`--mem-per-gpu`, at most the node's memory less its
        reserve ÷ its GPUs). The other GPUs' shares are other tasks' memory (the server
        places by the share, `memory_per_gpu_bytes`; this is the check should a job reach the
        node anyway): a one-GPU job asking `--mem 64T` got a limit the node's memory never reached,
        filled it, and the kernel's OOM killer, out of the node's memory, ended the largest
        process on the node, another org's training or the agent. Shares of all the node's
        memory did the same once every task filled its own: the node itself needs some."""
        gpus = max(len(spec.gpus), 1)
        share = (self.memory_per_gpu_bytes or 0) * gpus
        memory = spec.memory_bytes
        if memory is None:
            memory = share
        elif memory > share:
            raise TaskRefused(
                f"the job asks for {_gib(memory)} of memory, more than its {gpus} GPU(s)' share "
                f"of this node's memory ({_gib(share)}); ask for less (--mem) or for more GPUs"
            )
        return Limits(
            memory_bytes=memory,
            pids_max=self._pids_max(gpus),
            cpu_weight=min(10_000, 100 * gpus),
            hugetlb_bytes=self._hugetlb_bytes(gpus),
        )

    def _hugetlb_bytes(self, gpus: int) -> dict[str, int]:
        """The task's GPUs' share of each of the node's huge page pools, in whole pages, read
        when it starts: the memory controller does not charge huge pages, and one task mapped
        a whole pool (agents/cgroups.py)."""
        taken = min(gpus, self.total_gpus)
        return {
            size: pool.pages * taken // self.total_gpus * pool.page_bytes
            for size, pool in huge_pools(self.hugepages).items()
        }

    def _pids_max(self, gpus: int) -> int | None:
        """`--task-pids-max`, but never more than the task's GPUs' share of what the node's
        tasks may hold together: with 8,192 each, four tasks filled a 32,768-pid node (or a
        systemd unit's TasksMax sooner), and then no process of the node, the agent's threads
        and other orgs' tasks included, could start another."""
        configured = self.config.pids_max
        if self.tasks_pids is None:
            return configured
        share = max(self.tasks_pids * min(gpus, self.total_gpus) // self.total_gpus, 1)
        return share if configured is None else min(configured, share)

    def task_uid(self, spec: TaskSpec) -> int:
        uid = self.config.org_uids.get(spec.org)
        if uid is None and self.config.task_uid_base is not None and spec.org_id is not None:
            uid = self.config.task_uid_base + spec.org_id
        if uid is None:
            raise TaskRefused(f"this node has no uid for org {spec.org or '?'}")
        if not 0 < uid <= _MAX_UID:
            raise TaskRefused(f"uid {uid} for org {spec.org} is out of range")
        return uid

    def org_roots(self, org: str) -> list[Path]:
        return [Path(template.replace("{org}", org)) for template in self.config.org_roots]

    def workdir(self, spec: TaskSpec) -> Path:
        """The directory the task runs in (it has been checked when the task started)."""
        return self._workdir(spec, self.org_roots(spec.org)) or self.task_dir(spec.task_id)

    def _workdir(self, spec: TaskSpec, roots: list[Path]) -> Path | None:
        if spec.workdir is None:
            return None
        if not roots and self.config.mode == "none":
            return Path(spec.workdir)  # a node with no data roots and no isolation: as asked
        # Symlinks resolved as the agent sees them: a link under a root pointing elsewhere is
        # outside it. (What the task then reaches is bounded by its own uid anyway.)
        resolved = Path(os.path.realpath(spec.workdir))
        for root in roots:
            real_root = Path(os.path.realpath(root))
            if resolved == real_root or real_root in resolved.parents:
                return resolved
        allowed = ", ".join(str(r) for r in roots) or "none configured on this node"
        raise TaskRefused(
            f"workdir {spec.workdir} is outside the data roots allowed to org {spec.org} "
            f"({allowed})"
        )

    def task_dir(self, task_id: int) -> Path:
        assert self.config.task_root is not None
        return self.config.task_root / str(task_id)

    def cgroup(self, task_id: int) -> TaskCgroup | None:
        return self.cgroups.task(task_id) if self.cgroups is not None else None

    def signal(
        self, task_id: int, sig: signal.Signals, *, signalled_group: int | None = None
    ) -> None:
        """Every process of the task, wherever it moved in the process tree, except those still
        in process group `signalled_group` (already signalled by the caller)."""
        group = self.cgroup(task_id)
        if group is not None:
            group.signal_all(sig, signalled_group=signalled_group)

    def kill(self, task_id: int) -> None:
        group = self.cgroup(task_id)
        if group is not None and group.exists() and not group.kill():
            log.warning("task %d: processes survived SIGKILL of its cgroup", task_id)

    def oom_killed(self, task_id: int) -> bool:
        group = self.cgroup(task_id)
        return group is not None and group.oom_killed()

    def finish(self, task_id: int) -> None:
        """End what the task left and remove its cgroup and directory."""
        if self.namespaces is not None:
            self.namespaces.remove(task_id)  # first: its pasta is in the task's cgroup
        group = self.cgroup(task_id)
        if group is not None and group.exists():
            group.remove()
        if self.config.task_root is not None:
            remove_tree(self.task_dir(task_id))


def default_memory_reserve(total_bytes: int) -> int:
    """What the node keeps for itself by default: MEMORY_RESERVE_SHARE of its memory, at
    least MEMORY_RESERVE_MIN_BYTES, at most half of it (a small test node). As Slurm's
    MemSpecLimit or the kubelet's system-reserved, but on by default: the page cache the jobs'
    own data loading lives on, the agent with its log copiers, sshd, dockerd and the NVIDIA
    daemons need a few GiB whatever the node's size, and 5 % covers the kernel's own tables,
    which grow with it."""
    reserve = max(MEMORY_RESERVE_MIN_BYTES, int(total_bytes * MEMORY_RESERVE_SHARE))
    return min(reserve, total_bytes // 2)


def seccomp_programs(on: bool) -> dict[bool, str]:
    """The filters of this machine's tasks (hex), by whether they may make user namespaces;
    none when `on` is False. IsolationUnavailable where the kernel or the machine has none."""
    machine = os.uname().machine
    if not on:
        log.warning("seccomp off: tasks run with every system call their uid allows")
        return {}
    try:
        with open("/proc/self/status") as f:
            filters = any(line.startswith("Seccomp:") for line in f)
        programs = {
            user_namespaces: seccomp.program(machine, user_namespaces=user_namespaces).hex()
            for user_namespaces in (False, True)
        }
    except seccomp.SeccompUnavailable as exc:
        raise IsolationUnavailable(str(exc)) from exc
    if not filters:
        raise IsolationUnavailable(
            "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER): pass --seccomp off "
            "to run tasks without one"
        )
    for program in programs.values():
        if refused := sandbox.filter_refusal(bytes.fromhex(program)):
            name = errno.errorcode.get(refused, str(refused))
            raise IsolationUnavailable(
                f"this kernel refuses the tasks' seccomp filter ({name}: {os.strerror(refused)}; "
                "its SPEC_ALLOW flag needs Linux 4.17 or later): pass --seccomp off to run "
                "tasks without one"
            )
    log.info("%s", seccomp.summary(machine))
    return programs


def tasks_memory(reserve_bytes: int | None) -> int:
    """The node's memory less its reserve: what its tasks' limits add up to at most."""
    total = psutil.virtual_memory().total
    reserve = default_memory_reserve(total) if reserve_bytes is None else reserve_bytes
    if reserve >= total:
        raise IsolationUnavailable(
            f"--node-memory-reserve-bytes {reserve} leaves no memory for tasks: this node has "
            f"{total} bytes"
        )
    log.info(
        "tasks hold at most %s of memory together, %s kept for the node",
        _gib(total - reserve),
        _gib(reserve),
    )
    return total - reserve


def shield_agent_from_oom() -> bool:
    """AGENT_OOM_SCORE_ADJ for the agent; False where it lacks CAP_SYS_RESOURCE. That
    capability is also what makes the tasks' own value a floor (sandbox.TASK_OOM_SCORE_ADJ):
    without it the agent keeps the value it was started with and a task may lower its own back
    to that (not below), so out of the node's memory the OOM killer weighs the two alike."""
    if not has_capability(CAP_SYS_RESOURCE):
        log.warning(
            "no CAP_SYS_RESOURCE: the agent keeps its oom_score_adj and a task may lower its "
            "own back to it, so the kernel's OOM killer may end the agent before a task; grant "
            "the agent CAP_SYS_RESOURCE (systemd: CapabilityBoundingSet)"
        )
        return False
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(AGENT_OOM_SCORE_ADJ))
    return True


def has_capability(number: int) -> bool:
    """This process holds capability `number` (linux/capability.h) in its effective set."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << number))
    return False


def _gib(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:.1f} GiB"


def tasks_pid_budget(cgroups: Hierarchy) -> int | None:
    """TASKS_PID_SHARE of the processes and threads the node can hold: the lower of its pid
    space and the pids.max above the task cgroups. None where neither is known."""
    limits = [n for n in (node_pid_space(), cgroups.pids_ceiling()) if n is not None]
    return int(min(limits) * TASKS_PID_SHARE) if limits else None


def remove_tree(path: Path) -> None:
    """Remove a directory a task filled, however deep it nests. shutil.rmtree recurses once per
    level: a task that left a few thousand nested directories had it raise RecursionError in
    the agent, which kept the directory (and the node's disk it held) for ever. GNU rm walks
    any depth, never follows a link and stays on the directory's filesystem."""
    if not path.exists():
        return
    done = subprocess.run(
        ["rm", "-rf", "--one-file-system", "--", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        log.warning("removing %s: %s", path, lines[-1] if lines else done.returncode)


def task_uid_ranges(config: IsolationConfig) -> list[tuple[int, int]]:
    """The uids tasks run as under strict isolation, as merged (first, last) ranges: the
    `task_uid_base` range and each org's own uid. None without strict isolation, where tasks
    run as the agent's own user."""
    if config.mode != "strict":
        return []
    ranges = sorted((uid, uid) for uid in config.org_uids.values())
    if config.task_uid_base is not None:
        base = config.task_uid_base
        ranges = sorted([*ranges, (base, min(base + 2**31 - 1, UID_MAX))])
    merged: list[tuple[int, int]] = []
    for first, last in ranges:
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def open_confinement(
    isolation: IsolationConfig,
    state_root: Path,
    *,
    gpu_minors: Mapping[int, int],
    total_gpus: int,
) -> Confinement:
    """The agent's confinement: its isolation settings completed from its GPUs and its state
    directory, with the node's network namespaces where it can build them (agents/netopen.py)."""
    namespaces, why_not = None, "turned off (--no-netns)"
    if isolation.network_namespaces:
        namespaces, why_not = open_namespaces(
            state_root,
            isolation.cgroup_parent,
            flows_max=isolation.task_flow_limit,
            task_uids=task_uid_ranges(isolation),
            service_ports=isolation.node_service_ports,
        )
        if namespaces is None:
            log.warning("tasks cannot have a network namespace of their own: %s", why_not)
    return Confinement(
        dataclasses.replace(
            isolation,
            task_root=isolation.task_root or state_root.with_name(f"{state_root.name}-tasks"),
            gpu_minors=isolation.gpu_minors or gpu_minors,
            hide=(*isolation.hide, state_root),
        ),
        total_gpus=total_gpus,
        namespaces=namespaces,
        no_namespaces=why_not,
    )
