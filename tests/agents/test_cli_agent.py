"""`fairgpu agent` as a real process against the real server (uvicorn on loopback)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from api.app import create_app
from tests.agents.helpers import wait_for
from tests.cli.conftest import seed_admin, serve_app
from tests.scheduling.harness import fast_settings

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


class Api:
    """The served app's URL and the calls this test makes as its platform admin."""

    def __init__(self, url: str, admin: str) -> None:
        self.url = url
        self.admin = admin

    def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        response = httpx.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token or self.admin}"},
            timeout=30,
        )
        assert response.status_code < 400, (method, path, response.status_code, response.text)
        return response.json() if response.content else None


@pytest.fixture
def served(database_url: str) -> Iterator[Api]:
    admin = seed_admin(database_url)
    with serve_app(create_app(fast_settings(database_url, heartbeat_interval_s=2.0))) as url:
        yield Api(url, admin)


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


def start_agent(url: str, join: str, state_dir: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    with (state_dir.parent / "agent.err").open("ab") as err:
        return _popen(url, join, state_dir, metrics_port, err)


def _popen(
    url: str, join: str, state_dir: Path, metrics_port: int, err: IO[bytes]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *FAIRGPU,
            "agent",
            "--server",
            url,
            "--join-token",
            join,
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
    served: Api, tmp_path: Path
) -> None:
    state_dir, go, out = tmp_path / "state", tmp_path / "go", tmp_path / "env.json"
    served.call("POST", "/v1/orgs", body={"name": "acme"})
    served.call("PUT", "/v1/orgs/acme/quota/A100-80GB", body={"guaranteed": 4, "limit": None})
    user = served.call("POST", "/v1/users", body={"name": "ada", "org": "acme"})
    token = served.call("POST", "/v1/tokens", body={"name": "t", "user_id": user["id"]})["token"]
    join = served.call("POST", "/v1/join-tokens", body={"name": "join", "uses": 5})["token"]
    port = free_port()
    agent = start_agent(served.url, join, state_dir, port)
    try:

        def nodes() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = served.call("GET", "/v1/nodes")["data"]
            return found

        wait_for(lambda: [n["state"] for n in nodes()] == ["ready"], timeout_s=30)
        [node] = nodes()
        assert (node["name"], node["site"], len(node["gpus"])) == ("gpu-node-1", "lab", 4)
        assert {g["model"] for g in node["gpus"]} == {"A100-80GB"}
        code = (
            "import json, os, pathlib, time\n"
            f"json.dump(dict(os.environ), open({str(out)!r}, 'w'))\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n"
            "print('rank', os.environ['FAIRGPU_NODE_RANK'])"
        )
        job = served.call(
            "POST", "/v1/jobs", token,
            {"command": [PY, "-c", code], "gpus_per_node": 2, "time_limit": 600},
        )  # fmt: skip
        job_id = job["id"]

        def state() -> str:
            return str(served.call("GET", f"/v1/jobs/{job_id}", token)["state"])

        wait_for(lambda: state() == "RUNNING", 30)
        # json.dump writes in pieces: wait for the whole object, not just the file.
        wait_for(lambda: out.exists() and out.read_text().endswith("}"))
        env = json.loads(out.read_text())
        held = sorted(g["index"] for g in nodes()[0]["gpus"] if g["allocated_job_id"] == job_id)
        assert len(held) == 2
        assert (env["CUDA_VISIBLE_DEVICES"], env["FAIRGPU_JOB_ID"]) == (
            ",".join(map(str, held)),
            str(job_id),
        )

        wait_for(lambda: f'job_id="{job_id}"' in _metrics(port), timeout_s=10)
        text = _metrics(port)
        for gpu in held:
            assert (
                f'fairgpu_gpu_allocation_info{{gpu="{gpu}",job_id="{job_id}",node="gpu-node-1",'
                'org="acme"} 1.0' in text
            )
            assert (state_dir / "dcgm" / str(gpu)).read_text() == f"{job_id}\n"
        assert f'fairgpu_gpu_utilization_ratio{{gpu="{held[0]}"' in text

        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        before = nodes()[0]["last_heartbeat_at"]
        agent = start_agent(served.url, join, state_dir, free_port())
        wait_for(lambda: nodes()[0]["last_heartbeat_at"] != before, timeout_s=30)
        go.touch()
        wait_for(lambda: state() == "COMPLETED", timeout_s=30)
        logs = served.call("GET", f"/v1/jobs/{job_id}/logs", token)
        assert (logs["data"], logs["eof"]) == ("rank 0\n", True)
        assert [n["id"] for n in nodes()] == [node["id"]]  # the credential survived
    finally:
        agent.send_signal(signal.SIGTERM)
        returncode = agent.wait(timeout=10)
    assert returncode == 0, (tmp_path / "agent.err").read_text()


def _metrics(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""
