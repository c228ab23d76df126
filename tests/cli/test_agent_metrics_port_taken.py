"""A task that holds the agent's metrics port while the agent is down (tasks outlive their
agent) no longer keeps the agent from starting: a real server, a real `fairgpu agent` process
and the port held by another process; the node registers and heartbeats without /metrics,
and serves it once the port is free."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

from scheduler.bench.procs import fairgpu_command
from tests.harness.served import Served, wait_for


def _nodes(served: Served) -> list[dict[str, object]]:
    listed = json.loads(served.ok("node", "list", "-o", "json"))
    return listed if isinstance(listed, list) else listed["data"]  # type: ignore[no-any-return]


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())
    except OSError as exc:
        return f"error: {exc}"


def test_an_agent_starts_and_heartbeats_while_its_metrics_port_is_taken(
    served: Served, tmp_path: Path
) -> None:
    holder = socket.socket()  # as a host-network task would, between two runs of the agent
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    join = json.loads(served.ok("join-token", "create", "-o", "json"))
    join = join[0] if isinstance(join, list) else join
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [
            *fairgpu_command(), "agent", "--server", served.url, "--join-token", join["token"],
            "--simulate", "1xH100", "--name", "held-port", "--isolation", "none",
            "--state-dir", str(tmp_path / "state"), "--metrics-port", str(port),
        ],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "FAIRGPU_SERVER": "", "FAIRGPU_TOKEN": ""},
    )  # fmt: skip
    try:
        wait_for(lambda: [n for n in _nodes(served) if n["name"] == "held-port"], 60)
        [node] = [n for n in _nodes(served) if n["name"] == "held-port"]
        first = node["last_heartbeat_at"]
        wait_for(
            lambda: (
                [n["last_heartbeat_at"] for n in _nodes(served) if n["name"] == "held-port"]
                != [first]
            ),
            60,
        )
        assert agent.poll() is None
        assert "metrics port" in (tmp_path / "agent.log").read_text()
        holder.close()
        wait_for(lambda: "fairgpu_gpu" in _scrape(port), 60)
    finally:
        holder.close()
        agent.terminate()
        agent.wait(timeout=30)
        log.close()
