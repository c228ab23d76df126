"""A shell does not outlive its user's right to it, end to end: the real server (uvicorn on
loopback, `FAIRGPU_STREAM_AUTH_RECHECK_S` 0.5 s), a real `fairgpu agent` process and `fairgpu
attach --new` on a real pty. Disabling the user closes the stream; the CLI says why and exits
non-zero, and the node ends the shell's process; the job runs on. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.cli.test_interactive import Org, Terminal, agent, org  # noqa: F401 - fixtures
from tests.harness.served import Served, serve, wait_for


@pytest.fixture
def served(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setenv("FAIRGPU_STREAM_AUTH_RECHECK_S", "0.5")
    yield from serve(database_url, tmp_path)


def _state(served: Served, job: str) -> str:
    return str(json.loads(served.ok("describe", job, "-o", "json"))["state"])


def test_disabling_the_user_ends_their_shell_on_the_node(
    served: Served,
    org: Org,  # noqa: F811
    agent: object,  # noqa: F811
) -> None:
    job = served.ok(
        "submit", "--parsable", "-G", "H100:1", "-t", "10m", "--", "sleep", "600", token=org.owner
    ).strip()
    wait_for(lambda: _state(served, job) == "RUNNING", timeout_s=60)
    shell = Terminal.start(served, org.owner, "attach", job, "--new", rows=20, cols=70)
    shell.expect(r"[#$] ")  # its prompt: the CLI is in raw mode (which drops keys typed before)
    shell.type(b"echo pid=$$\r")
    pid = int(shell.expect(r"pid=(\d+)")[1])
    assert psutil.pid_exists(pid)  # the shell, on this machine (the agent runs unconfined)

    ada = json.loads(served.ok("user", "list", "-o", "json"))
    ada_id = next(u["id"] for u in ada if u["name"] == "ada")
    served.ok("user", "disable", str(ada_id))

    code = shell.wait(timeout_s=30)
    assert code != 0, shell.seen
    assert "the stream was closed: user disabled" in shell.seen
    wait_for(lambda: not psutil.pid_exists(pid), timeout_s=30)  # the node ended the shell
    assert _state(served, job) == "RUNNING"  # the job is its org's: it runs on
    served.ok("cancel", job)
