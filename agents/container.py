"""Container launch: the command line for docker, podman or apptainer, GPUs passed their way.

docker and podman expose only the task's GPUs inside the container (renumbered from 0), so the
host's CUDA_VISIBLE_DEVICES is not passed in; apptainer's `--nv` exposes every GPU, so there it
is (and the agent's sandbox fences the device files around it). docker and podman read the job's
variables from `--env-file`, a memory file the agent hands their client (`env_file`): never on
the node's disk nor in `ps` output, and never in the environment of the client, which runs as
root.

On docker and podman the container's entrypoint is the agent's helper (agents/helper/
fairgpu-exec.c, bind-mounted read-only at `HELPER_MOUNT`): it loads the job's variables from
their memory file, scopes abstract unix sockets and signals under strict isolation, and execs
the image's ENTRYPOINT with the job's command (or the image's CMD), which agents/imagelaunch.py
reads from the image just before `run`. It needs nothing of the image: images without a shell
run. A node without the helper (`helper_problem`) runs no docker or podman task.

An interactive task's command runs on its terminal host's pty (agents/ptyhost.py): docker and
podman are asked for a terminal of their own inside the container (`--interactive --tty`), which
they join to that pty, so the program sees a terminal (window size, job control, Ctrl-C) and
reads its input; apptainer's `exec` runs the program on the pty itself.

Under strict isolation a container runs as the task's uid with no capabilities and no way to
gain privileges, with its own IPC namespace, the task's memory, pids and CPU limits, and only the
task's directory and its org's data roots mounted.

A private network (`TaskSpec.network="private"`): podman joins the task's namespace by path.
docker cannot, but it can join another container's: the pod model of Kubernetes. The agent
starts a pause container (`--container-pause-image`, e.g. registry.k8s.io/pause) with no network
of its own, makes its namespace the task's (agents/netns.py attaches pasta to it, walled), and
runs the task's container in it (`--network container:<pod>`); the pod goes with the task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agents import containerenv, imagelaunch
from agents.cgroups import Limits
from agents.netns import DNS_ADDRESS
from agents.sandbox import TASK_OOM_SCORE_ADJ

log = logging.getLogger(__name__)

AGENT_LABEL = "fairgpu.agent"
"""The label naming the agent (its tag) on each container and pod it starts."""
TASK_LABEL = "fairgpu.task"
Runtime = Literal["docker", "podman", "apptainer"]
RUNTIMES: tuple[Runtime, ...] = ("docker", "podman", "apptainer")
DEFAULT_HELPER = Path(__file__).resolve().parent / "helper" / "fairgpu-exec"
"""Where `make helper` builds the helper (the agent's `--exec-helper` names another)."""
HELPER_MOUNT = "/run/fairgpu/exec"
"""Where a container sees the helper: its entrypoint."""
_LAUNCHER = str(Path(imagelaunch.__file__).resolve())
NO_NVIDIA_DEVICES = "void"
"""NVIDIA_VISIBLE_DEVICES for a container the runtime's NVIDIA hook must give no GPU."""
NVIDIA_TOOLKIT_OFF = {
    "NVIDIA_IMEX_CHANNELS": "void",
    "NVIDIA_MOFED": "disabled",
    "NVIDIA_NVSWITCH": "disabled",
    "NVIDIA_GDS": "disabled",
    "NVIDIA_GDRCOPY": "disabled",
    "NVIDIA_MIG_CONFIG_DEVICES": "",
    "NVIDIA_MIG_MONITOR_DEVICES": "",
}
"""The NVIDIA container toolkit's variables that give a container devices beyond its GPUs,
set so that they give none whatever the image's ENV says (`-e` wins over it; the job's own
variables never reach the runtime: agents/containerenv.py). The hook and
nvidia-container-runtime read them from the container's environment: an IMEX channel id
(`/dev/nvidia-caps-imex-channels/channelN`, through which jobs on NVLink-connected nodes
import each other's GPU memory: the node's channels are the operator's to hand out, not an
image's to name), `enabled` for every InfiniBand/RoCE device of the node (`/dev/infiniband/*`),
the NVSwitches' devices (`/dev/nvidia-nvswitch*`, which Fabric Manager drives), GPUDirect
Storage's `/dev/nvidia-fs*` and gdrcopy's `/dev/gdrdrv`; no task gets any of these outside a
container either. The MIG config and monitor devices (the capabilities to repartition and
watch every MIG instance of a GPU) the hook gives only a container holding CAP_SYS_ADMIN,
which none holds here, and it refuses to start any other that names some: empty, they name
none, which the hook accepts."""


class ContainerError(RuntimeError):
    """A runtime command failed; the message is one line."""


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
    agent: str,
    task_id: int,
    image: str,
    command: Sequence[str],
    gpus: Sequence[int],
    gpu_uuids: Sequence[str],
    env: Mapping[str, str],
    workdir: str | None,
    env_file: str | None = None,
    env_dir: Path | None = None,
    user: int | None = None,
    mounts: Sequence[Path] = (),
    limits: Limits | None = None,
    netns: Path | None = None,
    pod: str | None = None,
    tty: bool = False,
    helper: Path = DEFAULT_HELPER,
    scope: bool = False,
    cgroup_parent: str | None = None,
) -> ContainerLaunch:
    """docker's and podman's line is agents/imagelaunch.py's, which finds the image's ENTRYPOINT
    and CMD and then runs `run`. `scope`: the helper scopes abstract unix sockets and signals
    (strict isolation, on a kernel that can). `cgroup_parent`: docker's, below the task's
    cgroup (agents/containertask.py)."""
    exe = binary or runtime
    binds = [str(m) for m in mounts]
    if workdir and not any(_under(workdir, m) for m in binds):
        binds.append(workdir)
    if runtime == "apptainer":
        # `run` starts the image's runscript (a docker image's ENTRYPOINT and CMD) where the job
        # gives no command; `exec` runs the job's.
        argv = [exe, "exec" if command else "run", "--nv"]
        if user is not None:
            argv += ["--contain", "--home", env.get("HOME", binds[0] if binds else "/tmp")]  # noqa: S108
        for bind in binds:
            argv += ["--bind", bind]
        if workdir:
            argv += ["--pwd", workdir]
        return ContainerLaunch([*argv, image, *command], None, None)
    name = container_name(agent, task_id)
    devices = list(gpu_uuids) if gpu_uuids else [str(g) for g in gpus]
    # The task's own network namespace (podman joins one by path, docker its pod's), else the
    # node's.
    if pod is not None:
        network = f"--network=container:{pod}"
    else:
        network = f"--network=ns:{netns}" if netns is not None else "--network=host"
    argv = [exe, "run", "--rm", "--name", name, *_labels(agent, task_id), network]
    argv += ["--ipc=private", "--init"]
    # As the sandbox's tasks, first for the kernel's OOM killer: the container's processes are
    # the runtime's children, and would otherwise have its daemon's choice.
    argv.append(f"--oom-score-adj={TASK_OOM_SCORE_ADJ}")
    # The output reaches the task's log through the attached client; a copy in the runtime's own
    # log files (json-file keeps everything, unbounded, by default) would fill the node's disk.
    argv.append("--log-driver=none")
    if tty:
        argv += ["--interactive", "--tty"]
    if user is not None:
        argv += [
            "--user", f"{user}:{user}", "--cap-drop=ALL", "--security-opt=no-new-privileges",
        ]  # fmt: skip
    if limits is not None:
        if limits.memory_bytes is not None:
            memory = limits.memory_bytes
            # No swap beyond the limit; /dev/shm (charged to the same memory) up to half of it.
            argv += [f"--memory={memory}", f"--memory-swap={memory}", f"--shm-size={memory // 2}"]
        if limits.pids_max is not None:
            argv.append(f"--pids-limit={limits.pids_max}")
        argv.append(f"--cpu-shares={max(2, limits.cpu_weight * 1024 // 100)}")
    if cgroup_parent is not None:
        argv.append(f"--cgroup-parent={cgroup_parent}")
    if runtime == "podman":
        argv += podman_ulimits()
    if runtime == "docker":
        argv += ["--gpus", f'"device={",".join(devices)}"'] if devices else []
    else:  # podman: the Container Device Interface names
        for device in devices:
            argv += ["--device", f"nvidia.com/gpu={device}"]
    if runtime == "podman" or not devices:
        # NVIDIA's runtime hook takes the GPUs to mount from the container's environment, the
        # image's own included: CUDA's images say NVIDIA_VISIBLE_DEVICES=all, so where the hook
        # runs for every container (docker's default runtime `nvidia`, podman's legacy hook) a
        # container given no GPUs (or its GPUs through CDI) got every GPU of the node, other
        # orgs' among them. `void`: none, nor the driver. docker's `--gpus` sets its own last.
        argv += ["-e", f"NVIDIA_VISIBLE_DEVICES={NO_NVIDIA_DEVICES}"]
    for variable, value in NVIDIA_TOOLKIT_OFF.items():
        argv += ["-e", f"{variable}={value}"]
    if env_file is not None:
        argv += ["--env-file", env_file]
    for bind in binds:
        argv += ["-v", f"{bind}:{bind}"]
    argv += ["-v", f"{helper}:{HELPER_MOUNT}:ro"]
    helper_args = ["-s"] if scope else []
    if env_dir is not None:  # the job's own variables, off the runtime's disk (containerenv)
        argv += ["-v", f"{env_dir}:{containerenv.MOUNT}:ro"]
        helper_args += ["-e", containerenv.FILE]
    if workdir:
        argv += ["-w", workdir]
    config = {
        "run": argv,
        "image": image,
        "qualify": runtime == "podman",  # docker's name, not podman's search (imagelaunch)
        "helper": HELPER_MOUNT,
        "helper_args": helper_args,
        "command": list(command),
    }
    launcher = [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(config, separators=(",", ":"))]
    return ContainerLaunch(launcher, name, [exe, "kill", name])


