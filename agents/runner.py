"""Runs tasks as process groups, enforces time limits and stops, and finds them after a restart.

Each task runs under a wrapper that leads its own session and records the command's exit status,
with a log copier beside it (agents/wrapper.py): neither the log nor the task dies with the agent,
and an agent that did not start a task still learns how it ended.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agents import disk, idle, wrapper
from agents.container import (
    DEFAULT_HELPER,
    Runtime,
    RuntimeCheck,
    pod_name,
    remove_pod,
    sweep,
)
from agents.containerenv import ContainerEnv, default_root
from agents.containertask import (
    cgroup_parent,
    container_start,
    placement,
    remove_conmon_cgroups,
    task_pod,
)
from agents.disk import DiskConfig
from agents.gpu.simulated import task_utilization
from agents.isolation import Confinement, IsolationConfig, TaskRefused
from agents.ports import TaskProcesses, process_tree
from agents.procs import alive, create_time, descendants
from agents.state import StateDir, TaskRecord, agent_tag, utcnow
from agents.taskenv import launch_environment, task_environment
from agents.tasksignal import container_kill, send_warning, signal_group, warning_signal
from protocol.agent import TaskSpec
from protocol.states import TERMINAL_TASK_STATES, TaskState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    cuda_by_uuid: bool = False
    """CUDA_VISIBLE_DEVICES as GPU uuids (stable under renumbering) instead of indices."""
    container_runtime: Runtime | None = None
    container_binary: str | None = None
    container_pause_image: str | None = None
    """The image of a docker task's pod, whose network namespace a private task's container
    joins (agents/container.py); None: docker runs no private task."""
    container_env_dir: Path | None = None
    """Where a docker or podman task's own variables are kept (a memory filesystem); None:
    /run/fairgpu/<tag>, or /dev/shm/fairgpu-<tag> where /run is on disk."""
    exec_helper: Path | None = None
    """The entrypoint of docker's and podman's containers (agents/helper/fairgpu-exec.c); None:
    the one `make helper` builds in the package (container.DEFAULT_HELPER)."""
    container_check_interval_s: float = 60.0
    """How often the agent asks its container runtime whether it answers (agents/container.py
    `RuntimeCheck`)."""
    time_limit_grace_s: float = 30.0
    log_max_bytes: int = 64 * 1024 * 1024
    """The most of a task's log kept on the node's disk (its latest output)."""
    log_max_rate_bytes_per_s: int = 64 * 1024 * 1024
    """Output beyond this (after a burst of a few seconds' worth) makes the task's writes wait:
    it bounds what a task flooding its log costs the node. 0: no limit."""
    output_drain_s: float = 5.0
    """How long after the wrapper exits the copier may take to write the rest of the output."""
    pty_attach_wait_s: float = 60.0
    """An interactive task's command waits this long for its first attach (`run --pty` attaches
    as soon as the job starts), then starts unattended, its output still in the log."""
    disk: DiskConfig = field(default_factory=DiskConfig)
    """What each task may hold of the node's local disk, and the reserve kept free."""


