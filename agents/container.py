"""Container launch: the command line for docker, podman or apptainer, GPUs passed their way.

docker and podman expose only the task's GPUs inside the container (renumbered from 0), so the
host's CUDA_VISIBLE_DEVICES is not passed in; apptainer's `--nv` exposes every GPU, so there it
is. Environment values are passed by name (`-e NAME`) so they never appear in `ps` output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Runtime = Literal["docker", "podman", "apptainer"]
RUNTIMES: tuple[Runtime, ...] = ("docker", "podman", "apptainer")


@dataclass(frozen=True, slots=True)
class ContainerLaunch:
    argv: list[str]
    name: str | None
    """Container name for `kill_argv`; None where the runtime has no daemon-side container."""
    kill_argv: list[str] | None
    """Run after SIGKILL: killing the docker client does not kill the container it started."""


def container_launch(
    *,
    runtime: Runtime,
    binary: str | None,
    task_id: int,
    image: str,
    command: Sequence[str],
    gpus: Sequence[int],
    gpu_uuids: Sequence[str],
    env: Mapping[str, str],
    workdir: str | None,
) -> ContainerLaunch:
    exe = binary or runtime
    if runtime == "apptainer":
        argv = [exe, "exec", "--nv"]
        if workdir:
            argv += ["--bind", workdir, "--pwd", workdir]
        return ContainerLaunch([*argv, image, *command], None, None)
    name = f"fairgpu-task-{task_id}"
    devices = list(gpu_uuids) if gpu_uuids else [str(g) for g in gpus]
    argv = [exe, "run", "--rm", "--name", name, "--network=host", "--ipc=host", "--init"]
    if runtime == "docker":
        argv += ["--gpus", f'"device={",".join(devices)}"'] if devices else []
    else:  # podman: the Container Device Interface names
        for device in devices:
            argv += ["--device", f"nvidia.com/gpu={device}"]
    for key in sorted(env):
        if key != "CUDA_VISIBLE_DEVICES":
            argv += ["-e", key]
    if workdir:
        argv += ["-v", f"{workdir}:{workdir}", "-w", workdir]
    return ContainerLaunch([*argv, image, *command], name, [exe, "kill", name])
