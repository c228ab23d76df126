"""The container runtime command lines the agent builds."""

from __future__ import annotations

from agents.container import container_launch


def build(runtime: str, **overrides: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "runtime": runtime,
        "binary": None,
        "task_id": 12,
        "image": "nvcr.io/nvidia/pytorch:24.05-py3",
        "command": ["torchrun", "train.py"],
        "gpus": [2, 3],
        "gpu_uuids": [],
        "env": {"FAIRGPU_JOB_ID": "5", "CUDA_VISIBLE_DEVICES": "2,3", "SECRET": "x"},
        "workdir": "/data/run",
    }
    args.update(overrides)
    return container_launch(**args)  # type: ignore[arg-type]


def test_docker() -> None:
    launch = build("docker")
    assert launch.argv == [
        "docker", "run", "--rm", "--name", "fairgpu-task-12", "--network=host", "--ipc=host",
        "--init", "--gpus", '"device=2,3"', "-e", "FAIRGPU_JOB_ID", "-e", "SECRET",
        "-v", "/data/run:/data/run", "-w", "/data/run",
        "nvcr.io/nvidia/pytorch:24.05-py3", "torchrun", "train.py",
    ]  # fmt: skip
    assert launch.kill_argv == ["docker", "kill", "fairgpu-task-12"]
    assert "x" not in launch.argv  # values travel in the environment, not on the command line


def test_docker_by_uuid() -> None:
    launch = build("docker", gpu_uuids=["GPU-a", "GPU-b"])
    assert '"device=GPU-a,GPU-b"' in launch.argv


def test_podman_uses_cdi_devices() -> None:
    launch = build("podman", binary="/usr/bin/podman")
    argv = launch.argv
    assert argv[:2] == ["/usr/bin/podman", "run"]
    assert argv.count("--device") == 2
    assert "nvidia.com/gpu=2" in argv
    assert "nvidia.com/gpu=3" in argv
    assert launch.kill_argv == ["/usr/bin/podman", "kill", "fairgpu-task-12"]


def test_apptainer_keeps_cuda_visible_devices_in_the_environment() -> None:
    launch = build("apptainer")
    assert launch.argv == [
        "apptainer", "exec", "--nv", "--bind", "/data/run", "--pwd", "/data/run",
        "nvcr.io/nvidia/pytorch:24.05-py3", "torchrun", "train.py",
    ]  # fmt: skip
    assert launch.kill_argv is None
