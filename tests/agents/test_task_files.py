"""What a strict task writes outside its own directory is its org's alone, however the agent
was started (real processes, as root, two orgs on one node).

A node may have directories every user can write that the sandbox does not replace with one of
its own (a local NVMe `/scratch` with mode 1777, a site's shared cache): tasks of different orgs
meet there. The systemd unit's `UMask=0027` made the files tasks created there unreadable to
other uids; an agent started elsewhere (the Kubernetes DaemonSet, a root shell, `make demo`)
passed on umask 0022, and another org's task read them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents import ptyhost, shells, streams
from tests.agents.helpers import spec, wait_for
from tests.agents.test_isolation import ACME, RIVAL, Node, node, python  # noqa: F401 - node: fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")

TASK_UMASK = "0o27"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A world-writable directory of the node outside the sandbox's private ones (which hide
    anything under /tmp), as a local `/scratch` is."""
    directory = Path(tempfile.mkdtemp(prefix="fairgpu-test-scratch-", dir="/srv"))
    directory.chmod(0o1777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The agent started with the usual umask of a root shell or a container."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.usefixtures("loose_umask")
def test_another_org_cannot_read_what_a_task_leaves_in_a_shared_directory(
    node: Node,  # noqa: F811
    scratch: Path,
) -> None:
    written = node.run(
        1,
        python(
            "import os\n"
            "mask = os.umask(0)\n"
            "os.umask(mask)\n"
            "print('umask', oct(mask))\n"
            f"open('{scratch}/checkpoint', 'w').write('acme weights')\n"
            f"os.mkdir('{scratch}/run')\n"
            f"open('{scratch}/run/metrics', 'w').write('acme loss')\n"
        ),
        **ACME,
    )
    assert (written["state"], written["exit_code"]) == ("exited", 0), written
    assert written["log"].split() == ["umask", TASK_UMASK]
    assert (scratch / "checkpoint").stat().st_mode & 0o777 == 0o640
    assert (scratch / "run").stat().st_mode & 0o777 == 0o750
    probe = f"""
import os
for attempt in (lambda: open('{scratch}/checkpoint').read(),
                lambda: os.listdir('{scratch}/run'),
                lambda: open('{scratch}/run/metrics').read()):
    try:
        print(attempt())
    except OSError as exc:
        print(type(exc).__name__)
"""
    read = node.run(2, python(probe), **RIVAL)
    assert read["log"].split() == ["PermissionError"] * 3, read


@pytest.mark.usefixtures("loose_umask")
def test_a_new_shell_in_a_task_gets_the_tasks_umask(node: Node) -> None:  # noqa: F811
    node.runner.start(spec(1, ["sleep", "300"], **ACME))
    wait_for(lambda: node.runner.records[1].state == "running" and bool(node.task_pids(1)))

    async def session() -> bytes:
        opener = shells.opener(node.runner, 1)
        assert opener is not None
        shell = await opener()
        try:
            reader, writer = await streams._connect_terminal(shell.directory)
            writer.write(ptyhost.frame(ptyhost.FRAME_RESIZE, struct.pack(">HH", 24, 80)))
            writer.write(ptyhost.frame(ptyhost.FRAME_DATA, b'echo "mask=$(umask)"\rexit\r'))
            data = await reader.read()  # until the host closes, after the shell's exit
            writer.close()
            await writer.wait_closed()
        finally:
            await shell.close()
        return data

    out = asyncio.run(session()).decode(errors="replace")
    assert re.findall(r"mask=(\d+)\r?$", out, re.MULTILINE) == ["0027"], out


def test_another_org_cannot_read_a_tasks_cgroup(node: Node) -> None:  # noqa: F811
    """Every cgroup file is readable by any uid unless its directory says otherwise: another
    org's task read a task's pids (which hidepid hides), memory, CPU time and I/O pressure
    there while it ran, and listed the node's tasks."""
    node.runner.start(spec(1, ["sleep", "300"], **ACME))
    wait_for(lambda: node.runner.records[1].state == "running" and bool(node.task_pids(1)))
    group = node.confinement.cgroup(1)
    assert group is not None
    directories = [str(path.parent) for path in group.procs_files]
    # The parents' own files sum every task below them (memory, CPU time, pids, I/O,
    # pressure): a rival's figure was the parent's minus its own. Named here by root, as
    # the rival could name them from the kernel's documentation.
    summed = sorted(
        str(entry)
        for directory in {path.parent.parent for path in group.procs_files}
        for entry in directory.iterdir()
        if entry.is_file()
    )
    assert any(name.endswith(("memory.usage_in_bytes", "memory.current")) for name in summed)
    probe = f"""
import json, os
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({{
    "members": [attempt(lambda: open(d + "/cgroup.procs").read()) for d in {directories!r}],
    "stats": [attempt(lambda: os.listdir(d)) for d in {directories!r}],
    "tasks": [attempt(lambda: os.listdir(os.path.dirname(d))) for d in {directories!r}],
    "summed": {{f: attempt(lambda: open(f).read()) for f in {summed!r}}},
}}))
"""
    rival = node.run(2, python(probe), **RIVAL)
    tried = json.loads(rival["log"])
    assert set(tried["members"]) == set(tried["stats"]) == {"PermissionError"}, tried
    assert set(tried["tasks"]) == {"PermissionError"}, tried
    readable = [name for name, result in tried["summed"].items() if result != "PermissionError"]
    assert readable == [], readable
    # A task still reads its own cgroup (runtimes size themselves from their limits there).
    assert node.confinement.cgroups is not None
    own = [str(path.parent) for path in node.confinement.cgroups.task(3).procs_files]
    reads = f"""
import os
for d in {own!r}:
    members = open(d + "/cgroup.procs").read().split()
    print(str(os.getpid()) in members, "cgroup.procs" in os.listdir(d))
"""
    mine = node.run(3, python(reads), **ACME)
    assert mine["log"].split() == ["True"] * 2 * len(own), mine


SYSTEM_BUS = "/run/dbus/system_bus_socket"
JOURNAL = "/run/systemd/journal/socket"
SYSLOG = "/dev/log"


@pytest.fixture
def node_services() -> Iterator[None]:
    """The node's D-Bus system bus and journal sockets, made (and removed after) where this host
    has none: any uid may connect to them."""
    made: list[Path] = []
    held: list[socket.socket] = []
    try:
        for path, kind in ((SYSTEM_BUS, socket.SOCK_STREAM), (JOURNAL, socket.SOCK_DGRAM)):
            target = Path(path)
            if target.exists():
                continue  # the host's own: the probe only tries to reach it
            for parent in reversed(target.parents):
                if not parent.exists():
                    parent.mkdir()
                    made.append(parent)
            listener = socket.socket(socket.AF_UNIX, kind)
            listener.bind(path)
            if kind == socket.SOCK_STREAM:
                listener.listen(1)
            target.chmod(0o666)
            held.append(listener)
            made.append(target)
        if not os.path.lexists(SYSLOG):
            os.symlink(JOURNAL, SYSLOG)
            made.append(Path(SYSLOG))
        yield
    finally:
        for listener in held:
            listener.close()
        for path in reversed(made):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()


REACH_SERVICES = f"""
import socket
def attempt(kind, path):
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        s.connect(path)
        return "connected"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()
print(attempt(socket.SOCK_STREAM, {SYSTEM_BUS!r}),
      attempt(socket.SOCK_DGRAM, {JOURNAL!r}),
      attempt(socket.SOCK_DGRAM, {SYSLOG!r}))
"""


@pytest.mark.usefixtures("node_services")
def test_a_task_reaches_neither_the_system_bus_nor_the_journal(node: Node) -> None:  # noqa: F811
    """Tasks live in the agent's systemd unit. systemd answers any uid's GetUnitProcesses with
    every process of a unit, its command line read as root: another org's task read every
    task's command line there, past hidepid. Lines a task sent the journal read as the
    agent's own, and spent the agent's share of journald's rate limit."""
    # The test's own process reaches them: they are there to be reached.
    assert "connected" in python_here(REACH_SERVICES)
    result = node.run(1, python(REACH_SERVICES), **ACME)
    assert (result["state"], result["exit_code"]) == ("exited", 0), result
    assert "connected" not in result["log"], result


def python_here(code: str) -> str:
    return subprocess.run(
        python(code), capture_output=True, text=True, check=True, timeout=30
    ).stdout
