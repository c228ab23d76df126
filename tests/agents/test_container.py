"""The container runtime command lines the agent builds."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import pytest

from agents import imagelaunch
from agents.cgroups import Limits
from agents.container import (
    DEFAULT_HELPER,
    HELPER_MOUNT,
    ContainerError,
    ContainerLaunch,
    container_launch,
    crun_problem,
    env_file,
)
from agents.containertask import cgroup_parent, placement


def build(runtime: str, **overrides: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "runtime": runtime,
        "binary": None,
        "agent": "n0de",
        "task_id": 12,
        "image": "nvcr.io/nvidia/pytorch:24.05-py3",
        "command": ["torchrun", "train.py"],
        "gpus": [2, 3],
        "gpu_uuids": [],
        "env": {"FAIRGPU_JOB_ID": "5", "CUDA_VISIBLE_DEVICES": "2,3", "SECRET": "s3cr3t"},
        "workdir": "/data/run",
        "env_file": "/proc/self/fd/9",
    }
    args.update(overrides)
    return container_launch(**args)  # type: ignore[arg-type]


def launched(launch: ContainerLaunch) -> dict[str, Any]:
    """The launcher's config: docker's and podman's line goes through agents/imagelaunch.py."""
    assert launch.argv[:4] == [sys.executable, "-I", "-S", imagelaunch.__file__]
    config: dict[str, Any] = json.loads(launch.argv[4])
    return config


def run_line(launch: ContainerLaunch, entrypoint: list[str], cmd: list[str]) -> list[str]:
    """The `run` the launcher execs for an image with this ENTRYPOINT and CMD."""
    config = launched(launch)
    program = imagelaunch.program(entrypoint, cmd, config["command"])
    return imagelaunch.run_argv(config, "sha256:1d", program)


def test_docker() -> None:
    launch = build("docker")
    assert run_line(launch, [], []) == [
        "docker", "run", "--rm", "--name", "fairgpu-n0de-task-12",
        "--label", "fairgpu.agent=n0de", "--label", "fairgpu.task=12", "--network=host",
        "--ipc=private", "--init", "--oom-score-adj=500", "--log-driver=none",
        "--gpus", '"device=2,3"',
        "-e", "NVIDIA_IMEX_CHANNELS=void", "-e", "NVIDIA_MOFED=disabled",
        "-e", "NVIDIA_NVSWITCH=disabled", "-e", "NVIDIA_GDS=disabled",
        "-e", "NVIDIA_GDRCOPY=disabled", "-e", "NVIDIA_MIG_CONFIG_DEVICES=",
        "-e", "NVIDIA_MIG_MONITOR_DEVICES=",
        "--env-file", "/proc/self/fd/9",
        "-v", "/data/run:/data/run", "-v", f"{DEFAULT_HELPER}:{HELPER_MOUNT}:ro",
        "-w", "/data/run", "--entrypoint", HELPER_MOUNT,
        "sha256:1d", "--", "torchrun", "train.py",
    ]  # fmt: skip
    assert launch.kill_argv == ["docker", "kill", "fairgpu-n0de-task-12"]
    assert "s3cr3t" not in launch.argv[4]  # values travel in a file, not on the command line


def test_the_images_entrypoint_and_cmd_are_run_as_docker_runs_them() -> None:
    """ENTRYPOINT + the job's command; ENTRYPOINT + CMD when the job gives none."""
    launch = build("docker", env_dir=Path("/run/fairgpu/n0de/12"), scope=True)
    tail = ["sha256:1d", "-s", "-e", "/run/fairgpu/env/env", "--"]
    line = run_line(launch, ["/entry", "--flag"], ["serve"])
    assert line[line.index("sha256:1d") :] == [*tail, "/entry", "--flag", "torchrun", "train.py"]
    assert "/run/fairgpu/n0de/12:/run/fairgpu/env:ro" in line
    bare = build("docker", command=[], env_dir=Path("/run/fairgpu/n0de/12"), scope=True)
    line = run_line(bare, ["/entry"], ["serve", "--port", "1"])
    assert line[line.index("sha256:1d") :] == [*tail, "/entry", "serve", "--port", "1"]
    assert "/bin/sh" not in line


def test_docker_by_uuid() -> None:
    launch = build("docker", gpu_uuids=["GPU-a", "GPU-b"])
    assert '"device=GPU-a,GPU-b"' in launched(launch)["run"]


def test_podman_uses_cdi_devices() -> None:
    launch = build("podman", binary="/usr/bin/podman")
    argv = launched(launch)["run"]
    assert argv[:2] == ["/usr/bin/podman", "run"]
    assert argv.count("--device") == 2
    assert "nvidia.com/gpu=2" in argv
    assert "nvidia.com/gpu=3" in argv
    assert launch.kill_argv == ["/usr/bin/podman", "kill", "fairgpu-n0de-task-12"]


