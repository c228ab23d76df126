"""Strict tasks' seccomp filter (agents/seccomp.py), with real processes as root: what a task
may not call gets the filter's errno, what training jobs do still runs, and neither the task
nor anything it starts can shed the filter."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agents import ptyhost, sandbox, seccomp, shells, streams
from agents.isolation import Confinement, IsolationUnavailable, seccomp_programs
from agents.runner import Runner
from tests.agents.helpers import require_cgroups, spec, wait_for
from tests.agents.test_isolation import ACME, PY, Node, node, python  # noqa: F401 - node: fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")

MACHINE = os.uname().machine
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
NAMESPACES = {
    "NEWNS": 0x20000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000, "NEWIPC": 0x08000000,
    "NEWUSER": CLONE_NEWUSER, "NEWPID": 0x20000000, "NEWNET": 0x40000000, "NEWTIME": 0x80,
}  # fmt: skip


def number(name: str) -> int | None:
    return seccomp._NUMBERS[name][tuple(seccomp.ARCHITECTURES).index(MACHINE)]


# Makes each call (name, number, arguments) in a child of its own, which exits with the errno
# (0: allowed): a call let through changes nothing the next one sees.
PROBE = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
seen = {}
for name, nr, args in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        done = libc.syscall(nr, *(ctypes.c_ulong(a) for a in args))
        os._exit(0 if done >= 0 else ctypes.get_errno())
    seen[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(seen))
"""


def calls() -> tuple[list[tuple[str, int, list[int]]], dict[str, int]]:
    """Every call the filter refuses on this machine, with the errno it answers."""
    made: list[tuple[str, int, list[int]]] = []
    expected: dict[str, int] = {}

    def call(name: str, label: str, args: list[int], answer: int) -> None:
        if (nr := number(name)) is not None:
            made.append((label, nr, args))
            expected[label] = answer

    for name in (*seccomp.REFUSED, *seccomp.MOUNTING):
        call(name, name, [0] * 6, errno.EPERM)
    for name in seccomp.ABSENT:
        call(name, name, [0] * 6, errno.ENOSYS)
    for flag, value in NAMESPACES.items():
        call("unshare", f"unshare {flag}", [value], errno.EPERM)
    call("clone", "clone NEWUSER", [CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0], errno.EPERM)
    call("personality", "personality PER_BSD", [6], errno.EPERM)
    call("personality", "personality READ_IMPLIES_EXEC", [0x0400000], errno.EPERM)
    for family in (38, 40, 21, 30):  # AF_ALG, AF_VSOCK, AF_RDS, AF_TIPC
        call("socket", f"socket {family}", [family, 1, 0], errno.EAFNOSUPPORT)
    call("socketpair", "socketpair AF_TIPC", [30, 5, 0, 0], errno.EAFNOSUPPORT)
    return made, expected


def test_each_refused_call_gets_the_filters_errno_in_a_task(node: Node) -> None:  # noqa: F811
    made, expected = calls()
    result = node.run(1, [PY, "-c", PROBE, json.dumps(made)], **ACME)
    assert result["exit_code"] == 0, result
    seen = json.loads(result["log"])
    assert {name: errno.errorcode.get(e, e) for name, e in seen.items()} == {
        name: errno.errorcode[e] for name, e in expected.items()
    }


WORKLOAD = r"""
import ctypes, mmap, os, socket, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
done = []
threads = [threading.Thread(target=done.append, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print("threads", len(done))
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print("pipeline", subprocess.run("seq 1000 | sort -rn | head -1", shell=True,
      capture_output=True, text=True).stdout.strip())
a, b = socket.socketpair()
a.sendall(b"unix")
print("socketpair", b.recv(4).decode())
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
client.sendall(b"inet")
print("tcp", peer.recv(4).decode())
socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
print("inet6 netlink ok")
area = mmap.mmap(-1, 1 << 20)
area[:4] = b"page"
area.madvise(mmap.MADV_DONTNEED)
print("mmap", len(area))
fd = os.memfd_create("ipc")
os.write(fd, b"memfd")
print("memfd", os.pread(fd, 5, 0).decode())
child = subprocess.Popen(["sleep", "30"])
pidfd = os.pidfd_open(child.pid)
print("pidfd", pidfd >= 0)
traced = libc.ptrace(16, child.pid, 0, 0)  # PTRACE_ATTACH, as py-spy and gdb do
os.waitpid(child.pid, 0)
print("ptrace", traced, libc.ptrace(17, child.pid, 0, 0))  # PTRACE_DETACH
child.kill(); child.wait()
print("unshare files", libc.unshare(0x400))
print("personality", libc.personality(0xFFFFFFFF) >= 0, libc.personality(0x40000) >= 0)  # gdb
print("affinity", len(os.sched_getaffinity(0)) > 0)
print(open("/proc/self/status").read().split("Seccomp:")[1].split()[0])
"""