class Runner:
    """The tasks of this node. Not thread-safe: the daemon calls it from one place."""

    def __init__(
        self,
        state: StateDir,
        config: RunnerConfig | None = None,
        confinement: Confinement | None = None,
    ) -> None:
        self.state = state
        self.config = config or RunnerConfig()
        self.confinement = confinement or Confinement(
            IsolationConfig(task_root=state.root.with_name(f"{state.root.name}-tasks"))
        )
        self.tag = agent_tag(state.root)
        """Names this agent's containers (agents/container.py) on a daemon others may share."""
        self.records: dict[int, TaskRecord] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._draining_since: dict[int, float] = {}
        self.exec_helper = self.config.exec_helper or DEFAULT_HELPER
        self.containers = RuntimeCheck(
            self.config.container_runtime, self.config.container_binary, self.exec_helper
        )
        """Whether the container runtime answers (Agent.capabilities says "container")."""
        self.container_env = ContainerEnv(self.config.container_env_dir or default_root(self.tag))
        """The job's variables of its docker or podman task, in memory (agents/containerenv.py)."""

    # lifecycle -------------------------------------------------------------------------------
    def recover(self) -> None:
        """Load the state directory: adopt tasks still running, settle the ones that ended."""
        for record in self.state.load_all():
            self.records[record.task_id] = record
            if record.state in TERMINAL_TASK_STATES:
                continue
            if record.pid is None:
                self._end(record, "lost", reason="agent stopped while starting the task")
            elif alive(record.pid, record.pid_create_time):
                log.info("task %d: found running as pid %d", record.task_id, record.pid)
            elif not self._output_pending(record):
                self._settle_exit(record, wrapper_returncode=None)
            # else: the wrapper has exited and the copier is still writing; poll settles it.
        # Network namespaces whose task ended while the agent was away (or that a crash left
        # half made) go with their pasta; a running task keeps its own.
        running = {r.task_id for r in self.records.values() if r.state not in TERMINAL_TASK_STATES}
        self.confinement.sweep_namespaces(running)
        self.container_env.sweep(running)
        # So do this agent's containers and pods (docker's and podman's outlive their client).
        if self._container_cli is not None:
            for name in sweep(self._container_cli, self.tag, running):
                log.info("removed container %s: its task is not running", name)
        if self.containers.works:  # asked at start, not at the first heartbeat
            driver, cgroups = self.containers.cgroup_driver, self.confinement.cgroups
            line, whole = placement(self.config.container_runtime, driver, cgroups)
            log.log(logging.INFO if whole else logging.WARNING, "%s", line)

    def start(self, spec: TaskSpec) -> bool:
        """Start a task unless this node already knows it (a task never starts twice)."""
        if spec.task_id in self.records:
            return False
        record = TaskRecord(spec=spec)
        self.records[spec.task_id] = record
        self.state.save(record)  # before the process exists: see agents.state
        try:
            self._spawn(record)
        except TaskRefused as exc:
            self._end(record, "failed_to_start", reason=str(exc))
        except OSError as exc:
            self._end(record, "failed_to_start", reason=f"{type(exc).__name__}: {exc}")
        return True

    def stop(self, task_id: int, *, grace_s: float, reason: str, warn: bool = False) -> bool:
        """SIGTERM now (with `warn`, the task's warning signal if it has one), SIGKILL after
        `grace_s`. False when there was nothing (new) to stop."""
        record = self.records.get(task_id)
        if record is None or record.state in TERMINAL_TASK_STATES or record.stop_reason:
            return False
        warning = warning_signal(record) if warn else None
        self._terminate(record, grace_s=grace_s, reason=reason or "stop requested", sig=warning)
        return True

    def poll(self, now: dt.datetime | None = None) -> bool:
        """Notice exits, enforce time limits and kill deadlines. True when a state changed."""
        now = now or utcnow()
        changed = False
        for record in list(self.records.values()):
            if record.state in TERMINAL_TASK_STATES:
                continue
            child = self._children.get(record.task_id)
            if child is not None:
                returncode = child.poll()
                exited = returncode is not None
            else:
                returncode, exited = None, not alive(record.pid, record.pid_create_time)
            if exited:
                # What the task left running ends with it (under isolation: its whole cgroup).
                self.confinement.kill(record.task_id)
                if not self._output_pending(record):
                    self._settle_exit(record, wrapper_returncode=returncode)
                    changed = True
                continue
            if record.kill_at is not None and now >= record.kill_at and not record.killed:
                self._kill(record)
            elif record.stop_reason is None and record.started_at is not None:
                elapsed_s = (now - record.started_at).total_seconds()
                if elapsed_s >= record.spec.time_limit_s:
                    self._terminate(
                        record, grace_s=self.config.time_limit_grace_s, reason="time limit"
                    )
                elif (
                    record.spec.signal is not None
                    and not record.warned
                    and elapsed_s >= record.spec.time_limit_s - record.spec.signal.lead_s
                ):
                    self._warn(record)
        return changed

    def disk_targets(self) -> list[disk.Target]:
        """The running tasks whose disk use counts: not those already being ended."""
        targets = []
        for record in self.running():
            if record.stop_reason is not None:
                continue
            group = self.confinement.cgroup(record.task_id)
            if group is not None:
                pids = tuple(group.pids()) if group.exists() else ()
            else:
                pids = tuple(descendants(record.pid, record.pid_create_time))
            directory = self.confinement.task_dir(record.task_id)
            cli = self._container_cli
            container = (cli, record.container_name) if cli and record.container_name else None
            targets.append(disk.Target(record.task_id, directory, pids, container))
        return targets

    def enforce_disk(self, usage: Mapping[int, disk.Usage], space: disk.Space | None) -> bool:
        """End every task over its disk limits at once (no grace: the disk fills meanwhile);
        with none over but the node under its reserve, the task holding the most. True when a
        task was ended."""
        ended = disk.over_limit(usage, self.config.disk)
        if not ended:
            pressure = disk.largest_under_pressure(usage, space, self.config.disk)
            if pressure is not None:
                ended[pressure[0]] = pressure[1]
        changed = False
        for task_id, reason in ended.items():
            record = self.records.get(task_id)
            if record is None or record.state not in ("starting", "running"):
                continue
            if record.stop_reason is not None:
                continue
            log.warning("task %d: %s", task_id, reason)
            self._terminate(record, grace_s=0.0, reason=reason)
            changed = True
        return changed

    def check_disk(self) -> bool:
        """Measure and enforce in one go (the daemon measures in a thread instead)."""
        usage = disk.measure_all(self.disk_targets(), max_files=self.config.disk.task_max_files)
        return self.enforce_disk(usage, disk.space(self.disk_root))

    @property
    def disk_root(self) -> Path:
        """Where the tasks' directories are: the filesystem whose free space is watched."""
        root = self.confinement.config.task_root
        return root if root is not None and root.exists() else self.state.root

    def acknowledge(self, task_ids: set[int]) -> None:
        """The server has the final reports of these tasks; keep only what prevents a restart."""
        for task_id in task_ids:
            record = self.records.get(task_id)
            if record is not None and record.state in TERMINAL_TASK_STATES:
                record.final_acked = True
                self.state.save(record)

    def prune(self, *, older_than_s: float, now: dt.datetime | None = None) -> None:
        """Forget tasks the server has fully (final report and log) after a while."""
        cutoff = (now or utcnow()) - dt.timedelta(seconds=older_than_s)
        for task_id, r in list(self.records.items()):
            if r.final_acked and r.log_complete and r.ended_at is not None and r.ended_at < cutoff:
                self.state.remove(task_id)
                del self.records[task_id]

    @property
    def containers_join_netns(self) -> bool:
        """This node's containers can run in a private task's network namespace: podman and
        apptainer join it by path, docker through the task's pod (which needs its image)."""
        runtime = self.config.container_runtime
        if runtime == "docker":
            return self.config.container_pause_image is not None
        return runtime is not None

    @property
    def _container_cli(self) -> str | None:
        """docker's or podman's client, which runs and signals this node's containers; None
        where no container runs through one (apptainer's are the task's own processes)."""
        runtime = self.config.container_runtime
        if runtime not in ("docker", "podman"):
            return None
        return self.config.container_binary or runtime

    # queries ---------------------------------------------------------------------------------
    def unacknowledged(self) -> list[TaskRecord]:
        return [r for r in self.records.values() if not r.final_acked]

    def busy_gpus(self) -> dict[int, list[int]]:
        busy: dict[int, list[int]] = {}
        for r in self.records.values():
            if r.state in ("starting", "running") and r.pid is not None:
                for gpu in r.spec.gpus:
                    busy.setdefault(gpu, []).append(r.pid)
        return busy

    def driven_utilization(self) -> dict[int, float]:
        """GPU index -> the utilisation its task says it has, for the simulated backend: the
        ratio in the simulated utilisation file of the task's home, for that task's GPUs only (a
        task drives no other task's figures). A terminal that says nothing is idle (a shell
        computes nothing); a batch task that says nothing is busy, as simulated GPUs are."""
        driven: dict[int, float] = {}
        for record in self.running():
            ratio = task_utilization(self.confinement.task_dir(record.task_id))
            if ratio is None and not record.spec.pty:
                continue
            for gpu in record.spec.gpus:
                driven[gpu] = ratio or 0.0
        return driven

    def terminal(self, task_id: int) -> Path | None:
        """The directory of the running task's terminal socket (ptyhost.SOCKET_NAME), if it
        has a terminal."""
        record = self.records.get(task_id)
        if record is None or record.state != "running" or not record.spec.pty:
            return None
        return self.state.task_dir(task_id)

    def running(self) -> list[TaskRecord]:
        return [r for r in self.records.values() if r.state in ("starting", "running")]

    def processes(self, task_id: int) -> TaskProcesses | None:
        """How to find a running task's processes when a port is forwarded to it: its cgroup
        under strict isolation, else the wrapper's session (agents/ports.py)."""
        record = self.records.get(task_id)
        if record is None or record.state != "running" or record.pid is None:
            return None
        group = self.confinement.cgroup(task_id)
        leader = record.pid

        def pids() -> set[int]:
            if group is not None and group.exists():
                return set(group.pids())
            return process_tree(leader)

        netns = self.confinement.netns(task_id)
        return TaskProcesses(job_id=record.spec.job_id, pids=pids, netns=netns)

    # internals -------------------------------------------------------------------------------
    def _spawn(self, record: TaskRecord) -> None:
        spec, cfg = record.spec, self.config
        if spec.image and spec.image.startswith("-"):  # docker would read it as an option
            raise TaskRefused(f"the image {spec.image[:64]!r} starts with '-'")
        if spec.image and not cfg.container_runtime:
            raise TaskRefused(
                "the job asks for a container image but this node has no container runtime"
            )
        error_path = self.state.sandbox_error_path(spec.task_id)
        pod = task_pod(
            spec, cfg.container_runtime, cfg.container_binary, cfg.container_pause_image, self.tag
        )
        prepared = self.confinement.prepare(spec, error_path, adopt=pod)
        record.seccomp = prepared.seccomp or ""  # saved with the pid: a restart keeps it
        job_env = task_environment(spec, cuda_by_uuid=cfg.cuda_by_uuid, home=prepared.home)
        # Root's processes before the command never hold the job's variables (taskenv): the
        # sandbox hands them over as the task's uid, a container's client reads them in a file.
        carried = bool(prepared.prefix)
        argv = [*prepared.prefix, *spec.command]
        env_fd: int | None = None
        if spec.image and cfg.container_runtime:
            started = container_start(
                runtime=cfg.container_runtime,
                binary=cfg.container_binary,
                tag=self.tag,
                spec=spec,
                prepared=prepared,
                job_env=job_env,
                limits=self.confinement.limits(spec) if prepared.uid is not None else None,
                pod=pod_name(self.tag, spec.task_id) if pod is not None else None,
                env_files=self.container_env,
                helper=self.exec_helper,
                cgroup_parent=cgroup_parent(
                    cfg.container_runtime,
                    self.containers.cgroup_driver if self.containers.works else None,
                    self.confinement.cgroups if prepared.uid is not None else None,
                    spec.task_id,
                    prepared.uid,
                ),
            )
            argv, env_fd = started.argv, started.env_fd
            carried = (carried and started.name is None) or env_fd is not None
            record.container_name = started.name
        env = launch_environment(
            spec, cuda_by_uuid=cfg.cuda_by_uuid, home=prepared.home, carried=carried
        )
        # The task's own network namespace, entered first: everything of the task is inside
        # (a terminal's host, the sandbox, apptainer's client), the wrapper and copier not. A
        # docker or podman container is put in it by the runtime (its pod's, or by path), so
        # their client stays in the node's: inside, podman's runc took the namespace it was
        # itself in for the node's and refused the container (`sysctl ... not allowed in host
        # network namespace`), and `ip netns exec` hid the cgroups from podman, which then
        # dropped the container's pids limit.
        if record.container_name is None:
            argv = [*prepared.network, *argv]
        if spec.pty:
            argv = wrapper.on_terminal(
                self.state.task_dir(spec.task_id), cfg.pty_attach_wait_s, argv
            )
        child = wrapper.start(
            argv,
            task_dir=self.state.task_dir(spec.task_id),
            exit_path=self.state.exit_path(spec.task_id),
            lock_path=self.state.output_lock_path(spec.task_id),
            log_max_bytes=cfg.log_max_bytes,
            log_max_rate_bytes_per_s=cfg.log_max_rate_bytes_per_s,
            # Under isolation the sandbox enters the working directory as the task's uid.
            cwd=prepared.home if prepared.prefix else prepared.cwd,
            env=env,
            handed=(env_fd,) if env_fd is not None else (),
        )
        self._children[spec.task_id] = child
        record.pid = child.pid
        record.pid_create_time = create_time(child.pid)
        record.state = "running"
        record.started_at = utcnow()
        self.state.save(record)
        log.info("task %d: started pid %d", spec.task_id, child.pid)

    def _terminate(
        self,
        record: TaskRecord,
        *,
        grace_s: float,
        reason: str,
        sig: signal.Signals | None = None,
    ) -> None:
        """SIGTERM to the whole task, or `sig` as its warning signal says; SIGKILL later."""
        record.stop_reason = reason
        record.kill_at = utcnow() + dt.timedelta(seconds=grace_s)
        self.state.save(record)
        if sig is not None:
            send_warning(
                record, sig, confinement=self.confinement, container_cli=self._container_cli
            )
            return
        signalled = signal_group(record, signal.SIGTERM)
        # then the processes that left the wrapper's group (setsid, a daemonising child): once
        # each, never a second SIGTERM to a process whose handler may be running
        self.confinement.signal(
            record.task_id, signal.SIGTERM, signalled_group=record.pid if signalled else None
        )

    def _warn(self, record: TaskRecord) -> None:
        """The warning signal, once, its lead time before the time limit."""
        record.warned = True
        self.state.save(record)
        sig = warning_signal(record)
        if sig is not None:
            log.info("task %d: %s ahead of the time limit", record.task_id, sig.name)
            send_warning(
                record, sig, confinement=self.confinement, container_cli=self._container_cli
            )

    def _kill(self, record: TaskRecord) -> None:
        record.killed = True
        self.state.save(record)
        signal_group(record, signal.SIGKILL)
        self.confinement.kill(record.task_id)
        container_kill(record, signal.SIGKILL, self._container_cli)

    def _settle_exit(self, record: TaskRecord, *, wrapper_returncode: int | None) -> None:
        """Final state from the exit file, else from how the wrapper itself ended."""
        self._children.pop(record.task_id, None)
        self._draining_since.pop(record.task_id, None)
        refused = self._sandbox_error(record.task_id)
        if refused:
            self._end(record, "failed_to_start", reason=refused)
            return
        exit_code: int | None = None
        sig: int | None = None
        recorded = wrapper.exit_status(self.state.exit_path(record.task_id))
        if recorded is not None:
            exit_code, sig = recorded
        elif wrapper_returncode is not None and wrapper_returncode < 0:
            sig = -wrapper_returncode
        elif record.killed:
            sig = int(signal.SIGKILL)
        else:
            self._end(record, "lost", reason="the task ended while the agent was away")
            return
        state: TaskState
        if record.stop_reason == "time limit":
            state, reason = "timeout", f"time limit of {record.spec.time_limit_s:g} s reached"
        elif record.stop_reason == idle.STOP_REASON and record.spec.idle_timeout_s is not None:
            state, reason = "timeout", idle.ended_reason(record.spec.idle_timeout_s)
        elif self.confinement.oom_killed(record.task_id):
            state, reason = "exited", "out of memory"
        elif record.stop_reason is not None:
            state, reason = "stopped", record.stop_reason
        else:
            state, reason = "exited", ""
        if record.killed:
            reason = f"{reason}; killed after the grace period".lstrip("; ")
        record.exit_code, record.signal = exit_code, sig
        self._end(record, state, reason=reason)

    def _output_pending(self, record: TaskRecord) -> bool:
        """The wrapper has exited; True while its copier may still be writing the output."""
        if wrapper.lock_free(self.state.output_lock_path(record.task_id)):
            return False
        since = self._draining_since.setdefault(record.task_id, time.monotonic())
        if time.monotonic() - since < self.config.output_drain_s:
            return True
        log.warning(
            "task %d: ended, but processes it left behind still hold its output", record.task_id
        )
        return False

    def _sandbox_error(self, task_id: int) -> str:
        try:
            return self.state.sandbox_error_path(task_id).read_text().strip()[:1024]
        except FileNotFoundError:
            return ""

    def _end(self, record: TaskRecord, state: TaskState, *, reason: str) -> None:
        record.state = state
        record.reason = reason
        record.ended_at = utcnow()
        self.state.save(record)
        spec = record.spec
        cgroups = self.confinement.cgroups
        if spec.image and self.config.container_runtime == "podman" and cgroups is not None:
            # podman's conmon leaves a cgroup of its own below the task's (`--cgroup-parent`)
            remove_conmon_cgroups(cgroups.container_parent(record.task_id).path)
        self.confinement.finish(record.task_id)
        self.container_env.remove(record.task_id)
        if spec.image and spec.network == "private" and self.config.container_runtime == "docker":
            remove_pod(self.config.container_binary or "docker", self.tag, record.task_id)
        log.info("task %d: %s %s", record.task_id, state, reason)


def allocations(records: Mapping[int, TaskRecord]) -> list[tuple[int, int, str]]:
    """(gpu index, job id, org) for every running task: the allocation metric and dcgm files."""
    return [
        (gpu, r.spec.job_id, r.spec.org)
        for r in records.values()
        if r.state in ("starting", "running")
        for gpu in r.spec.gpus
    ]
