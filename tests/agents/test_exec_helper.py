"""The containers' entrypoint (agents/helper/fairgpu-exec.c) run directly, as a real process:
what it scopes, and that each way it can fail says so in one line with docker's exit statuses.
The container tests (test_container_images.py) run it inside docker."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agents.container import DEFAULT_HELPER
from agents.containerenv import variables_file
from agents.sandbox import LANDLOCK_SCOPE_ABI, landlock_abi

# Connects to the abstract unix socket argv[1], then says whether it could and whether the
# process has no_new_privs.
CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "try:\n"
    "    s.connect(b'\\0' + sys.argv[1].encode()); print('allowed')\n"
    "except OSError as exc:\n"
    "    print(type(exc).__name__)\n"
    "status = open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0]\n"
    "print('no_new_privs', status)\n"
)


def helper(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(DEFAULT_HELPER), *args], capture_output=True, text=True, timeout=60, **kwargs
    )


@pytest.mark.skipif(landlock_abi() < LANDLOCK_SCOPE_ABI, reason="needs Landlock scoping (6.12)")
def test_with_s_the_program_reaches_no_abstract_socket_outside_and_has_no_new_privs() -> None:
    name = f"fairgpu-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(b"\0" + name.encode())
        listener.listen()
        scoped = helper("-s", "--", sys.executable, "-c", CONNECT, name)
        unscoped = helper("--", sys.executable, "-c", CONNECT, name)
    assert scoped.stdout.split("\n")[:2] == ["PermissionError", "no_new_privs 1"], scoped
    assert unscoped.stdout.split("\n")[:2] == ["allowed", "no_new_privs 0"], unscoped


def test_each_failure_is_one_line_with_dockers_status(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_bytes(b"A=1\0no-equals-sign\0")
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")  # not executable
    good = tmp_path / "env"
    good.write_bytes(variables_file({"A": "1"}))
    cases = [
        ((), 126, "fairgpu-exec: usage: fairgpu-exec [-s] [-e FILE] -- PROGRAM [ARG...]"),
        (("-x", "--", "true"), 126, "fairgpu-exec: usage: "),
        (("-e", str(good)), 126, "fairgpu-exec: usage: "),  # no program
        (("-e", str(tmp_path / "none"), "--", "true"), 126, "reading the job's variables: No such"),
        (("-e", str(broken), "--", "true"), 126, "reading the job's variables: Invalid argument"),
        (("-e", str(tmp_path), "--", "true"), 126, "reading the job's variables: Invalid argument"),
        (("--", "no-such-program-here"), 127, "cannot run no-such-program-here: No such file"),
        (("--", str(script)), 126, f"cannot run {script}: Permission denied"),
    ]
    for args, status, line in cases:
        done = helper(*args)
        assert done.returncode == status, (args, done)
        assert done.stdout == "", (args, done)
        assert len(done.stderr.splitlines()) == 1, (args, done)
        assert line in done.stderr, (args, done)
    done = helper("-e", str(good), "--", "sh", "-c", 'echo "$A"')
    assert (done.returncode, done.stdout, done.stderr) == (0, "1\n", "")