def test_an_ordinary_workload_runs_under_the_filter(node: Node) -> None:  # noqa: F811
    """Threads (clone3 refused: glibc falls back to clone), fork, a shell pipeline, unix,
    TCP, IPv6 and netlink sockets, mmap and madvise, memfd and pidfds (CUDA IPC's), as a
    training job's start does them; and ptrace of its own child (debuggers, py-spy), which the
    filter leaves to the kernel's own limits (the task's uid, Yama, its Landlock domain)."""
    result = node.run(1, python(WORKLOAD), **ACME)
    assert result["exit_code"] == 0, result
    assert result["log"].splitlines() == [
        "threads 8", "fork 7", "pipeline 1000", "socketpair unix", "tcp inet",
        "inet6 netlink ok", f"mmap {1 << 20}", "memfd memfd", "pidfd True", "ptrace 0 0",
        "unshare files 0",
        "personality True True", "affinity True", "2",
    ], result  # fmt: skip


# A filter of the task's own allowing everything, then a program it execs through a shell:
# filters stack, and the kernel takes the most restrictive answer.
LIFT = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
allow = struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)
buffer = ctypes.create_string_buffer(allow, len(allow))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(1, ctypes.cast(buffer, ctypes.c_void_p))
print("own filter", libc.prctl(22, 2, ctypes.byref(prog), 0, 0), flush=True)
os.execvp("sh", ["sh", "-c", 'exec "$0" -c "$1"', sys.executable, sys.argv[1]])
"""
AFTER = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
for line in open("/proc/self/status"):
    if line.startswith("Seccomp"):
        print(line.split()[0], line.split()[1])
print("unshare", errno.errorcode[ctypes.get_errno()] if libc.unshare(0x10000000) else "allowed")
"""


def test_the_filter_binds_what_the_task_starts_and_cannot_be_lifted(node: Node) -> None:  # noqa: F811
    result = node.run(1, [PY, "-c", LIFT, AFTER], **ACME)
    assert result["exit_code"] == 0, result
    assert result["log"].splitlines() == [
        "own filter 0", "Seccomp: 2", "Seccomp_filters: 2", "unshare EPERM",
    ], result  # fmt: skip


@pytest.mark.skipif(MACHINE != "x86_64", reason="x32 is an x86_64 ABI")
def test_a_call_through_another_abi_ends_the_process(node: Node) -> None:  # noqa: F811
    """x32's numbers (the x86_64 ones with bit 30) name other calls than the filter's table:
    the process is ended (SIGSYS) rather than checked against the wrong one."""
    code = (
        "import ctypes, subprocess, sys\n"
        "child = 'import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39); print(\"lived\")'\n"
        "print(subprocess.run([sys.executable, '-c', child]).returncode)\n"
    )
    result = node.run(1, python(code), **ACME)
    assert result["log"] == "-31\n", result  # SIGSYS


def test_with_seccomp_off_a_task_makes_every_call_its_uid_allows(tmp_path: Path) -> None:
    require_cgroups()
    off = Node(tmp_path, seccomp=False)
    try:
        code = (
            "import ctypes\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n"
            "print(libc.unshare(0x10000000))\n"
        )
        result = off.run(1, python(code), **ACME)
        assert result["log"] == "0\n0\n", result
    finally:
        off.close()