def podman_ulimits() -> list[str]:
    """podman, as root, gives every container RLIMIT_NOFILE 1048576 and RLIMIT_NPROC 4194304
    whatever the node's, which the runtime can set only holding CAP_SYS_RESOURCE: where the agent
    lacks it (an agent in a pod, a root shell without it, as on the test machine) no container
    started at all (`error setting rlimit ...: operation not permitted`). The container gets the
    agent's own limits, which its sandboxed tasks inherit; processes no more than the kernel's
    `pid_max`, which no uid passes anyway and to which podman lowers its own limit."""
    files = ":".join(map(str, resource.getrlimit(resource.RLIMIT_NOFILE)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    with contextlib.suppress(OSError, ValueError):
        most = int(Path("/proc/sys/kernel/pid_max").read_text())
        soft, hard = (most if v == resource.RLIM_INFINITY else min(v, most) for v in (soft, hard))
    return [f"--ulimit=nofile={files}", f"--ulimit=nproc={soft}:{hard}"]


def helper_problem(helper: Path) -> str | None:
    """Why `helper` cannot be every container's entrypoint (one line), None when it can. It
    runs in every tenant's container: it must be a regular file that only root (or the agent's
    own user) can change, in a directory no one else can change either."""
    try:
        info, parent = helper.stat(), helper.parent.stat()
    except OSError:
        return (
            f"no exec helper at {helper} (build it with `make helper`, or pass --exec-helper): "
            "docker and podman containers start through it"
        )
    owners = {0, os.geteuid()}
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & stat.S_IXOTH:
        return f"the exec helper {helper} is not a file every user may run"
    for path, what in ((helper, info), (helper.parent, parent)):
        if what.st_uid not in owners or what.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} is not root's, or others may change it: it cannot hold the exec helper"
    return None


def env_file(env: Mapping[str, str]) -> int:
    """A memory file (never on the node's disk) holding `env` as docker's and podman's
    `--env-file` reads it, NAME=value a line (the GPUs are the runtime's to give). The client
    runs as root, so the job's variables reach it in this file rather than in its own
    environment, where PATH, LD_PRELOAD, HOME or DOCKER_HOST would choose what it runs, loads
    and talks to. ContainerError for a value such a file cannot hold."""
    lines = []
    for name in sorted(env):
        if name == "CUDA_VISIBLE_DEVICES":
            continue
        value = env[name]
        if "\n" in value or "\r" in value:
            raise ContainerError(
                f"the variable {name} holds a line break, which a container's environment "
                "file cannot carry"
            )
        lines.append(f"{name}={value}\n")
    fd = os.memfd_create("fairgpu-task-env")
    os.write(fd, "".join(lines).encode())
    return fd


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def container_name(agent: str, task_id: int) -> str:
    """The task's container: docker's names are global to the daemon, which several agents
    may share, so the agent's tag (agents.state.agent_tag) is in it."""
    return f"fairgpu-{agent}-task-{task_id}"


def pod_name(agent: str, task_id: int) -> str:
    return f"fairgpu-{agent}-pod-{task_id}"


def _labels(agent: str, task_id: int) -> list[str]:
    return ["--label", f"{AGENT_LABEL}={agent}", "--label", f"{TASK_LABEL}={task_id}"]


def sweep(binary: str, agent: str, keep: set[int]) -> list[str]:
    """Remove this agent's containers and pods (its label, and a name of its own) whose task is
    not in `keep`: what a task that ended while the agent was away, or a crash between two
    steps, left behind. Never another agent's: both the label and the name must be this one's.
    The names removed."""
    try:
        listed = _docker(
            binary, "ps", "--all", "--filter", f"label={AGENT_LABEL}={agent}",
            "--format", "{{.Names}}",
        )  # fmt: skip
    except ContainerError as exc:
        log.warning("listing this agent's containers: %s", exc)
        return []
    ours = re.compile(rf"^fairgpu-{re.escape(agent)}-(?:task|pod)-(\d+)$")
    removed = []
    for name in listed.split():
        match = ours.match(name)
        if match is None or int(match.group(1)) in keep:
            continue
        with contextlib.suppress(ContainerError):
            _docker(binary, "rm", "--force", name)
            removed.append(name)
    return removed


def runtime_problem(
    runtime: Runtime, binary: str | None, helper: Path = DEFAULT_HELPER
) -> str | None:
    """Why this node's runtime cannot run a container (one line), None when it answers: docker's
    and podman's `version` (docker's asks its daemon) and their exec helper, apptainer's
    `--version`; podman's OCI runtime where the host's cgroups refuse crun (`crun_problem`)."""
    if runtime != "apptainer" and (problem := helper_problem(helper)) is not None:
        return problem
    exe = binary or runtime
    args = ("--version",) if runtime == "apptainer" else ("version",)
    try:
        _docker(exe, *args, timeout_s=30)
    except ContainerError as exc:
        return str(exc)
    return crun_problem(exe) if runtime == "podman" else None


def crun_problem(binary: str, mounts: Path = Path("/proc/self/mounts")) -> str | None:
    """Why podman cannot start a container here where its OCI runtime is crun on a hybrid
    cgroup host whose unified hierarchy holds a controller (hugetlb, as the agent's tasks use):
    crun 1.8 refuses every container there ("cgroups in hybrid mode not supported"). None
    elsewhere, without asking podman where the host is not such a one."""
    v1, controllers = False, []
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        v1 = v1 or fields[2] == "cgroup"
        if fields[2] == "cgroup2":
            with contextlib.suppress(OSError):
                controllers += (Path(fields[1]) / "cgroup.controllers").read_text().split()
    if not (v1 and controllers):
        return None
    try:
        name = _docker(binary, "info", "--format", "{{.Host.OCIRuntime.Name}}", timeout_s=30)
    except ContainerError as exc:
        return str(exc)
    if name.strip() != "crun":
        return None
    return (
        f"podman's OCI runtime is crun, which refuses every container on this hybrid cgroup "
        f"host (its unified hierarchy holds {', '.join(controllers)}): install runc and set "
        'runtime = "runc" in /etc/containers/containers.conf'
    )


class RuntimeCheck:
    """Whether this node's runtime (None: none configured) answers: asked at the first look,
    then again at each `check` (the agent's, every `container_check_interval_s`, in a thread),
    so a runtime that starts after the agent, or stops, is seen."""

    def __init__(
        self, runtime: Runtime | None, binary: str | None, helper: Path = DEFAULT_HELPER
    ) -> None:
        self.runtime, self.binary, self.helper = runtime, binary, helper
        self._works: bool | None = None
        self.cgroup_driver: str | None = None
        """docker's cgroup driver, podman's cgroup manager (`cgroupfs`, `systemd`), asked when
        it answers."""

    @property
    def works(self) -> bool:
        if self._works is None:
            self.check()
        return bool(self._works)

    def check(self) -> bool:
        """Ask the runtime again; whether the answer changed. A change is logged."""
        if self.runtime is None:
            self._works = False
            return False
        problem = runtime_problem(self.runtime, self.binary, self.helper)
        before, self._works = self._works, problem is None
        if problem is None and self.runtime in ("docker", "podman"):
            self.cgroup_driver = cgroup_driver(self.binary or self.runtime, self.runtime)
        if problem is not None and before is not False:
            log.warning(
                "container runtime %s: %s (no job with an image here)", self.runtime, problem
            )
        elif problem is None and before is False:
            log.info("container runtime %s answers: jobs with an image run here", self.runtime)
        return before is not None and before != self._works


def cgroup_driver(binary: str, runtime: Runtime = "docker") -> str | None:
    """docker's cgroup driver or podman's cgroup manager, None where it does not say."""
    field = "{{.Host.CgroupManager}}" if runtime == "podman" else "{{.CgroupDriver}}"
    try:
        return _docker(binary, "info", "--format", field, timeout_s=30).strip() or None
    except ContainerError:
        return None


def start_task_pod(binary: str, agent: str, task_id: int, image: str | None) -> int:
    """A private docker task's pod, started with the node's pod `image`: its process.
    ContainerError (one line, for the task's reason) when there is none or it did not start."""
    if image is None:
        raise ContainerError(
            "docker runs a container in the task's own network namespace only with a pod "
            "image (fairgpu agent --container-pause-image): submit with --network host, "
            "or run the node's containers with podman or apptainer"
        )
    try:
        return start_pod(binary, agent, task_id, image)
    except ContainerError as exc:
        raise ContainerError(f"starting the task's pod: {exc}") from exc


def start_pod(binary: str, agent: str, task_id: int, image: str) -> int:
    """Start the task's docker pod (a pause container with no network, no capabilities, as
    nobody, a few MiB and processes) and return its process, whose namespace the task gets.
    Its resolver, which the task's container shares, is the one pasta forwards."""
    name = pod_name(agent, task_id)
    remove_pod(binary, agent, task_id)  # what a crash left
    _docker(
        binary, "run", "--detach", "--rm", "--name", name, *_labels(agent, task_id),
        "--network=none", "--ipc=private",
        "--cap-drop=ALL", "--security-opt=no-new-privileges", "--user=65534:65534",
        "--pids-limit=8", "--memory=64m", "--log-driver=none", f"--dns={DNS_ADDRESS}", image,
    )  # fmt: skip
    pid = _docker(binary, "inspect", "--format", "{{.State.Pid}}", name).strip()
    if not pid.isdigit() or int(pid) <= 0:
        remove_pod(binary, agent, task_id)
        raise ContainerError(f"the pod {name} is not running (its image {image} ended at once)")
    return int(pid)


def remove_pod(binary: str, agent: str, task_id: int) -> None:
    """Remove the task's pod (none is fine)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        argv = [binary, "rm", "--force", pod_name(agent, task_id)]
        subprocess.run(argv, capture_output=True, timeout=60, check=False)


def _docker(binary: str, *args: str, timeout_s: float = 120) -> str:
    try:
        done = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ContainerError(f"{binary} {args[0]}: {exc}") from exc
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ContainerError(f"{binary} {args[0]}: {lines[-1] if lines else done.returncode}")
    return done.stdout