def test_podman_gives_its_container_the_agents_own_file_and_process_limits() -> None:
    """podman's own (1048576 files, 4194304 processes) need CAP_SYS_RESOURCE to set: without
    it no podman container started (tests/agents/test_container_netns.py, on this machine's
    root, which lacks it). docker's line is unchanged: its daemon's limits."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    most = int(Path("/proc/sys/kernel/pid_max").read_text())
    argv = launched(build("podman"))["run"]
    assert f"--ulimit=nofile={files[0]}:{files[1]}" in argv
    soft, hard = (most if v == resource.RLIM_INFINITY else min(v, most) for v in (soft, hard))
    assert f"--ulimit=nproc={soft}:{hard}" in argv
    assert not [a for a in launched(build("docker"))["run"] if a.startswith("--ulimit")]


def test_apptainer_keeps_cuda_visible_devices_in_the_environment() -> None:
    launch = build("apptainer")
    assert launch.argv == [
        "apptainer", "exec", "--nv", "--bind", "/data/run", "--pwd", "/data/run",
        "nvcr.io/nvidia/pytorch:24.05-py3", "torchrun", "train.py",
    ]  # fmt: skip
    assert launch.kill_argv is None


def test_apptainer_runs_the_images_runscript_for_a_job_without_a_command() -> None:
    """`exec IMAGE` with no program is an error; `run` starts the runscript, which for an image
    built from docker's is its ENTRYPOINT and CMD."""
    assert build("apptainer", command=[]).argv == [
        "apptainer", "run", "--nv", "--bind", "/data/run", "--pwd", "/data/run",
        "nvcr.io/nvidia/pytorch:24.05-py3",
    ]  # fmt: skip


def test_docker_under_strict_isolation_runs_as_the_org_uid_with_its_limits_and_roots() -> None:
    launch = build(
        "docker",
        user=200_003,
        mounts=[Path("/var/lib/fairgpu/tasks/12"), Path("/data/acme")],
        workdir="/data/acme/run",
        limits=Limits(memory_bytes=2**30, pids_max=512, cpu_weight=200),
    )
    argv = launched(launch)["run"]
    assert "--ipc=host" not in argv
    assert argv[argv.index("--user") + 1] == "200003:200003"
    for flag in ("--cap-drop=ALL", "--security-opt=no-new-privileges", "--pids-limit=512"):
        assert flag in argv
    # The runtime's default seccomp profile (docs/ISOLATION.md): never lifted.
    assert "--privileged" not in argv
    assert not [arg for arg in argv if arg.startswith("--security-opt=seccomp")], argv
    assert "seccomp=unconfined" not in argv  # the `--security-opt seccomp=...` spelling
    assert f"--memory={2**30}" in argv
    assert f"--memory-swap={2**30}" in argv
    mounted = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    # Only the task's directory and the org's roots (the workdir lies inside a root), and the
    # helper.
    assert mounted == [
        "/var/lib/fairgpu/tasks/12:/var/lib/fairgpu/tasks/12",
        "/data/acme:/data/acme",
        f"{DEFAULT_HELPER}:{HELPER_MOUNT}:ro",
    ]
    assert argv[argv.index("-w") + 1] == "/data/acme/run"


def test_docker_is_given_the_tasks_cgroup_as_its_containers_parent() -> None:
    launch = build("docker", user=200_003, cgroup_parent="/fairgpu/task-12")
    assert "--cgroup-parent=/fairgpu/task-12" in launched(launch)["run"]
    assert not [a for a in launched(build("docker"))["run"] if a.startswith("--cgroup-parent")]


def test_the_agent_says_what_bounds_a_container_where_the_task_cgroup_cannot() -> None:
    """Nothing refused silently: a node whose containers escape their task's huge page limit
    says so in its log."""
    drivers = (("podman", None), ("podman", "systemd"), ("docker", "systemd"), ("docker", None))
    for runtime, driver in drivers:
        line, whole = placement(runtime, driver, None)  # type: ignore[arg-type]
        assert not whole
        assert "huge pages are unbounded" in line, line
    assert placement("podman", "systemd", None)[0].startswith(
        "podman's cgroup manager is systemd, not cgroupfs"
    )
    assert cgroup_parent("docker", "systemd", None, 12, 200_001) is None
    assert cgroup_parent("podman", "systemd", None, 12, 200_001) is None
    assert placement("apptainer", None, None) == (
        "apptainer containers run in their task's sandbox and cgroup",
        True,
    )


