"""/metrics without a metrics token, from the server's own machine: a real `fairgpu server`
process on loopback, run as a uid of its own, and real clients run under `setpriv --reuid`.
The server's uid and root are the machine's services and scrape; any other uid is a task that
shares the host's network (it runs as its org's uid) and gets 401, as a client elsewhere does.
SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run processes as other uids",
)

FAIRGPU = str(Path(sys.executable).parent / "fairgpu")
SERVER_UID = 47_101  # no account needed: setpriv sets the ids
TASK_UID = 47_102  # an org's uid, as a task on the machine runs


def _as(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory the server's uid owns (its SQLite file, its HOME)."""
    path = Path(tempfile.mkdtemp(prefix="fairgpu-metrics-uid-"))
    os.chown(path, SERVER_UID, SERVER_UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(database_url: str, home: Path) -> Iterator[str]:
    if database_url.startswith("sqlite:///"):
        own = home / "fairgpu.db"
        shutil.copyfile(database_url.removeprefix("sqlite:///"), own)
        os.chown(own, SERVER_UID, SERVER_UID)
        database_url = f"sqlite:///{own}"
    port = _free_port()
    env = {**os.environ, "HOME": str(home)}
    env.pop("FAIRGPU_METRICS_TOKEN", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [*_as(SERVER_UID), FAIRGPU, "server", "--port", str(port),
         "--database-url", database_url, "--no-access-log", "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.1)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def _scrape(url: str, uid: int | None) -> tuple[int, str]:
    """The status and body a client process running as `uid` (None: this process's, root)
    gets from `url`."""
    script = (
        "import sys, httpx\n"
        "r = httpx.get(sys.argv[1], timeout=10)\n"
        "print(r.status_code); print(r.text[:20000])\n"
    )
    argv = [sys.executable, "-c", script, url]
    done = subprocess.run(
        [*_as(uid), *argv] if uid is not None else argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    status, _, body = done.stdout.partition("\n")
    return int(status), body


def test_only_the_servers_uid_and_root_scrape_without_a_token(server: str) -> None:
    own_status, own_body = _scrape(server + "/metrics", SERVER_UID)
    root_status, _ = _scrape(server + "/metrics", None)
    task_status, task_body = _scrape(server + "/metrics", TASK_UID)
    assert (own_status, root_status) == (200, 200)
    assert "fairgpu_" in own_body
    assert task_status == 401
    assert "fairgpu_" not in task_body
    assert "the server's uid or root" in task_body  # the problem says how to scrape instead
    # The same task is served on the API's open routes: only /metrics asks who it is.
    assert _scrape(server + "/healthz", TASK_UID)[0] == 200
