"""`fairgpu run --pty` and `fairgpu attach` end to end: the real server (uvicorn on loopback),
a real `fairgpu agent` process, and the CLI as a real process (on a real pty where a terminal
matters), on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scheduler.bench.procs import Proc, fairgpu_command
from tests.harness.served import Served, simulated_agent, wait_for

# The remote program of the terminal tests: its window size at start and on every SIGWINCH,
# what it reads, SIGINT (Ctrl-C) as a line, and `quit` ends it with 5.
REMOTE = """
import os, signal, sys
def size(*_):
    lines, cols = os.get_terminal_size(0).lines, os.get_terminal_size(0).columns
    print(f"size={lines}x{cols}", flush=True)
signal.signal(signal.SIGWINCH, size)
signal.signal(signal.SIGINT, lambda *_: print("got-sigint", flush=True))
size()
print("user=" + os.environ.get("CUDA_VISIBLE_DEVICES", "?"), flush=True)
for line in sys.stdin:
    print("got=" + line.strip(), flush=True)
    if line.strip() == "quit":
        sys.exit(5)
"""


@dataclass
class Org:
    owner: str
    member: str
    admin: str


@pytest.fixture
def org(served: Served) -> Org:
    served.ok("org", "create", "acme")
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "2")

    def token(name: str, *role: str) -> str:
        made = served.ok("user", "create", name, "--org", "acme", *role, "--token", "-o", "json")
        return str(json.loads(made)["token"])

    return Org(owner=token("ada"), member=token("bob"), admin=token("cy", "--role", "org-admin"))


@pytest.fixture
def agent(served: Served, tmp_path: Path) -> Iterator[Proc]:
    with simulated_agent(served, tmp_path) as process:
        yield process


def fairgpu(
    served: Served, token: str, *args: str, stdin: bytes = b"", timeout_s: float = 60
) -> tuple[int, str, str]:
    """The CLI as a process without a terminal: (exit code, stdout, stderr)."""
    result = subprocess.run(
        [*fairgpu_command(), *args],
        env={**os.environ, **served.env(token), "LINES": "31", "COLUMNS": "97"},
        input=stdin,
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode()


@dataclass
class Terminal:
    """The CLI on a real pty, as a person runs it: raw mode, window size, keys."""

    pid: int
    fd: int
    seen: str = ""
    read_upto: int = field(default=0)

    @classmethod
    def start(cls, served: Served, token: str, *args: str, rows: int, cols: int) -> Terminal:
        env = {**os.environ, **served.env(token)}
        env.pop("COLUMNS", None)
        pid, fd = pty.fork()
        if pid == 0:  # the child: the CLI on the pty
            os.execvpe(fairgpu_command()[0], [*fairgpu_command(), *args], env)
        terminal = cls(pid, fd)
        terminal.resize(rows, cols)
        return terminal

    def resize(self, rows: int, cols: int) -> None:
        """As a terminal window does: the kernel sends the CLI SIGWINCH."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        """The next match of `pattern` in what the CLI printed after the previous match."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = re.compile(pattern).search(self.seen, self.read_upto)
            if match:
                self.read_upto = match.end()
                return match
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pattern!r} not seen in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                assert data, f"the CLI ended before {pattern!r}: {self.seen[-2000:]!r}"
                self.seen += data.decode(errors="replace")

    def wait(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with_output = select.select([self.fd], [], [], 0.1)[0]
            if with_output:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 65536).decode(errors="replace")
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the CLI did not end: {self.seen[-2000:]!r}")


def test_a_pty_session_runs_and_its_exit_code_comes_back(
    served: Served, org: Org, agent: object
) -> None:
    code, out, err = fairgpu(
        served, org.owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
        "bash", "-c", "stty size; echo gpus=$CUDA_VISIBLE_DEVICES; tty; exit 3",
    )  # fmt: skip
    assert code == 3, (out, err)
    lines = out.replace("\r", "").splitlines()
    assert "31 97" in lines, out  # no terminal here: $LINES x $COLUMNS
    assert "gpus=0" in lines, out
    assert any(line.startswith("/dev/pts/") for line in lines), out
    job = re.search(r"job (\d+) submitted", err)
    assert job is not None, err

    def describe() -> dict[str, Any]:
        return dict(json.loads(served.ok("describe", job[1], "-o", "json")))

    wait_for(lambda: describe()["state"] == "FAILED")  # once the agent has reported the end
    described = describe()
    assert described["interactive"] is True
    assert described["exit_code"] == 3
    attaches = [e for e in described["events"] if e["kind"] == "job.attach"]
    assert [(e["actor"], e["reason"]) for e in attaches] == [
        ("user:ada", "attached to the terminal of rank 0")
    ]
    # The session is the job's log too.
    assert "gpus=0" in served.ok("logs", job[1], token=org.owner)