def test_apptainer_under_strict_isolation_is_contained() -> None:
    launch = build(
        "apptainer",
        user=200_003,
        mounts=[Path("/var/lib/fairgpu/tasks/12")],
        workdir="/var/lib/fairgpu/tasks/12",
        env={"HOME": "/var/lib/fairgpu/tasks/12"},
    )
    assert launch.argv[:6] == [
        "apptainer", "exec", "--nv", "--contain", "--home", "/var/lib/fairgpu/tasks/12",
    ]  # fmt: skip
    assert launch.argv.count("--bind") == 1


def test_a_terminal_asks_docker_and_podman_for_one_and_apptainer_for_none() -> None:
    for runtime in ("docker", "podman"):
        argv = launched(build(runtime, tty=True))["run"]
        assert argv[argv.index("--log-driver=none") + 1 :][:2] == ["--interactive", "--tty"]
        batch = launched(build(runtime))["run"]
        assert "--tty" not in batch  # a batch task: no terminal, no stdin
        assert "--interactive" not in batch
    assert build("apptainer", tty=True).argv == build("apptainer").argv


def test_the_env_file_holds_the_jobs_variables_and_refuses_a_line_break() -> None:
    fd = env_file({"CUDA_VISIBLE_DEVICES": "2,3", "B": "two words ", "A": "x=y"})
    try:
        assert os.pread(fd, 1024, 0) == b"A=x=y\nB=two words \n"
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")  # not on any disk
    finally:
        os.close(fd)
    with pytest.raises(ContainerError, match="the variable B holds a line break"):
        env_file({"A": "x", "B": "one\ntwo"})


@pytest.mark.parametrize(
    ("oci", "unified", "refused"),
    [("crun", "hugetlb", True), ("runc", "hugetlb", False), ("crun", "", False)],
)
def test_podman_with_crun_on_a_hybrid_host_is_a_runtime_that_cannot_run(
    tmp_path: Path, oci: str, unified: str, refused: bool
) -> None:
    """crun 1.8 refuses every container on a hybrid host whose unified hierarchy holds a
    controller: the node says so once at the runtime's check (it then reports no `container`)
    rather than fail every podman task at its start with crun's line."""
    podman = tmp_path / "podman"
    podman.write_text(f'#!/bin/sh\n[ "$1" = info ] && echo {oci}\nexit 0\n')
    podman.chmod(0o755)
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text(unified + "\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n"
        f"cgroup2 {tmp_path / 'unified'} cgroup2 rw 0 0\n"
    )
    problem = crun_problem(str(podman), mounts)
    if refused:
        assert problem is not None
        assert problem.startswith("podman's OCI runtime is crun, which refuses every container")
        assert "holds hugetlb" in problem
    else:
        assert problem is None


@pytest.mark.parametrize(
    ("image", "named"),
    [
        ("trainer:1", "docker.io/library/trainer:1"),
        ("pytorch/pytorch:2.3", "docker.io/pytorch/pytorch:2.3"),
        ("docker.io/ubuntu", "docker.io/library/ubuntu"),
        ("index.docker.io/library/ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
        ("ubuntu@sha256:" + "a" * 64, "docker.io/library/ubuntu@sha256:" + "a" * 64),
        ("nvcr.io/nvidia/pytorch:24.05-py3", "nvcr.io/nvidia/pytorch:24.05-py3"),
        ("localhost/mine:1", "localhost/mine:1"),
        ("registry.example:5000/team/img", "registry.example:5000/team/img"),
    ],
)
def test_podman_is_given_the_image_as_docker_names_it(image: str, named: str) -> None:
    assert imagelaunch.qualified(image) == named
    assert launched(build("podman", image=image))["qualify"] is True
    assert launched(build("docker", image=image))["qualify"] is False


def test_no_image_opens_the_nodes_gpus_to_a_container_given_none() -> None:
    """NVIDIA's runtime hook mounts the GPUs the container's environment names, the image's
    own included (CUDA's images say NVIDIA_VISIBLE_DEVICES=all): where it runs for every
    container (docker's default runtime `nvidia`, podman's legacy hook), a container given no
    GPUs got every GPU of the node. docker's `--gpus` names its own, after the image's.
    (The hook itself is not on this machine: the line is what is checked.)"""
    void = ["-e", "NVIDIA_VISIBLE_DEVICES=void"]

    def has(argv: list[str], pair: list[str]) -> bool:
        return any(argv[i : i + 2] == pair for i in range(len(argv) - 1))

    none = launched(build("docker", gpus=[], gpu_uuids=None))["run"]
    assert "--gpus" not in none
    assert has(none, void), none
    assert not has(launched(build("docker"))["run"], void)  # --gpus says which
    for gpus in ([], [2, 3]):
        assert has(launched(build("podman", gpus=gpus))["run"], void)  # CDI says which
