"""Kernel settings that open a strict node to its tasks, read when the agent starts.

The agent confines tasks with uids, cgroups and namespaces; a few node-wide sysctls decide what
a task can still do beyond them, and they are the operator's (the agent never changes a host
sysctl). Each setting found weaker than it should be is one warning line at start, saying what
a task could do and what to set (docs/ISOLATION.md, "Kernel settings").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from agents.cgroups import HugePool

PROC_SYS = Path("/proc/sys")


def _read_int(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(path.read_text().split()[0])
    return None


def kernel_exposures(
    *, tasks_pids: int | None, nofile: int, proc_sys: Path = PROC_SYS
) -> list[str]:
    """One line per weak setting. `tasks_pids`: the processes and threads all tasks may hold
    together; `nofile`: the RLIMIT_NOFILE (hard) each of them inherits."""
    found: list[str] = []
    paranoid = _read_int(proc_sys / "kernel/perf_event_paranoid")
    if paranoid is not None and paranoid < 2:
        what = (
            "CPU-wide performance events, every process of the node's included (other orgs')"
            if paranoid < 1
            else "the kernel's own performance events (a side channel into the kernel)"
        )
        found.append(
            f"kernel.perf_event_paranoid is {paranoid}: tasks may watch {what}; set it to 2"
        )
    if _read_int(proc_sys / "kernel/unprivileged_bpf_disabled") == 0:
        found.append(
            "kernel.unprivileged_bpf_disabled is 0: tasks may load BPF programs into the "
            "node's kernel; set it to 2"
        )
    if _read_int(proc_sys / "vm/unprivileged_userfaultfd") == 1:
        found.append(
            "vm.unprivileged_userfaultfd is 1: tasks may stall the kernel on their page faults "
            "(a tool of kernel exploits); set it to 0"
        )
    file_max = _read_int(proc_sys / "fs/file-max")
    if file_max is not None and tasks_pids is not None and tasks_pids * nofile > file_max:
        found.append(
            f"fs.file-max is {file_max}: the node's tasks may open up to {tasks_pids * nofile} "
            f"files (RLIMIT_NOFILE {nofile} per process), and a task holding the node's last "
            "leaves every other org's task unable to open one (ENFILE); raise it (systemd sets "
            "9223372036854775807: each open file is charged to its task's memory)"
        )
    with contextlib.suppress(OSError):
        pattern = (proc_sys / "kernel/core_pattern").read_text().strip()
        if pattern.startswith("|"):
            helper = pattern[1:].split()[0] if pattern[1:].split() else "?"
            found.append(
                f"kernel.core_pattern pipes core dumps to {helper}: a task that crashes has "
                "its memory and environment, its secret variables among them, written by it "
                "to the node's disk outside the task's directory (systemd-coredump: "
                "/var/lib/systemd/coredump and the journal; apport: /var/crash), kept after the "
                "task; set a relative pattern (`core`: into the task's working directory)"
            )
    return found


def unbounded_huge_pages(pools: Mapping[str, HugePool], *, limited: bool) -> str | None:
    """The line to log where the node has huge pages and task cgroups cannot bound them."""
    held = {size: pool.pages for size, pool in pools.items() if pool.pages > 0}
    if limited or not held:
        return None
    sizes = ", ".join(f"{pages} of {size}" for size, pages in held.items())
    return (
        f"this node has huge pages ({sizes}) and no hugetlb cgroup controller for tasks: the "
        "memory controller does not charge them, so one task may map them all; enable "
        "hugetlb (cgroup v2, or a v1 mount)"
    )
