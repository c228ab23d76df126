"""The seccomp filter of strict tasks: the system calls a task may not make, as a BPF program.

The kernel is shared by every org's tasks on a node, and each system call a task can make is
kernel code it can attack. The filter refuses the calls a training job has no use for and that
widen that surface most: those reachable by any uid with a history of exploits (`bpf`,
`perf_event_open`, `userfaultfd`, `io_uring`, the key calls), those that make user namespaces
(inside one any uid holds every capability, and mounts filesystems, configures netfilter and
more), rare socket families, and the administrator's calls (modules, kexec, mount, swap,
reboot), which the uid already lacks, as a second wall. Everything else is allowed: a deny list,
because an allow list refuses what a job it was not written for needs (a new CUDA driver's
call, a library's fallback), and such a refusal fails another org's training in ways nobody
can tell from a bug. (docker's and containerd's profiles are allow lists, which their
maintainers extend for each kernel release; what they leave out is mostly what this refuses.)

Built by the agent (`program`, once per kind) and applied by agents/sandbox.py as the last step
before the task's command, after no_new_privs and Landlock. Standard library only, like the
sandbox: the agent hands the sandbox the program's bytes, which it installs with one prctl.
"""

from __future__ import annotations

import errno
import struct
import sys

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
# Classic BPF (linux/filter.h): load a word of seccomp_data, compare, return.
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_NR, _ARCH = 0, 4  # offsets in struct seccomp_data
_ARG_LOW = 16 if sys.byteorder == "little" else 20  # the low word of args[0]
X32_SYSCALL_BIT = 0x40000000

ARCHITECTURES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_*
"""The machines the filter knows the system call numbers of (os.uname().machine)."""

# (x86_64, aarch64); None where the architecture has no such call.
_NUMBERS: dict[str, tuple[int | None, int | None]] = {
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "lookup_dcookie": (212, 18),
    "fanotify_init": (300, 262),
    "syslog": (103, 116),
    "iopl": (172, None),
    "ioperm": (173, None),
    "uselib": (134, None),
    "_sysctl": (156, None),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "clone3": (435, 435),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "open_tree_attr": (467, 467),
    "setns": (308, 268),
    "unshare": (272, 97),
    "clone": (56, 220),
    "personality": (135, 92),
    "socket": (41, 198),
    "socketpair": (53, 199),
}

REFUSED = (
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon", "swapoff",
    "reboot", "acct", "quotactl", "quotactl_fd", "open_by_handle_at", "name_to_handle_at",
    "lookup_dcookie", "fanotify_init", "syslog", "iopl", "ioperm", "uselib", "_sysctl",
)  # fmt: skip
"""Refused with EPERM, whatever their arguments."""
ABSENT = ("io_uring_setup", "io_uring_enter", "io_uring_register", "clone3")
"""Refused with ENOSYS, as a kernel without them does: liburing's users fall back to plain
reads and writes, and glibc (2.34 and later) from clone3 to clone, whose flags the filter can
read (clone3's are behind a pointer it cannot follow)."""
MOUNTING = (
    "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "open_tree_attr", "setns",
)  # fmt: skip
"""Refused with EPERM, unless the task may make user namespaces (the only place an
unprivileged uid can mount or enter a namespace)."""
NAMESPACE_FLAGS = 0x7E020080
"""clone's and unshare's flags that make a namespace: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
NEWUSER, NEWPID, NEWNET and NEWTIME. Every one but NEWUSER needs a capability, which an
unprivileged uid only has inside a user namespace of its own."""
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0x40000, 0xFFFFFFFF)
"""What `personality` may set: Linux's (PER_LINUX, PER_LINUX32, with UNAME26 for old programs'
version checks) and the query, as docker's profile allows; and ADDR_NO_RANDOMIZE, which
docker's refuses: debuggers (gdb, rr) turn address randomisation off in the processes they
start, which are the task's own."""
SOCKET_FAMILIES_REFUSED = (
    3, 4, 5, 6, 8, 9, 11, 12, 13, 15, 19, 20, 21, 22, 23, 24, 25, 26, 29, 30, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 45,
)  # fmt: skip
"""Socket families refused with EAFNOSUPPORT (what a kernel without them says, so callers
fall back): AX.25, IPX, AppleTalk, NET/ROM, ATM, X.25, ROSE, DECnet, NetBEUI, PF_KEY, Econet,
RDS, SNA, IrDA, PPPoX, WAN pipe, LLC, CAN, TIPC, Bluetooth, IUCV, RxRPC, ISDN, Phonet,
IEEE 802.15.4, CAIF, AF_ALG, NFC, vsock, KCM, Qualcomm IPC router and MCTP: protocol stacks the
kernel loads on first use, most with a history of exploits, none of which a training job uses.
Unix, IPv4, IPv6, netlink (NCCL and RDMA's connection manager read interfaces through it),
packet (needs CAP_NET_RAW) and anything newer than this list stay allowed."""


