"""A docker or podman task's environment, with the real docker daemon and the real podman, as
root: the job's variables reach its container, and never the environment of the runtime's
client, which runs as root outside the sandbox (a job's PATH chose which `docker` the wrapper
ran, its DOCKER_HOST which daemon the client obeyed, its LD_PRELOAD what it loaded; podman reads
CONTAINER_HOST and CONTAINERS_CONF alike)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agents.imagelaunch import qualified
from tests.agents.helpers import spec, wait_for
from tests.agents.test_container_netns import (  # noqa: F401 - fixtures
    TASK,
    docker_node,
    image,
    runtime,
)
from tests.agents.test_isolation import ACME
from tests.agents.test_netns import NetNode, node  # noqa: F401 - the fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="docker tasks need root")


def _client(wrapper: int) -> psutil.Process | None:
    """The task's `docker run` (or `podman run`), once it runs."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(wrapper).children(recursive=True):
            if child.cmdline()[1:2] == ["run"]:
                return child
    return None


def test_a_container_tasks_variables_reach_its_container_never_its_root_client(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
) -> None:
    net = docker_node
    tools = net.root / "tools"  # what the org could have put in its data root
    tools.mkdir()
    ran = net.root / "ran"
    for name in ("docker", "podman", "mv", "sh"):
        (tools / name).write_text(
            f'#!/bin/sh\nid -u >> {ran}\nexec /usr/bin/env -u PATH {name} "$@"\n'
        )
        (tools / name).chmod(0o755)
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "DOCKER_HOST": "tcp://127.0.0.1:9",
        "CONTAINER_HOST": "tcp://127.0.0.1:9",
        "CONTAINERS_CONF": str(tools / "containers.conf"),
        "LD_LIBRARY_PATH": str(tools),
        "MARK": "two words = one",
    }
    command = ["sh", "-c", 'echo "[$MARK] $DOCKER_HOST $LD_LIBRARY_PATH"; sleep 3']
    net.runner.start(spec(TASK, command, image=image, gpus=[], network="host", env=env, **ACME))
    wrapper = net.runner.records[TASK].pid
    assert wrapper is not None, net.runner.records[TASK]
    wait_for(lambda: _client(wrapper) is not None or net._ended(TASK), 60)
    client = _client(wrapper)
    assert client is not None, net.result(TASK)
    seen = client.environ()
    assert not {"MARK", "DOCKER_HOST", "CONTAINER_HOST", "CONTAINERS_CONF", "LD_LIBRARY_PATH"} & (
        seen.keys()
    ), seen
    assert str(tools) not in seen.get("PATH", ""), seen
    result = net.result(TASK, timeout_s=60)
    assert result["exit_code"] == 0, result
    assert result["log"] == f"[two words = one] tcp://127.0.0.1:9 {tools}\n", result
    assert not ran.exists()  # nothing of the org's ran outside its container


@pytest.mark.parametrize("option", ["--privileged", "--user=0"])
def test_an_image_that_is_a_runtime_option_is_refused(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    option: str,
) -> None:
    """The image goes on docker's command line before the command: `--privileged` there gave
    the container every device of the node (every GPU's among them), `--user=0` root, and the
    command's first word became the image. The server refuses such a job (422); a node that
    gets one anyway refuses the task."""
    net = docker_node
    net.runner.start(spec(TASK, [image, "id"], image=option, gpus=[], network="host", **ACME))
    record = net.runner.records[TASK]
    assert record.state == "failed_to_start", record
    assert record.reason == f"the image {option!r} starts with '-'"


TOOLKIT_ASKED = {
    "NVIDIA_MOFED": "enabled",
    "NVIDIA_IMEX_CHANNELS": "0",
    "NVIDIA_NVSWITCH": "enabled",
    "NVIDIA_GDS": "enabled",
    "NVIDIA_GDRCOPY": "enabled",
    "NVIDIA_MIG_CONFIG_DEVICES": "all",
    "NVIDIA_MIG_MONITOR_DEVICES": "all",
}


@pytest.fixture
def toolkit_image(runtime: str, image: str, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    """An image whose ENV asks NVIDIA's runtime hook for devices beyond the container's GPUs."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    archive = tmp_path / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(busybox, "bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
        for directory in ("tmp", "proc", "sys", "dev", "etc"):
            entry = tarfile.TarInfo(directory)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(entry)
    name = "fairgpu-test/nvidia-env:1"
    changes = [arg for n, v in TOOLKIT_ASKED.items() for arg in ("--change", f"ENV {n}={v}")]
    subprocess.run(
        [runtime, "import", *changes, str(archive), qualified(name)],
        check=True,
        capture_output=True,
    )
    yield name
    subprocess.run([runtime, "rmi", "--force", qualified(name)], capture_output=True)


def test_an_image_names_no_nvidia_device_beyond_its_gpus_through_the_toolkits_variables(
    docker_node: NetNode,  # noqa: F811
    toolkit_image: str,
) -> None:
    """NVIDIA's runtime hook reads the environment docker or podman gives the container, the
    image's ENV included (a job's own variables never reach the runtime: containerenv):
    NVIDIA_MOFED=enabled gave every InfiniBand device of the node, NVIDIA_IMEX_CHANNELS an
    IMEX channel (through which jobs import each other's GPU memory over NVLink),
    NVIDIA_NVSWITCH the NVSwitches' devices, NVIDIA_GDS and NVIDIA_GDRCOPY theirs; the MIG
    config and monitor devices it refuses without CAP_SYS_ADMIN, emptied anyway. The hook is
    not on this machine: what is checked is the environment the runtime gives the container,
    which is what it reads."""
    net = docker_node
    command = ["sh", "-c", " ".join(f'echo "{n}=${n}";' for n in sorted(TOOLKIT_ASKED))]
    net.runner.start(spec(TASK, command, image=toolkit_image, gpus=[], network="host", **ACME))
    result = net.result(TASK, timeout_s=60)
    assert result["exit_code"] == 0, result
    assert result["log"].split() == [
        "NVIDIA_GDRCOPY=disabled",
        "NVIDIA_GDS=disabled",
        "NVIDIA_IMEX_CHANNELS=void",
        "NVIDIA_MIG_CONFIG_DEVICES=",
        "NVIDIA_MIG_MONITOR_DEVICES=",
        "NVIDIA_MOFED=disabled",
        "NVIDIA_NVSWITCH=disabled",
    ], result