def test_an_apptainer_task_may_make_user_namespaces_and_nothing_more() -> None:
    """An image task runs its container inside the sandbox only under apptainer, whose
    containers are user namespaces the task makes: its filter lets those through, and the
    mounts inside them, and refuses the rest as any task's does."""
    program = seccomp.program(MACHINE, user_namespaces=True)
    code = (
        "import ctypes, errno, os, sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from agents.sandbox import filter_system_calls\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.prctl(38, 1, 0, 0, 0)\n"
        "os.setresuid(65534, 65534, 65534)\n"
        "filter_system_calls(bytes.fromhex(sys.argv[1]))\n"
        "def err(result):\n"
        "    return 'allowed' if result >= 0 else errno.errorcode[ctypes.get_errno()]\n"
        f"print('bpf', err(libc.syscall({number('bpf')}, 0, 0, 0)))\n"
        "print('userns', err(libc.unshare(0x10000000 | 0x20000)))\n"
        "print('mount', err(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, program.hex(), root],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.stdout.splitlines() == ["bpf EPERM", "userns allowed", "mount allowed"], result


def test_a_machine_without_the_filters_numbers_needs_seccomp_off() -> None:
    with pytest.raises(seccomp.SeccompUnavailable, match="--seccomp off"):
        seccomp.program("riscv64")


def test_the_image_tasks_filter_is_the_one_allowing_user_namespaces(tmp_path: Path) -> None:
    require_cgroups()
    strict = Node(tmp_path)
    try:
        plain = strict.confinement.seccomp_program(spec(1))
        image = strict.confinement.seccomp_program(spec(2, image="example/image"))
    finally:
        strict.close()
    assert plain == seccomp.program(MACHINE).hex()
    assert image == seccomp.program(MACHINE, user_namespaces=True).hex()


def test_the_agent_says_at_start_which_filter_its_tasks_get(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_cgroups()
    caplog.set_level(logging.INFO, logger="agents.isolation")
    for seccomp_on, said in (
        (True, f"seccomp filter ({MACHINE}): refused bpf"),
        (False, "seccomp off"),
    ):
        caplog.clear()
        (directory := tmp_path / str(seccomp_on)).mkdir()
        started = Node(directory, seccomp=seccomp_on)
        started.close()
        assert said in caplog.text


# A new shell's view, as `name=value` lines (the terminal's echo of the command has `$` in it).
SHELL_UNSHARE = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
print("allowed" if libc.unshare(0x10000000) == 0 else errno.errorcode[ctypes.get_errno()])
"""


def _new_shell_says(runner: Runner, task_id: int, script: Path) -> dict[str, str]:
    """Open a new shell in the task as `fairgpu attach --new` does (agents/shells.py, with the
    agent's own connection to its terminal host, agents/streams.py) and ask it for its filter
    and a call the filter refuses."""
    typed = (
        'echo "seccomp=$(grep ^Seccomp: /proc/self/status | cut -f2)"\r'
        f'echo "unshare=$({PY} {script})"\r'
        "exit\r"
    )

    async def session() -> bytes:
        opener = shells.opener(runner, task_id)
        assert opener is not None
        shell = await opener()
        try:
            reader, writer = await streams._connect_terminal(shell.directory)
            writer.write(ptyhost.frame(ptyhost.FRAME_RESIZE, struct.pack(">HH", 24, 80)))
            writer.write(ptyhost.frame(ptyhost.FRAME_DATA, typed.encode()))
            data = await reader.read()  # until the host closes: after the shell's exit
            writer.close()
            await writer.wait_closed()
        finally:
            await shell.close()
        frames = []
        while data:
            kind, length = ptyhost.HEADER.unpack_from(data)
            frames.append((kind, data[ptyhost.HEADER.size : ptyhost.HEADER.size + length]))
            data = data[ptyhost.HEADER.size + length :]
        assert frames[-1] == (ptyhost.FRAME_EXIT, b"0"), frames
        return b"".join(payload for kind, payload in frames if kind == ptyhost.FRAME_DATA)

    out = asyncio.run(session()).decode(errors="replace")
    return dict(re.findall(r"^(\w+)=([^$\r\n]*)\r?$", out, re.MULTILINE))


@pytest.mark.parametrize(("started_on", "restarted_on"), [(True, False), (False, True)])
def test_a_new_shell_gets_the_filter_its_task_started_under_whatever_the_agent_has_now(
    tmp_path: Path, started_on: bool, restarted_on: bool
) -> None:
    """An agent restarted with the other `--seccomp` opened new shells into the tasks it
    adopted under its own setting: unfiltered shells into filtered tasks."""
    require_cgroups()
    started = Node(tmp_path, seccomp=started_on)
    try:
        script = started.data / "acme" / "unshare.py"
        script.write_text(SHELL_UNSHARE)
        script.chmod(0o644)
        started.runner.start(spec(1, ["sleep", "300"], **ACME))
        wait_for(lambda: started.runner.records[1].state == "running" and started.task_pids(1))
        # The agent restarts on the same state directory and cgroups, `--seccomp` flipped.
        config = dataclasses.replace(started.confinement.config, seccomp=restarted_on)
        restarted = Runner(started.state, confinement=Confinement(config, total_gpus=4))
        restarted.recover()
        assert restarted.records[1].state == "running"
        seen = _new_shell_says(restarted, 1, script)
    finally:
        started.close()
    if started_on:
        assert seen == {"seccomp": "2", "unshare": "EPERM"}
    else:
        assert seen == {"seccomp": "0", "unshare": "allowed"}


def test_the_agent_tries_the_filter_at_start_as_the_sandbox_installs_it() -> None:
    for user_namespaces in (False, True):
        program = seccomp.program(MACHINE, user_namespaces=user_namespaces)
        assert sandbox.filter_refusal(program) == 0
    before = _own_filters()
    assert set(seccomp_programs(True)) == {False, True}
    assert _own_filters() == before  # the probes' filters stayed in their children


def _own_filters() -> list[str]:
    with open("/proc/self/status") as status:
        return [line for line in status if line.startswith("Seccomp")]


def test_a_kernel_refusing_the_filters_flags_needs_seccomp_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linux 4.14 to 4.16 has seccomp filters but not SPEC_ALLOW: every strict task failed at
    its start. An undefined flag is refused as that one is there (EINVAL)."""
    monkeypatch.setattr(sandbox, "SECCOMP_FLAGS", 1 << 30)
    with pytest.raises(IsolationUnavailable) as refused:
        seccomp_programs(True)
    assert str(refused.value) == (
        "this kernel refuses the tasks' seccomp filter (EINVAL: Invalid argument; its "
        "SPEC_ALLOW flag needs Linux 4.17 or later): pass --seccomp off to run tasks without one"
    )
    assert seccomp_programs(False) == {}  # what it says to do starts
