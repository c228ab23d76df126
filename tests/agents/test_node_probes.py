"""A hostile task against the node's kernel and another org's task, beyond the walls that
tests/agents/test_isolation.py holds: performance events, BPF, userfaultfd, io_uring, the
node's sysctls and /sys, POSIX message queues, and the limits a task inherits. Each probe runs
as an org's uid in the strict sandbox (real processes, as root); what a task can still do and
why is in docs/ISOLATION.md ("Kernel settings", "What remains shared")."""

from __future__ import annotations

import json
import logging
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.cgroups import HugePool, node_pid_space
from agents.kernelcheck import kernel_exposures, unbounded_huge_pages
from agents.netwall import cgroup2_mount
from tests.agents.helpers import spec, wait_for
from tests.agents.test_isolation import ACME, RIVAL, Node, python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def sysctl(name: str) -> int:
    return int(Path("/proc/sys", name).read_text().split()[0])


KERNEL_PROBE = r"""
import ctypes, json, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
AGENT, OTHER = int(sys.argv[1]), int(sys.argv[2])
def errno_of(result):
    return "allowed" if result >= 0 else os.strerror(ctypes.get_errno())
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return exc.strerror
def rewrite(path):  # writes back what is there: harmless should it be allowed
    with open(path) as f:
        value = f.read()
    with open(path, "w") as f:
        f.write(value.split("[")[-1].split("]")[0] if "[" in value else value)
class PerfAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("config", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 112)]
def perf(pid, cpu):  # PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK
    attr = PerfAttr(1, 128, 0)
    return errno_of(libc.syscall(298, ctypes.byref(attr), pid, cpu, -1, 0))
class BpfAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("rest", ctypes.c_uint8 * 120)]
insns = (ctypes.c_uint64 * 2)(0xB7, 0x95)  # r0 = 0; exit
licence = ctypes.c_char_p(b"GPL")
prog = BpfAttr(1, 2, ctypes.addressof(insns), ctypes.cast(licence, ctypes.c_void_p).value)
ring = (ctypes.c_uint8 * 120)()
print(json.dumps({
    "perf_agent": perf(AGENT, -1),
    "perf_other_org": perf(OTHER, -1),
    "perf_cpu_wide": perf(-1, 0),
    "bpf_prog_load": errno_of(libc.syscall(321, 5, ctypes.byref(prog), 128)),
    "userfaultfd_kernel_faults": errno_of(libc.syscall(323, 0)),
    "userfaultfd_user_faults": errno_of(libc.syscall(323, 1)),  # UFFD_USER_MODE_ONLY
    "io_uring": errno_of(libc.syscall(425, 4, ctypes.byref(ring))),
    "sys": attempt(lambda: rewrite("/sys/kernel/mm/transparent_hugepage/enabled")),
    "proc_sys": attempt(lambda: rewrite("/proc/sys/kernel/perf_event_paranoid")),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
}))
"""


def kernel_probe(node: Node) -> dict[str, object]:
    """What the probe's task (rival) finds, with another org's task (acme) running beside it."""
    node.runner.start(spec(1, ["sleep", "60"], **ACME))
    wait_for(lambda: len(node.task_pids(1)) == 1)
    [other] = node.task_pids(1)
    result = node.run(2, [*python(KERNEL_PROBE), str(os.getpid()), str(other)], **RIVAL)
    node.runner.stop(1, grace_s=0, reason="done")
    node.finish(1)
    tried: dict[str, object] = json.loads(result["log"].strip().splitlines()[-1])
    return tried


