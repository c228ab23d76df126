"""`fairgpu admin bootstrap` and `fairgpu server` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

FAIRGPU = [str(Path(sys.executable).parent / "fairgpu")]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FAIRGPU, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_bootstrap_once_then_refuses_unless_forced(database_url: str) -> None:
    first = run("admin", "bootstrap", "--database-url", database_url, "--name", "ops")
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert token.startswith("fg_u_")
    assert len(token.splitlines()) == 1
    again = run("admin", "bootstrap", "--database-url", database_url)
    assert again.returncode != 0
    assert again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1
    assert "already exists" in again.stderr
    forced = run("admin", "bootstrap", "--database-url", database_url, "--name", "ops", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() != token


def test_bootstrap_reports_an_unreachable_database_in_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run("admin", "bootstrap", "--database-url", f"postgresql://x@127.0.0.1:{port}/db")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_server_serves_the_api(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/server.db"
    token = run("admin", "bootstrap", "--database-url", url).stdout.strip()
    port = _free_port()
    env = {**os.environ, "FAIRGPU_CYCLE_INTERVAL_S": "1"}
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*FAIRGPU, "server", "--port", str(port), "--database-url", url, "--no-access-log"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/v1/orgs", json={"name": "acme"}, headers=headers, timeout=10)
        assert r.status_code == 201, r.text
        assert httpx.get(f"{base}/openapi.json", timeout=10).json()["info"]["title"] == "fairgpu"
        assert httpx.get(f"{base}/v1/orgs", timeout=10).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    output = log.read_text()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
