"""The seccomp filter's program for every machine it knows, run through a classic BPF
interpreter: aarch64's is checked here, where no aarch64 kernel runs it, and each system call
number against the kernel's own headers where this machine has them."""

from __future__ import annotations

import errno
import os
import re
import struct
from pathlib import Path

import pytest

from agents import seccomp
from agents.seccomp import (
    ARCHITECTURES,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
)

EPERM = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
EAFNOSUPPORT = SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT
# Calls jobs make: read, ioctl (the GPU driver), mmap, futex; ptrace, process_vm_readv and
# pidfd_getfd (debuggers, py-spy, CUDA IPC), which the filter leaves to the kernel's own rules.
ORDINARY = {"x86_64": (0, 16, 9, 202, 101, 310, 438), "aarch64": (63, 29, 222, 98, 117, 270, 438)}
HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),  # arm64 takes the generic table
}


def verdict(program: bytes, arch: int, nr: int, *args: int) -> int:
    """What the kernel would answer: classic BPF over struct seccomp_data (native byte order;
    each argument a 64-bit word)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args, *[0] * (6 - len(args)))
    code = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    accumulator, pc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            accumulator = struct.unpack_from("=I", data, k)[0]
        elif op in (0x15, 0x35, 0x45):  # BPF_JMP | BPF_JEQ, BPF_JGE, BPF_JSET (BPF_K)
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: accumulator & k}[op]
            pc += jt if taken else jf
        elif op == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF op {op:#x}")


def numbers(machine: str) -> dict[str, int]:
    column = tuple(ARCHITECTURES).index(machine)
    return {name: nrs[column] for name, nrs in seccomp._NUMBERS.items() if nrs[column] is not None}


@pytest.mark.parametrize("machine", ARCHITECTURES)
def test_each_machines_filter_answers_as_documented(machine: str) -> None:
    program, arch, nr = seccomp.program(machine), ARCHITECTURES[machine], numbers(machine)
    for name in (*seccomp.REFUSED, *seccomp.MOUNTING):
        if name in nr:
            assert verdict(program, arch, nr[name]) == EPERM, name
    for name in seccomp.ABSENT:
        assert verdict(program, arch, nr[name]) == ENOSYS, name
    for ordinary in ORDINARY[machine]:
        assert verdict(program, arch, ordinary) == SECCOMP_RET_ALLOW, ordinary
    newuser, files, sigchld = 0x10000000, 0x400, 17
    assert verdict(program, arch, nr["unshare"], newuser) == EPERM
    assert verdict(program, arch, nr["unshare"], files) == SECCOMP_RET_ALLOW
    assert verdict(program, arch, nr["clone"], newuser | sigchld) == EPERM
    assert verdict(program, arch, nr["clone"], 0x003D0F00) == SECCOMP_RET_ALLOW  # a thread
    assert verdict(program, arch, nr["personality"], 0xFFFFFFFF) == SECCOMP_RET_ALLOW
    assert verdict(program, arch, nr["personality"], 6) == EPERM  # PER_BSD
    assert verdict(program, arch, nr["personality"], 0x40000) == SECCOMP_RET_ALLOW  # as gdb
    assert verdict(program, arch, nr["personality"], 0x0400000) == EPERM  # READ_IMPLIES_EXEC
    assert verdict(program, arch, nr["socket"], 2) == SECCOMP_RET_ALLOW  # AF_INET
    assert verdict(program, arch, nr["socket"], 16) == SECCOMP_RET_ALLOW  # AF_NETLINK
    assert verdict(program, arch, nr["socket"], 40) == EAFNOSUPPORT  # AF_VSOCK
    assert verdict(program, arch, nr["socketpair"], 30) == EAFNOSUPPORT  # AF_TIPC
    for other in set(ARCHITECTURES.values()) - {arch} | {0x40000003}:  # i386 too
        assert verdict(program, other, ORDINARY[machine][0]) == SECCOMP_RET_KILL_PROCESS
    if machine == "x86_64":
        x32_read = seccomp.X32_SYSCALL_BIT | 0
        assert verdict(program, arch, x32_read) == SECCOMP_RET_KILL_PROCESS


@pytest.mark.parametrize("machine", ARCHITECTURES)
def test_the_user_namespace_filter_lets_namespaces_and_mounts_through_only(machine: str) -> None:
    program, arch, nr = (
        seccomp.program(machine, user_namespaces=True),
        ARCHITECTURES[machine],
        numbers(machine),
    )
    assert verdict(program, arch, nr["unshare"], 0x10000000 | 0x20000) == SECCOMP_RET_ALLOW
    assert verdict(program, arch, nr["clone"], 0x10000000 | 17) == SECCOMP_RET_ALLOW
    for name in seccomp.MOUNTING:
        assert verdict(program, arch, nr[name]) == SECCOMP_RET_ALLOW, name
    for name in seccomp.REFUSED:
        if name in nr:
            assert verdict(program, arch, nr[name]) == EPERM, name
    assert verdict(program, arch, nr["clone3"]) == ENOSYS


@pytest.mark.parametrize("machine", ARCHITECTURES)
def test_the_numbers_are_the_kernels(machine: str) -> None:
    """Against the kernel's headers (linux-libc-dev, which tests/services.sh installs)."""
    header = HEADERS[machine]
    if not header.exists():
        if machine == "x86_64" != os.uname().machine:
            pytest.skip("linux-libc-dev has the x86_64 table on x86_64 machines only")
        pytest.fail(f"no {header} here: install linux-libc-dev (tests/services.sh)")
    text = header.read_text()
    for name, number in numbers(machine).items():
        found = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)\b", text)
        if found is None:  # newer than these headers
            assert number >= 444, name
            continue
        assert int(found[1]) == number, name