def test_the_seccomp_filter_refuses_the_kernels_riskiest_calls_whatever_the_sysctls(
    node: Node,
) -> None:
    tried = kernel_probe(node)
    not_permitted = "Operation not permitted"
    for name in ("perf_agent", "perf_other_org", "perf_cpu_wide", "bpf_prog_load"):
        assert tried.pop(name) == not_permitted, name
    assert tried.pop("userfaultfd_kernel_faults") == not_permitted
    assert tried.pop("userfaultfd_user_faults") == not_permitted
    assert tried.pop("io_uring") == "Function not implemented"  # as a kernel without it
    assert tried.pop("sys") == tried.pop("proc_sys") == "Permission denied"
    assert tried == {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def test_a_task_cannot_watch_the_agent_nor_another_org_nor_tune_the_kernel(
    tmp_path: Path,
) -> None:
    """With `--seccomp off`, where the uid's rights and the node's sysctls decide."""
    node = Node(tmp_path, seccomp=False)
    try:
        tried = kernel_probe(node)
    finally:
        node.close()
    denied = "Permission denied"
    # Another uid's process: ptrace's rule, whatever perf_event_paranoid says.
    assert tried["perf_agent"] == denied
    assert tried["perf_other_org"] == denied
    # The sysctls decide the rest; the agent warns at start where they leave it open.
    assert (tried["perf_cpu_wide"] == denied) is (sysctl("kernel/perf_event_paranoid") >= 1)
    not_permitted = "Operation not permitted"
    bpf_off = sysctl("kernel/unprivileged_bpf_disabled") >= 1
    assert (tried["bpf_prog_load"] == not_permitted) is bpf_off
    uffd_off = sysctl("vm/unprivileged_userfaultfd") == 0
    assert (tried["userfaultfd_kernel_faults"] == not_permitted) is uffd_off
    # Open without the seccomp filter (user-mode userfaultfd and io_uring reach nothing of
    # another task's, but widen the kernel a task can attack).
    assert tried["userfaultfd_user_faults"] == "allowed"
    assert (tried["io_uring"] == "allowed") is (sysctl("kernel/io_uring_disabled") == 0)
    assert tried["sys"] == denied
    assert tried["proc_sys"] == denied
    # It inherits the agent's open file limit: what fs.file-max is checked against.
    assert tried["nofile"] == resource.getrlimit(resource.RLIMIT_NOFILE)[1]


MQUEUE = """
import ctypes, os, sys
librt = ctypes.CDLL("librt.so.1", use_errno=True)
flags = os.O_CREAT | os.O_RDWR if sys.argv[1] == "make" else os.O_RDWR
queue = librt.mq_open(b"/fairgpu-probe", flags, 0o666, None)
print("opened" if queue >= 0 else os.strerror(ctypes.get_errno()), flush=True)
"""


def test_posix_message_queues_are_the_tasks_own(node: Node) -> None:
    """A queue lives in its IPC namespace (each task's own), with or without /dev/mqueue."""
    node.runner.start(spec(1, [*python(MQUEUE + "import time; time.sleep(60)"), "make"], **ACME))
    wait_for(lambda: "opened" in node.state.read_log(node.runner.records[1]).decode())
    found = node.run(2, [*python(MQUEUE), "find"], **RIVAL)
    assert found["log"].strip() == "No such file or directory"
    mine = node.run(3, [*python(MQUEUE), "find"], **ACME)  # one org's tasks are apart too
    assert mine["log"].strip() == "No such file or directory"
    node.runner.stop(1, grace_s=0, reason="done")
    node.finish(1)


def test_weak_kernel_settings_are_named(tmp_path: Path) -> None:
    for name, value in {
        "kernel/perf_event_paranoid": "-1",
        "kernel/unprivileged_bpf_disabled": "0",
        "vm/unprivileged_userfaultfd": "1",
        "fs/file-max": "2466290",
        "kernel/core_pattern": "|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(value + "\n")
    found = kernel_exposures(tasks_pids=24_576, nofile=20_000, proc_sys=tmp_path)
    assert [line.split(" is ")[0].split(" pipes ")[0] for line in found] == [
        "kernel.perf_event_paranoid",
        "kernel.unprivileged_bpf_disabled",
        "vm.unprivileged_userfaultfd",
        "fs.file-max",
        "kernel.core_pattern",
    ]
    assert "CPU-wide performance events" in found[0]
    assert "up to 491520000 files" in found[3]
    assert "to /usr/lib/systemd/systemd-coredump: " in found[4]
    for name, value in {
        "kernel/perf_event_paranoid": "2",
        "kernel/unprivileged_bpf_disabled": "2",
        "vm/unprivileged_userfaultfd": "0",
        "fs/file-max": "9223372036854775807",
        "kernel/core_pattern": "core",
    }.items():
        (tmp_path / name).write_text(value + "\n")
    assert kernel_exposures(tasks_pids=24_576, nofile=20_000, proc_sys=tmp_path) == []
    # Unreadable: nothing claimed.
    assert kernel_exposures(tasks_pids=None, nofile=1, proc_sys=tmp_path / "none") == []


def test_a_strict_agent_warns_of_this_nodes_weak_kernel_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agents.isolation"):
        n = Node(tmp_path)
    try:
        expected = kernel_exposures(
            tasks_pids=n.confinement.tasks_pids or node_pid_space(),
            nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        )
        logged = [r.getMessage() for r in caplog.records if r.name == "agents.isolation"]
        assert [line for line in logged if line in expected] == expected
    finally:
        n.close()


def test_huge_pages_a_task_could_map_unbounded_are_named() -> None:
    pools = {"2MB": HugePool(2**21, 8), "1GB": HugePool(2**30, 0)}
    line = unbounded_huge_pages(pools, limited=False)
    assert line is not None
    assert "huge pages (8 of 2MB) and no hugetlb cgroup controller" in line
    assert unbounded_huge_pages(pools, limited=True) is None
    assert unbounded_huge_pages({"1GB": HugePool(2**30, 0)}, limited=False) is None


def test_this_hosts_task_cgroups_bound_huge_pages(tmp_path: Path) -> None:
    """Wherever the host has the hugetlb controller (v2, a v1 mount, or the unified hierarchy
    of a "hybrid" host, as the test machine: tasks then join it), tasks are bounded by it."""
    n = Node(tmp_path)
    try:
        assert n.confinement.cgroups is not None
        unified = cgroup2_mount()
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        expected = any(
            line.split()[2] == "cgroup" and "hugetlb" in line.split()[3].split(",")
            for line in mounts
        ) or (
            unified is not None
            and "hugetlb" in (unified / "cgroup.controllers").read_text().split()
        )
        assert n.confinement.cgroups.limits_hugetlb is expected
    finally:
        n.close()


USERNS_BIND = """
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
uid = os.getuid()
made = libc.unshare(0x10000000)  # CLONE_NEWUSER: the kernel lets any user make one
if made == 0:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
def bind(port):
    try:
        socket.socket().bind(("0.0.0.0", port))
        return "bound"
    except OSError as exc:
        return exc.strerror
start = int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read())
print(json.dumps({"userns": made, "root_inside": os.getuid() == 0, "privileged": bind(start - 1)}))
"""


def test_a_task_root_in_a_user_namespace_of_its_own_still_cannot_bind_a_privileged_port(
    node: Node,
) -> None:
    """The agent's connections leave from ports below ip_unprivileged_port_start
    (agents/srcport.py): CAP_NET_BIND_SERVICE in a user namespace the task made does not
    count for the node's network, which the node's own user namespace owns."""
    result = node.run(1, python(USERNS_BIND), **ACME)
    tried = json.loads(result["log"].strip().splitlines()[-1])
    assert tried["privileged"] == "Permission denied"
    if tried["userns"] == 0:  # where the host lets tasks make one (this one does)
        assert tried["root_inside"]
