"""A podman task's GPUs, with the real podman, as root: the container gets its own GPUs' device
files and the driver's shared one, through the Container Device Interface names the agent asks
for (`--device nvidia.com/gpu=N`), and no other GPU's, neither as a file nor in its device
cgroup.

The GPUs are character devices made with mknod (major 195, as the NVIDIA driver's; nothing
answers behind them) and a CDI spec naming them, as the NVIDIA Container Toolkit's `nvidia-ctk
cdi generate` writes one for the real devices; the spec lives in /var/run/cdi for the test alone.
docker's `--gpus` needs NVIDIA's runtime, which this machine lacks: not tested here."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents.helpers import spec
from tests.agents.test_container_netns import (  # noqa: F401 - fixtures
    TASK,
    docker_node,
    image,
    runtime,
)
from tests.agents.test_isolation import ACME
from tests.agents.test_netns import NetNode, node  # noqa: F401 - the fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="container tasks need root")

CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
GPUS = 4
CTL_MINOR = 255


def _nvidia_specs() -> list[Path]:
    """The node's own CDI specs for NVIDIA GPUs (a GPU node's toolkit writes one)."""
    found = []
    for directory in CDI_DIRS:
        for path in sorted(directory.glob("*")) if directory.is_dir() else []:
            if "nvidia.com/gpu" in path.read_text(errors="replace"):
                found.append(path)
    return found


@pytest.fixture
def fake_gpus(tmp_path: Path) -> Iterator[Path]:
    """GPUS fake device files and a CDI spec naming each by its index. One test at a time on
    the host holds the spec (two specs of one kind naming the same devices clash)."""
    with open("/tmp/fairgpu-test-cdi.lock", "w") as lock:  # noqa: S108
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _fake_gpus(tmp_path)


def _fake_gpus(tmp_path: Path) -> Iterator[Path]:
    if theirs := _nvidia_specs():
        pytest.skip(f"this node has its own NVIDIA CDI spec ({theirs[0]}): a second would clash")
    dev = tmp_path / "fake-dev"
    dev.mkdir()
    for minor in (*range(GPUS), CTL_MINOR):
        name = "nvidiactl" if minor == CTL_MINOR else f"nvidia{minor}"
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    spec_dir = CDI_DIRS[1]
    made = not spec_dir.exists()
    spec_dir.mkdir(parents=True, exist_ok=True)
    cdi = {
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": [
            {
                "name": str(minor),
                "containerEdits": {
                    "deviceNodes": [
                        {"path": f"/dev/nvidia{minor}", "hostPath": str(dev / f"nvidia{minor}")}
                    ]
                },
            }
            for minor in range(GPUS)
        ],
        "containerEdits": {
            "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": str(dev / "nvidiactl")}]
        },
    }
    path = spec_dir / f"fairgpu-test-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(cdi))
    try:
        yield dev
    finally:
        path.unlink()
        if made:
            spec_dir.rmdir()


@pytest.mark.parametrize("runtime", ["podman"], indirect=True)
def test_a_podman_task_gets_its_own_gpus_device_files_and_no_other(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    fake_gpus: Path,
) -> None:
    net = docker_node
    script = (
        "ls /dev; echo cgroup:; cat /sys/fs/cgroup/devices/devices.list; "
        'echo "CVD=$CUDA_VISIBLE_DEVICES"'
    )
    net.runner.start(spec(TASK, ["sh", "-c", script], image=image, gpus=[1, 3], **ACME))
    result = net.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    files, _, cgroup = result["log"].partition("cgroup:\n")
    seen = {name for name in files.split() if name.startswith("nvidia")}
    assert seen == {"nvidia1", "nvidia3", "nvidiactl"}, result
    allowed = {line.split()[1] for line in cgroup.splitlines() if line.startswith("c 195:")}
    assert allowed == {"195:1", "195:3", f"195:{CTL_MINOR}"}, result
    assert "a *:* rwm" not in cgroup, result  # no device of the node's beyond its own
    # Renumbered from 0 inside by the runtime's devices, the node's numbering is not passed in.
    assert "CVD=\n" in cgroup, result