def test_raw_mode_resize_ctrl_c_detach_and_attach_again(
    served: Served, org: Org, agent: object
) -> None:
    run = Terminal.start(
        served, org.owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
        "python3", "-u", "-c", REMOTE, rows=30, cols=100,
    )  # fmt: skip
    job = run.expect(r"job (\d+) submitted")[1]
    run.expect(r"size=30x100")  # the window's size before the program started
    run.expect(r"user=0")
    run.resize(40, 120)
    run.expect(r"size=40x120")
    run.type(b"\x03")  # Ctrl-C: a byte in raw mode, SIGINT from the remote terminal
    run.expect(r"got-sigint")
    run.type(b"hello\r")
    run.expect(r"got=hello")
    run.type(b"\x1dd")  # Ctrl-] d: detach
    assert run.wait() == 0, run.seen
    assert "detached" in run.seen
    assert json.loads(served.ok("describe", job, "-o", "json"))["state"] == "RUNNING"

    again = Terminal.start(served, org.owner, "attach", job, rows=50, cols=150)
    again.expect(r"size=50x150")  # attaching sends this window's size
    again.type(b"again\r")
    again.expect(r"got=again")
    again.type(b"quit\r")
    assert again.wait() == 5, again.seen
    events = json.loads(served.ok("describe", job, "-o", "json"))["events"]
    assert [e["actor"] for e in events if e["kind"] == "job.attach"] == ["user:ada", "user:ada"]


def test_only_the_owner_and_org_admins_attach(
    served: Served, org: Org, agent: object, tmp_path: Path
) -> None:
    served.ok("org", "create", "rival")
    rival = json.loads(
        served.ok("user", "create", "eve", "--org", "rival", "--token", "-o", "json")
    )["token"]
    run = Terminal.start(
        served, org.owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
        "python3", "-u", "-c", REMOTE, rows=30, cols=100,
    )  # fmt: skip
    job = run.expect(r"job (\d+) submitted")[1]
    run.expect(r"user=0")

    code, _, err = fairgpu(served, rival, "attach", job)
    assert code == 5, err  # another org's job: not there
    assert f"job {job} not found" in err
    code, _, err = fairgpu(served, org.member, "attach", job)
    assert code == 4, err  # same org, not the owner
    assert "forbidden" in err
    # The org's admin may: it attaches, types a line, and detaches (Ctrl-] d from a pipe).
    code, out, err = fairgpu(served, org.admin, "attach", job, stdin=b"from-admin\n\x1dd")
    assert code == 0, (code, out, err)
    run.expect(r"got=from-admin")  # the owner's terminal shows what the admin typed
    run.type(b"quit\r")
    assert run.wait() == 5
    events = json.loads(served.ok("describe", job, "-o", "json"))["events"]
    assert [e["actor"] for e in events if e["kind"] == "job.attach"] == ["user:ada", "user:cy"]


def test_killing_the_agent_ends_the_session_with_a_clear_line(
    served: Served, org: Org, agent: Proc
) -> None:
    run = Terminal.start(
        served, org.owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
        "python3", "-u", "-c", REMOTE, rows=30, cols=100,
    )  # fmt: skip
    run.expect(r"user=0")
    agent.kill()
    code = run.wait()
    assert code == 255, run.seen
    assert "the node's agent closed the stream" in run.seen


def test_run_without_pty_is_refused_in_one_line(served: Served, org: Org) -> None:
    code, out, err = fairgpu(served, org.owner, "run", "--", "bash")
    assert code == 2
    assert err.strip().splitlines() == [
        "fairgpu: error: `fairgpu run` is for interactive jobs: add --pty (batch jobs: "
        "`fairgpu submit`)"
    ]
