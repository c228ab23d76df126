"""`fairgpu submit --image IMG` with no command submits a job that runs the image's ENTRYPOINT
and CMD, `describe` says so; without an image a command is still required. Real server on SQLite
and PostgreSQL; end to end, a real agent process with docker runs a test-built image's CMD."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

from tests.agents.helpers import docker_unusable
from tests.agents.test_container_netns import _docker_unusable
from tests.harness.served import Served, simulated_agent


def test_an_image_without_a_command_through_the_cli(served: Served) -> None:
    served.ok("org", "create", "acme")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    token = ada["token"]
    image = "registry.example:5000/team/trainer:2.1"
    job = served.ok("submit", "--parsable", "-t", "1h", "--image", image, token=token).strip()
    shown = json.loads(served.ok("describe", job, "-o", "json", token=token))
    assert (shown["command"], shown["image"], shown["name"]) == ([], image, "trainer")
    assert "Command: (the image's ENTRYPOINT and CMD)" in served.ok("describe", job, token=token)
    given = served.ok("submit", "--parsable", "-t", "1h", "--image", image, "--", "python", "x.py",
                      token=token).strip()  # fmt: skip
    assert json.loads(served.ok("describe", given, "-o", "json", token=token))["command"] == [
        "python", "x.py"
    ]  # fmt: skip
    for args in (("-t", "1h"), ("-t", "1h", "-G", "2")):
        refused = served.run("submit", *args, token=token)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.strip().splitlines()[-1] == "Error: Missing argument 'command'."
    listed = json.loads(served.ok("queue", "-o", "json", token=token))
    assert sorted(j["id"] for j in listed) == sorted([int(job), int(given)])


def _image(directory: Path) -> str:
    """busybox alone, with an ENTRYPOINT and a CMD (tag: remove it after)."""
    why = _docker_unusable()
    if why:
        docker_unusable(why)
    busybox = shutil.which("busybox")
    assert busybox is not None
    archive = directory / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(busybox, "bin/busybox")
        for name in ("tmp", "proc", "sys", "dev", "etc"):
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(entry)
    tag = f"fairgpu-test/imagecmd:{uuid.uuid4().hex[:12]}"
    changes = ['ENTRYPOINT ["/bin/busybox", "echo", "entry:"]', 'CMD ["from", "cmd"]']
    flags = [arg for change in changes for arg in ("--change", change)]
    subprocess.run(["docker", "import", *flags, str(archive), tag], check=True)
    return tag


# The real docker, without the request for the task's GPUs: the agent's GPUs are simulated and
# this machine's docker has no NVIDIA runtime to give any ("could not select device driver").
_NO_GPUS = """#!/bin/sh
for arg; do
  shift
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  if [ "$arg" = --gpus ]; then skip=1; continue; fi
  set -- "$@" "$arg"
done
exec docker "$@"
"""


def test_a_submitted_image_job_without_a_command_runs_its_cmd_on_a_docker_node(
    served: Served, tmp_path: Path
) -> None:
    """Through the server and a real agent process (simulated GPUs, no isolation) whose
    container runtime is docker: the task reaches the agent with no command, and the image's
    ENTRYPOINT and CMD print the log."""
    tag = _image(tmp_path)
    shim = tmp_path / "docker-no-gpus"
    shim.write_text(_NO_GPUS)
    shim.chmod(0o755)
    try:
        served.ok("org", "create", "acme")
        served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "2")
        ada = json.loads(
            served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json")
        )
        token = ada["token"]
        runtime = ("--container-runtime", "docker", "--container-binary", str(shim))
        with simulated_agent(served, tmp_path, *runtime):
            job = served.ok(
                "submit", "--parsable", "-G", "H100:1", "-t", "5m", "--image", tag, token=token
            ).strip()
            assert served.ok("logs", job, "-f", token=token) == "entry: from cmd\n"
            deadline = time.monotonic() + 120
            while (shown := json.loads(served.ok("describe", job, "-o", "json")))["state"] not in (
                "COMPLETED",
                "FAILED",
            ):
                assert time.monotonic() < deadline, shown
                time.sleep(0.2)
            assert (shown["state"], shown["exit_code"]) == ("COMPLETED", 0), shown
    finally:
        subprocess.run(["docker", "rmi", "--force", tag], capture_output=True)
