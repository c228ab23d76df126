"""`fairgpu agent` as a real process against a real HTTP server on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.agents.fake_server import JOIN_TOKEN, FakeServer, ServedFakeServer
from tests.agents.helpers import spec, wait_for

FAIRGPU = [sys.executable, "-c", "from cli.main import main; main()"]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FAIRGPU, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.fixture
def served() -> Iterator[ServedFakeServer]:
    with ServedFakeServer(FakeServer(heartbeat_interval_s=2.0)) as s:
        yield s


def test_not_registered_without_join_token_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "agent", "--server", "http://127.0.0.1:9", "--simulate", "1xH100",
        "--state-dir", str(tmp_path), "--isolation", "none", "--log-level", "error",
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "--join-token" in result.stderr


def test_no_nvml_names_the_simulate_option(tmp_path: Path) -> None:
    # A machine without NVML, even when the test runs on a GPU node.
    (tmp_path / "pynvml.py").write_text("raise ImportError('no NVML here')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.getcwd()}")
    result = run_cli(
        "agent", "--server", "http://127.0.0.1:9", "--join-token", "t",
        "--state-dir", str(tmp_path), "--isolation", "none", "--log-level", "error",
    env=env)  # fmt: skip
    assert result.returncode != 0
    assert "--simulate" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_bad_simulate_spec_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "agent", "--server", "http://127.0.0.1:9", "--simulate", "8xQ9000",
        "--state-dir", str(tmp_path), "--isolation", "none", "--log-level", "error",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Q9000" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def start_agent(url: str, state_dir: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    with (state_dir.parent / "agent.err").open("ab") as err:
        return _popen(url, state_dir, metrics_port, err)


def _popen(url: str, state_dir: Path, metrics_port: int, err: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *FAIRGPU,
            "agent",
            "--server",
            url,
            "--join-token",
            JOIN_TOKEN,
            "--simulate",
            "4xA100-80GB",
            "--state-dir",
            str(state_dir),
            "--name",
            "gpu-node-1",
            "--site",
            "lab",
            "--metrics-port",
            str(metrics_port),
            "--metrics-addr",
            "127.0.0.1",
            "--dcgm-mapping-dir",
            str(state_dir / "dcgm"),
            "--log-level",
            "warning",
            "--isolation",
            "none",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=err,
    )


def test_agent_process_runs_a_task_survives_sigkill_and_serves_metrics(
    served: ServedFakeServer, tmp_path: Path
) -> None:
    server = served.server
    state_dir, go, out = tmp_path / "state", tmp_path / "go", tmp_path / "env.json"
    port = free_port()
    agent = start_agent(served.url, state_dir, port)
    try:
        wait_for(lambda: len(server.heartbeats) >= 1, timeout_s=30)
        [registration] = server.registrations
        assert (registration.name, registration.site, len(registration.gpus)) == (
            "gpu-node-1",
            "lab",
            4,
        )
        code = (
            "import json, os, pathlib, time\n"
            f"json.dump(dict(os.environ), open({str(out)!r}, 'w'))\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n"
            "print('rank', os.environ['NODE_RANK'])"
        )
        server.submit(
            spec(5, [PY, "-c", code], job_id=77, gpus=[1, 2], node_rank=1, num_nodes=2,
                 master_addr="10.1.1.1", master_port=29400)
        )  # fmt: skip
        wait_for(lambda: 5 in server.reports and server.reports[5].state == "running", 30)
        # json.dump writes in pieces: wait for the whole object, not just the file.
        wait_for(lambda: out.exists() and out.read_text().endswith("}"))
        env = json.loads(out.read_text())
        assert (env["CUDA_VISIBLE_DEVICES"], env["WORLD_SIZE"], env["NODE_RANK"]) == (
            "1,2",
            "2",
            "1",
        )

        wait_for(lambda: 'job_id="77"' in _metrics(port), timeout_s=10)
        text = _metrics(port)
        assert (
            'fairgpu_gpu_allocation_info{gpu="1",job_id="77",node="gpu-node-1",org="acme"} 1.0'
            in text
        )
        assert 'fairgpu_gpu_utilization_ratio{gpu="1"' in text
        assert (state_dir / "dcgm" / "2").read_text() == "77\n"

        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        server.resend_starts_forever = True  # a restarted agent must still not start it again
        agent = start_agent(served.url, state_dir, free_port())
        heartbeats = len(server.heartbeats)
        wait_for(lambda: len(server.heartbeats) > heartbeats, timeout_s=30)
        go.touch()
        wait_for(lambda: 5 in server.log_complete, timeout_s=30)
        assert (server.reports[5].state, server.reports[5].exit_code) == ("exited", 0)
        assert server.logs[5] == "rank 1\n"
        assert len(server.registrations) == 1  # the credential survived in the state dir
    finally:
        agent.send_signal(signal.SIGTERM)
        returncode = agent.wait(timeout=10)
    assert returncode == 0, (tmp_path / "agent.err").read_text()


def _metrics(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""