class SeccompUnavailable(Exception):
    """The filter cannot be built for this machine; the message says what to do."""


def program(machine: str, *, user_namespaces: bool = False) -> bytes:
    """The filter for tasks on `machine`, as the kernel's struct sock_filter array.

    A call made through another architecture's entry (32-bit x86's `int 0x80`, x32) would
    carry numbers this filter does not know: it ends the process (SIGSYS) rather than be
    checked against the wrong table, or refused, which left a 32-bit program looping on an
    exit that failed. `user_namespaces`: allowed to make them, and to mount and enter
    namespaces (an apptainer container runs the task's processes in one)."""
    if machine not in ARCHITECTURES:
        raise SeccompUnavailable(
            f"no seccomp filter for {machine} (only {', '.join(ARCHITECTURES)}): "
            "pass --seccomp off to run tasks without one"
        )
    column = tuple(ARCHITECTURES).index(machine)

    def number(name: str) -> int | None:
        return _NUMBERS[name][column]

    code = _Assembler()
    code.load(_ARCH)
    code.jump(_JEQ, ARCHITECTURES[machine], false="kill")
    code.load(_NR)
    if machine == "x86_64":
        code.jump(_JGE, X32_SYSCALL_BIT, true="kill")
    refused = REFUSED if user_namespaces else REFUSED + MOUNTING
    for names, label in ((refused, "eperm"), (ABSENT, "enosys")):
        for name in names:
            if (nr := number(name)) is not None:
                code.jump(_JEQ, nr, true=label)
    code.jump(_JEQ, _nr(number("personality")), true="personality")
    code.jump(_JEQ, _nr(number("socket")), true="socket")
    code.jump(_JEQ, _nr(number("socketpair")), true="socket")
    if not user_namespaces:
        code.jump(_JEQ, _nr(number("unshare")), true="flags")
        code.jump(_JEQ, _nr(number("clone")), true="flags")
    code.ret(SECCOMP_RET_ALLOW)
    code.label("personality")
    code.load(_ARG_LOW)
    for value in PERSONALITIES:
        code.jump(_JEQ, value, true="allow")
    code.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    code.label("socket")
    code.load(_ARG_LOW)
    for family in SOCKET_FAMILIES_REFUSED:
        code.jump(_JEQ, family, true="eafnosupport")
    code.ret(SECCOMP_RET_ALLOW)
    code.label("flags")
    code.load(_ARG_LOW)
    code.jump(_JSET, NAMESPACE_FLAGS, true="eperm")
    code.label("allow")
    code.ret(SECCOMP_RET_ALLOW)
    code.label("eperm")
    code.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    code.label("enosys")
    code.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    code.label("eafnosupport")
    code.ret(SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT)
    code.label("kill")
    code.ret(SECCOMP_RET_KILL_PROCESS)
    return code.assemble()


def summary(machine: str) -> str:
    """What the filter refuses, for the agent's start-up line."""
    return (
        f"tasks run under a seccomp filter ({machine}): refused {', '.join(REFUSED)} "
        f"(EPERM); {', '.join(ABSENT)} (ENOSYS); {', '.join(MOUNTING)} and namespaces "
        "through clone and unshare (EPERM, but for apptainer's containers); personality "
        "other than Linux's; rare socket families (EAFNOSUPPORT); any other architecture's "
        "calls (SIGSYS)"
    )


def _nr(value: int | None) -> int:
    assert value is not None  # every architecture has these
    return value


class _Assembler:
    """Classic BPF with forward jumps to labels, resolved to the 8-bit offsets BPF has."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int, str | None, str | None]] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.code.append((_LD_ABS, offset, None, None))

    def jump(self, op: int, k: int, *, true: str | None = None, false: str | None = None) -> None:
        self.code.append((op, k, true, false))

    def ret(self, value: int) -> None:
        self.code.append((_RET, value, None, None))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (op, k, true, false) in enumerate(self.code):
            jt, jf = (self._offset(index, target) for target in (true, false))
            out += struct.pack("=HBBI", op, jt, jf, k)
        return bytes(out)

    def _offset(self, index: int, target: str | None) -> int:
        if target is None:
            return 0
        offset = self.labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target} out of BPF's reach ({offset})")
        return offset
