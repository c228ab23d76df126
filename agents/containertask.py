"""A container task's start: the runtime's command line and what its client is handed, from the
task's confinement (agents/container.py writes the line, agents/containerenv.py keeps the job's
variables off the node's disk)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agents import sandbox
from agents.cgroups import Hierarchy, Limits, _cgroup_roots, remove_when_empty
from agents.container import (
    ContainerError,
    Runtime,
    container_launch,
    env_file,
    helper_problem,
    start_task_pod,
)
from agents.containerenv import ContainerEnv, ContainerEnvError, private_variables
from agents.isolation import Prepared, TaskRefused
from protocol.agent import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ContainerStart:
    argv: list[str]
    """The command line, after the sandbox's prefix where the container runs inside it."""
    env_fd: int | None
    """The memory file of fairgpu's own variables handed to docker's or podman's client."""
    name: str | None
    """The runtime's container (docker, podman), None for apptainer's."""


def container_start(
    *,
    runtime: Runtime,
    binary: str | None,
    tag: str,
    spec: TaskSpec,
    prepared: Prepared,
    job_env: Mapping[str, str],
    limits: Limits | None,
    pod: str | None,
    env_files: ContainerEnv,
    helper: Path,
    cgroup_parent: str | None = None,
) -> ContainerStart:
    """TaskRefused (one line, the task's reason) when the job's variables cannot be handed
    over as the runtime needs them, or the node has no exec helper (docker, podman)."""
    assert spec.image is not None
    env_fd: int | None = None
    env_dir = None
    if runtime != "apptainer":  # its client runs as root: see container.env_file
        if (problem := helper_problem(helper)) is not None:
            raise TaskRefused(problem)
        private = private_variables(spec, job_env)
        try:
            env_dir = env_files.write(spec.task_id, private) if private else None
            env_fd = env_file({k: v for k, v in job_env.items() if k not in private})
        except (ContainerError, ContainerEnvError) as exc:
            raise TaskRefused(str(exc)) from None
    launch = container_launch(
        runtime=runtime,
        binary=binary,
        agent=tag,
        task_id=spec.task_id,
        image=spec.image,
        command=list(spec.command),
        gpus=spec.gpus,
        gpu_uuids=spec.gpu_uuids,
        env=job_env,
        workdir=str(prepared.cwd),
        env_file=f"/proc/self/fd/{env_fd}" if env_fd is not None else None,
        env_dir=env_dir,
        user=prepared.uid,
        mounts=prepared.container_mounts,
        limits=limits,
        netns=prepared.netns,
        pod=pod,
        tty=bool(spec.pty),
        helper=helper,
        # As the sandbox scopes its tasks: under strict isolation, where the kernel can.
        scope=prepared.uid is not None and sandbox.landlock_abi() >= sandbox.LANDLOCK_SCOPE_ABI,
        cgroup_parent=cgroup_parent,
    )
    # docker and podman confine the container themselves (their client needs root); apptainer
    # runs as the task's uid inside the sandbox.
    argv = [*prepared.prefix, *launch.argv] if launch.name is None else launch.argv
    return ContainerStart(argv, env_fd, launch.name)


def task_pod(
    spec: TaskSpec, runtime: Runtime | None, binary: str | None, pause_image: str | None, tag: str
) -> int | None:
    """The process of a private docker task's pod (agents/container.py), whose network
    namespace the task gets; None for any other task. TaskRefused when it cannot start."""
    if not (spec.image and spec.network == "private" and runtime == "docker"):
        return None
    try:
        return start_task_pod(binary or "docker", tag, spec.task_id, pause_image)
    except ContainerError as exc:
        raise TaskRefused(str(exc)) from exc


def cgroup_parent(
    runtime: Runtime | None,
    driver: str | None,
    cgroups: Hierarchy | None,
    task_id: int,
    gid: int | None,
) -> str | None:
    """docker's and podman's `--cgroup-parent` that puts the task's container below the task's
    cgroup, so that the task's limits (huge pages among them, which no flag of docker's or
    podman's bounds) hold it; None where the agent cannot place it there (`placement` says
    why). Made, private to the task's `gid`, wherever runc will make it."""
    placed = runtime in ("docker", "podman") and driver == "cgroupfs"
    if not placed or cgroups is None or gid is None:
        return None
    return cgroups.make_container_parent(task_id, gid).path


def remove_conmon_cgroups(path: str, timeout_s: float = 10.0) -> None:
    """What podman leaves below a `--cgroup-parent` of cgroupfs: its conmon's own cgroup
    (`<parent>/conmon`, in every hierarchy), which it never deletes; the task's cgroup, its
    parent, could not be deleted with it there. Waits for the conmon to end (it runs podman's
    cleanup of the container after the task's client has gone); one still busy at
    `timeout_s` is left, with a warning."""
    deadline = time.monotonic() + timeout_s
    for root in _cgroup_roots():
        remove_when_empty(root / path.lstrip("/") / "conmon", deadline, "podman's cgroup")


def placement(
    runtime: Runtime | None, driver: str | None, cgroups: Hierarchy | None
) -> tuple[str, bool]:
    """One line for the agent's log: what bounds a container task here, and where; and
    whether the task's cgroup bounds it whole."""
    if runtime == "apptainer":
        return "apptainer containers run in their task's sandbox and cgroup", True
    if runtime is None:
        return "no container runtime", True
    flags = f"{runtime}'s own --memory, --pids-limit and --cpu-shares on the container alone"
    if driver != "cgroupfs":
        what = "cgroup manager" if runtime == "podman" else "cgroup driver"
        line = (
            f"{runtime}'s {what} is {driver or 'unknown'}, not cgroupfs: its containers are "
            f"in cgroups of its own, bounded by {flags}; their huge pages are unbounded"
        )
        return line, False
    if cgroups is None:
        return (
            f"tasks have no cgroups here (isolation none): containers have {runtime}'s defaults",
            False,
        )
    parent = cgroups.container_parent(0)
    line = f"{runtime} containers run below their task's cgroup ({', '.join(parent.bounded)})"
    if parent.unbounded:
        line += (
            f"; {', '.join(parent.unbounded)}: the agent's own cgroup differs between cgroup "
            f"v1 controllers, so there {flags}"
        )
    return line, not parent.unbounded
