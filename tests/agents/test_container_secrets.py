"""A docker or podman task's own variables and secret, with the real docker daemon and the real
podman, as root: the command sees them, and none is written to the node's disk in clear (docker
keeps a container's environment in /var/lib/docker/containers/<id>/config.v2.json and
containerd's metadata, podman in its bolt database and each container's OCI config.json)."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from agents.container import DEFAULT_HELPER, Runtime
from agents.containerenv import ContainerEnv, memory_backed, variables_file
from agents.runner import Runner, RunnerConfig
from tests.agents.helpers import spec, wait_for
from tests.agents.test_container_netns import (  # noqa: F401 - fixtures
    TASK,
    docker_node,
    image,
    runtime,
)
from tests.agents.test_isolation import ACME
from tests.agents.test_netns import NetNode, node  # noqa: F401 - the fixtures

RUNTIME_ROOTS = {
    "docker": (Path("/var/lib/docker"),),
    "podman": (Path("/var/lib/containers"), Path("/run/containers"), Path("/run/libpod")),
}
"""Where each runtime keeps its containers' configuration (podman: its store and its run
directory, the bolt database and each container's OCI config.json among them)."""
HOSTILE = "it's $(id) `id` \\ \"q\" ${HOME}\nsecond line; exit 3 '"


def _holding(value: str, *roots: Path) -> list[str]:
    """The files under `roots` that hold `value` (grep, as root: every file is read). A file
    that goes while grep walks (docker's layers of another test's image, made and removed
    meanwhile) is not an error."""
    found = subprocess.run(
        ["grep", "-rlF", "--", value, *map(str, roots)], capture_output=True, text=True
    )
    vanished = all(
        line.endswith(": No such file or directory") for line in found.stderr.splitlines()
    )
    assert found.returncode in (0, 1) or vanished, found.stderr
    return found.stdout.split()


def test_the_helper_reads_back_exactly_what_was_written(tmp_path: Path) -> None:
    """Quotes, expansions, backslashes, `=` and line breaks in a value come back as they were
    and nothing in them runs; the file's variables replace those of the same name."""
    values = {"A": HOSTILE, "B": "", "C": "x=y", "D": "'''", "PATH": "/usr/bin:/bin"}
    path = tmp_path / "env"
    path.write_bytes(variables_file(values))
    script = 'printf "%s\\0" "$A" "$B" "$C" "$D" "$PATH"'
    out = subprocess.run(
        [str(DEFAULT_HELPER), "-e", str(path), "--", "sh", "-c", script],
        capture_output=True, text=True, check=True, env={"A": "old", "PATH": "/nowhere"},
    )  # fmt: skip
    assert out.stdout.split("\0")[:-1] == list(values.values())


@pytest.mark.skipif(os.geteuid() != 0, reason="docker tasks need root")
def test_a_container_tasks_secrets_reach_its_command_and_never_the_nodes_disk(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: str,  # noqa: F811
) -> None:
    net = docker_node
    token, job_secret = secrets.token_hex(16), secrets.token_urlsafe(32)
    env = {"HF_TOKEN": token, "NOTE": HOSTILE}
    command = [
        "sh", "-c",
        'sleep 4; echo "[$HF_TOKEN] [$FAIRGPU_JOB_SECRET] [$FAIRGPU_JOB_ID]"; printf %s "$NOTE"',
    ]  # fmt: skip
    task = spec(
        TASK, command, image=image, gpus=[], network="host", env=env, job_secret=job_secret, **ACME
    )
    net.runner.start(task)
    name = net.runner.records[TASK].container_name
    assert name is not None, net.runner.records[TASK]
    running = [runtime, "inspect", "--format", "{{.State.Running}}", name]

    def started() -> bool:
        done = subprocess.run(running, capture_output=True, text=True)
        return done.stdout.strip() == "true" or net._ended(TASK)

    wait_for(started, 60)  # and the command prints nothing yet (its log is its own)
    assert not net._ended(TASK), net.result(TASK)
    places = (*RUNTIME_ROOTS[runtime], net.state.root, net.confinement.task_dir(TASK))
    for value in (token, job_secret):
        assert _holding(value, *places) == []
    env_dir = net.runner.container_env.root / str(TASK)
    assert memory_backed(env_dir)
    assert _holding(token, env_dir)  # the one copy, in memory
    result = net.result(TASK, timeout_s=60)
    assert result["exit_code"] == 0, result
    assert result["log"] == f"[{token}] [{job_secret}] [{task.job_id}]\n{HOSTILE}", result
    assert not env_dir.exists()  # gone with the task
    assert not net.runner.container_env.root.exists()  # and the agent's, which held only it


@pytest.mark.skipif(os.geteuid() != 0, reason="docker tasks need root")
def test_a_container_task_is_refused_where_its_secrets_would_land_on_disk(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: Runtime,  # noqa: F811
    tmp_path: Path,
) -> None:
    net = docker_node
    on_disk = tmp_path / "on-disk" / "env"
    assert not memory_backed(on_disk.parent)
    config = RunnerConfig(container_runtime=runtime, container_env_dir=on_disk)
    net.runner = Runner(net.state, config, confinement=net.confinement)
    net.runner.start(spec(TASK, ["true"], image=image, gpus=[], env={"K": "v"}, **ACME))
    record = net.runner.records[TASK]
    assert record.state == "failed_to_start", record
    assert "would be written to the node's disk" in record.reason
    assert not on_disk.exists()


def test_a_sweep_removes_what_tasks_no_longer_running_left(tmp_path: Path) -> None:
    shm = Path("/dev/shm")  # noqa: S108
    files = ContainerEnv(shm / f"fairgpu-test-{secrets.token_hex(6)}")
    try:
        kept, gone = files.write(1, {"A": "1"}), files.write(2, {"A": "2"})
        files.sweep({1})
        assert kept.exists()
        assert not gone.exists()
        assert (files.root.stat().st_mode & 0o777) == 0o700
    finally:
        files.sweep(set())
    assert not files.root.exists()


def test_a_link_planted_at_the_agents_directory_is_never_followed(tmp_path: Path) -> None:
    """/dev/shm is anyone's to write in, and the directory's name follows from the agent's
    state directory: a tenant's link there must not make the agent (root) remove, or write,
    anything where it points."""
    target = tmp_path / "elsewhere"
    (target / "5").mkdir(parents=True)
    (target / "keep").write_text("mine")
    files = ContainerEnv(Path("/dev/shm") / f"fairgpu-test-{secrets.token_hex(6)}")  # noqa: S108
    files.root.symlink_to(target)
    try:
        files.sweep(set())
        files.remove(5)
        assert sorted(p.name for p in target.iterdir()) == ["5", "keep"]
        written = files.write(5, {"A": "1"})
        assert not files.root.is_symlink()
        assert written.parent == files.root
        assert sorted(p.name for p in target.iterdir()) == ["5", "keep"]
        assert not (target / "5" / "env").exists()
    finally:
        if files.root.is_symlink():
            files.root.unlink()
        files.sweep(set())
    assert not files.root.exists()
