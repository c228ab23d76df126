"""What a docker or podman task's container runs, with the real docker daemon and the real
podman, as root: the image's own ENTRYPOINT and CMD as docker runs them, in images without a
shell, and walled from other tasks' abstract unix sockets (the agent's helper,
agents/helper/fairgpu-exec.c, is every container's entrypoint; agents/imagelaunch.py reads the
image).

The images are made here from `scratch`, holding the host's static busybox at /bb/busybox (no
/bin, so no /bin/sh) and a static probe that connects to an abstract unix socket."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents import imagelaunch
from agents.container import DEFAULT_HELPER, HELPER_MOUNT, podman_ulimits
from agents.sandbox import LANDLOCK_SCOPE_ABI, landlock_abi
from protocol.agent import HeartbeatReply
from tests.agents.helpers import spec, wait_for
from tests.agents.test_container_netns import (  # noqa: F401 - fixtures
    TASK,
    docker_node,
    image,
    runtime,
)
from tests.agents.test_isolation import ABSTRACT, ACME, PY, RIVAL
from tests.agents.test_netns import NetNode, node  # noqa: F401 - the fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="docker tasks need root")

# Connects to the abstract unix socket argv[2] after one of its own (argv[1]), saying what came
# of each: `allowed` or the error.
PROBE = r"""
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
static socklen_t address(struct sockaddr_un *a, const char *name) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    strncpy(a->sun_path + 1, name, sizeof a->sun_path - 2);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(name));
}
static void attempt(const char *what, const char *name) {
    struct sockaddr_un a;
    socklen_t size = address(&a, name);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    int done = connect(s, (struct sockaddr *)&a, size);
    printf("%s: %s\n", what, done == 0 ? "allowed" : strerror(errno));
}
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    struct sockaddr_un a;
    socklen_t size = address(&a, argv[1]);
    int own = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(own, (struct sockaddr *)&a, size) != 0 || listen(own, 1) != 0) return 3;
    attempt("own", argv[1]);
    attempt("other", argv[2]);
    return 0;
}
"""


@pytest.fixture(scope="module")
def rootfs(image: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:  # noqa: F811
    """busybox and the probe, nothing else; and the same with /bin/sh ("image": docker is
    usable, else skipped)."""
    directory = tmp_path_factory.mktemp("scratch")
    busybox, gcc = shutil.which("busybox"), shutil.which("gcc")
    assert busybox is not None
    assert gcc is not None, "gcc builds the agent's helper (make helper) and this probe"
    (directory / "probe.c").write_text(PROBE)
    subprocess.run(
        [gcc, "-static", "-O2", "-o", str(directory / "probe"), str(directory / "probe.c")],
        check=True,
    )
    archives = directory / "rootfs.tar", directory / "with-shell.tar"
    for archive in archives:
        with tarfile.open(archive, "w") as tar:
            tar.add(busybox, "bb/busybox")
            tar.add(directory / "probe", "bb/probe")
            for name in ("tmp", "proc", "sys", "dev", "etc", "bin"):
                if name == "bin" and archive.name == "rootfs.tar":
                    continue
                entry = tarfile.TarInfo(name)
                entry.type, entry.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
                tar.addfile(entry)
            if archive.name == "with-shell.tar":
                shell = tarfile.TarInfo("bin/sh")
                shell.type, shell.linkname = tarfile.SYMTYPE, "/bb/busybox"
                tar.addfile(shell)
    return archives


@pytest.fixture(scope="module")
def make_image(rootfs: tuple[Path, Path], runtime: str) -> Iterator[object]:  # noqa: F811
    """make(*changes, shell=False): an image with these Dockerfile lines (ENTRYPOINT, CMD),
    without a shell unless asked."""
    made: list[str] = []

    def make(*changes: str, shell: bool = False) -> str:
        tag = f"fairgpu-test/scratch:{uuid.uuid4().hex[:12]}"
        flags = [arg for change in changes for arg in ("--change", change)]
        archive = rootfs[1] if shell else rootfs[0]
        subprocess.run(
            [runtime, "import", *flags, str(archive), imagelaunch.qualified(tag)], check=True
        )
        made.append(tag)
        return tag

    yield make
    subprocess.run([runtime, "rmi", "--force", *made], capture_output=True)


def test_an_image_without_a_shell_runs_and_sees_its_variables(
    docker_node: NetNode,  # noqa: F811
    make_image,  # type: ignore[no-untyped-def]
) -> None:
    """Before the helper, the job's variables were loaded by the image's /bin/sh, so such an
    image could not run on a docker node (`exec: "/bin/sh": no such file`)."""
    net = docker_node
    tag = make_image()
    token, job_secret = secrets.token_hex(16), secrets.token_urlsafe(32)
    task = spec(
        TASK, ["/bb/busybox", "env"], image=tag, gpus=[], network="host",
        env={"HF_TOKEN": token, "NOTE": "two\nlines"}, job_secret=job_secret, **ACME,
    )  # fmt: skip
    net.runner.start(task)
    result = net.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    lines = result["log"].splitlines()
    for line in (f"HF_TOKEN={token}", f"FAIRGPU_JOB_SECRET={job_secret}", "NOTE=two", "lines"):
        assert line in lines, result
    assert f"FAIRGPU_JOB_ID={task.job_id}" in lines, result  # fairgpu's own, from --env-file


def test_an_entrypoint_that_is_the_program_gets_the_jobs_arguments(
    docker_node: NetNode,  # noqa: F811
    make_image,  # type: ignore[no-untyped-def]
) -> None:
    """As docker gives them: ENTRYPOINT then the job's command, with nothing in between (the
    shell loader put `/bin/sh -c ... fairgpu-task` there, in an image that has a shell)."""
    net = docker_node
    entrypoint = 'ENTRYPOINT ["/bb/busybox", "echo", "entry:"]'
    tag = make_image(entrypoint, 'CMD ["not", "this"]', shell=True)
    task = spec(
        TASK, ["a  b", "c"], image=tag, gpus=[], network="host", job_secret="s" * 16, **ACME
    )  # every job has its secret, which the runtime must not see
    net.runner.start(task)
    result = net.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    assert result["log"] == "entry: a  b c\n", result


def test_a_task_sent_without_a_command_runs_the_images_entrypoint_and_cmd(
    docker_node: NetNode,  # noqa: F811
    make_image,  # type: ignore[no-untyped-def]
) -> None:
    """`fairgpu submit --image IMG` with no command: the heartbeat reply's task, as the server
    words it, has `"command": []`, and the node runs the image's ENTRYPOINT and CMD. Before,
    the agent refused such a reply (a command had at least one argument)."""
    net = docker_node
    tag = make_image('ENTRYPOINT ["/bb/busybox", "echo", "entry:"]', 'CMD ["from", "cmd"]')
    task = {
        "task_id": TASK, "job_id": TASK + 100, **ACME, "node_rank": 0,
        "num_nodes": 1, "gpus": [], "command": [], "image": tag, "time_limit_s": 60,
        "network": "host", "job_secret": "s" * 16,
    }  # fmt: skip
    server_time = "2026-01-01T00:00:00+00:00"
    reply = json.dumps({"start": [task], "heartbeat_interval_s": 5, "server_time": server_time})
    (started,) = HeartbeatReply.model_validate_json(reply).start
    net.runner.start(started)
    result = net.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    assert result["log"] == "entry: from cmd\n", result


@pytest.mark.parametrize(
    ("changes", "command", "printed"),
    [
        (['CMD ["/bb/busybox", "echo", "only", "cmd"]'], [], "only cmd\n"),
        (['ENTRYPOINT ["/bb/busybox", "echo"]', 'CMD ["from", "cmd"]'], [], "from cmd\n"),
        (['ENTRYPOINT ["/bb/busybox", "echo"]', 'CMD ["from", "cmd"]'], ["job"], "job\n"),
    ],
)
def test_the_launcher_runs_the_images_cmd_when_the_job_gives_no_command(
    make_image,  # type: ignore[no-untyped-def]
    runtime: str,  # noqa: F811
    changes: list[str],
    command: list[str],
    printed: str,
) -> None:
    """agents/imagelaunch.py as the agent runs it, with a `run` of its own."""
    tag = make_image(*changes)
    run = [runtime, "run", "--rm", "--network=none", "--log-driver=none"]
    run += podman_ulimits() if runtime == "podman" else []
    config = {
        "run": [*run, "-v", f"{DEFAULT_HELPER}:{HELPER_MOUNT}:ro"],
        "image": tag,
        "qualify": runtime == "podman",
        "helper": HELPER_MOUNT,
        "helper_args": [],
        "command": command,
    }
    argv = [sys.executable, "-I", "-S", imagelaunch.__file__, json.dumps(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, printed), done.stderr


def test_the_launcher_says_in_one_line_when_an_image_has_nothing_to_run(
    make_image,  # type: ignore[no-untyped-def]
    runtime: str,  # noqa: F811
) -> None:
    config = {
        "run": [runtime, "run", "--rm"], "image": make_image(), "qualify": runtime == "podman",
        "helper": HELPER_MOUNT,
        "helper_args": [], "command": [],
    }  # fmt: skip
    argv = [sys.executable, "-I", "-S", imagelaunch.__file__, json.dumps(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == imagelaunch.FAILED
    assert done.stderr.endswith("has no ENTRYPOINT or CMD to run\n"), done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.skipif(landlock_abi() < LANDLOCK_SCOPE_ABI, reason="needs Landlock scoping (6.12)")
@pytest.mark.parametrize("node", ["strict"], indirect=True)
def test_a_container_cannot_reach_another_tasks_abstract_socket(
    node: NetNode,  # noqa: F811
    docker_node: NetNode,  # noqa: F811
    make_image,  # type: ignore[no-untyped-def]
) -> None:
    """The container is the runtime's process, outside the sandbox and its Landlock domain, and
    abstract sockets belong to the network namespace: in the node's network a container reached
    every other task's (NCCL's among them). The helper scopes it; its own sockets still work."""
    net = docker_node
    name = f"fairgpu-test-{uuid.uuid4().hex}"
    listener = TASK + 1
    net.runner.start(
        spec(listener, [PY, "-c", ABSTRACT, "listen", name], gpus=[], network="host", **RIVAL)
    )
    ready = net.confinement.task_dir(listener) / "ready"
    wait_for(lambda: ready.exists() or net._ended(listener), 30)
    assert ready.exists(), net.result(listener)
    own = f"fairgpu-test-{uuid.uuid4().hex}"
    probe = spec(
        TASK, ["/bb/probe", own, name], image=make_image(), gpus=[], network="host", **ACME
    )
    net.runner.start(probe)
    result = net.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    assert result["log"] == "own: allowed\nother: Operation not permitted\n", result
    net.runner.stop(listener, grace_s=0, reason="done")
    assert "own connect allowed" in net.result(listener)["log"]


def test_a_container_task_runs_under_the_runtimes_seccomp_profile_alone(
    node: NetNode,  # noqa: F811
    docker_node: NetNode,  # noqa: F811
    make_image,  # type: ignore[no-untyped-def]
) -> None:
    """docker and podman confine their container with their default profile (the agent never
    passes `seccomp=unconfined`), and the agent adds no filter of its own (agents/seccomp.py is the
    sandbox's, and the container runs outside the sandbox): one filter, the runtime's."""
    probe = spec(
        TASK,
        ["/bb/busybox", "grep", "^Seccomp", "/proc/self/status"],
        image=make_image(),
        gpus=[],
        network="host",
        **ACME,
    )
    docker_node.runner.start(probe)
    result = docker_node.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    assert result["log"].split() == ["Seccomp:", "2", "Seccomp_filters:", "1"], result


def test_a_short_name_runs_the_image_docker_names_never_another_registrys(
    docker_node: NetNode,  # noqa: F811
    make_image,  # type: ignore[no-untyped-def]
    runtime: str,  # noqa: F811
) -> None:
    """podman matched a short name in its store against any image whose name ends the same
    way, from any registry: once another org's `quay.io/.../trainer:T` was on the node, a job
    naming `trainer:T` (docker: docker.io/library/trainer:T) ran it, with the job's variables
    and data. Named as docker names it, the image is not on this node and cannot be pulled
    here (no registry is reachable): the task fails to start, on docker and podman alike."""
    net = docker_node
    tail = f"trainer:{uuid.uuid4().hex[:12]}"
    theirs = f"quay.io/fairgpu-test-other/{tail}"
    made = make_image('CMD ["/bb/busybox", "echo", "another org\'s image"]')
    subprocess.run([runtime, "tag", made, theirs], check=True, capture_output=True)
    try:
        net.runner.start(spec(TASK, [], image=tail, gpus=[], network="host", **ACME))
        result = net.result(TASK, timeout_s=90)
    finally:
        subprocess.run([runtime, "rmi", theirs], capture_output=True)
    assert "another org's image" not in result["log"], result
    assert result["exit_code"] == imagelaunch.FAILED, result
    assert f"cannot pull the image docker.io/library/{tail}" in result["log"] or (
        runtime == "docker" and f"cannot pull the image {tail}" in result["log"]
    ), result
