"""`fairgpu agent` as a real process against the real server (uvicorn on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from scheduler.bench.cluster import add_org
from scheduler.bench.procs import Fleet, Proc, free_port
from tests.agents.helpers import wait_for
from tests.harness.served import seed_admin, serve_app
from tests.scheduling.harness import fast_settings

FAIRGPU = [sys.executable, "-c", "from cli.main import main; main()"]
PY = sys.executable


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FAIRGPU, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


class Api:
    """The served app's URL and the calls this test makes (as its platform admin by default)."""

    def __init__(self, url: str, admin: str) -> None:
        self.url = url
        self.admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30
        )

    def get(self, path: str, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self.admin.get(path, headers=headers)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()


@pytest.fixture
def served(database_url: str) -> Iterator[Api]:
    admin = seed_admin(database_url)
    with serve_app(create_app(fast_settings(database_url, heartbeat_interval_s=2.0))) as url:
        api = Api(url, admin)
        with api.admin:
            yield api


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


def test_a_bad_seccomp_value_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "agent", "--server", "http://127.0.0.1:9", "--simulate", "1xH100", "--join-token", "t",
        "--state-dir", str(tmp_path), "--seccomp", "maybe", "--log-level", "error",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "fairgpu: error: --seccomp must be on or off", result.stderr


def start_agent(fleet: Fleet, url: str, join: str, metrics_port: int) -> Proc:
    """The agent process (its state: tmp_path/gpu-node-1-state); restarted under the same
    name, it finds that state again."""
    state_dir = fleet.workdir / "gpu-node-1-state"
    dcgm = ("--dcgm-mapping-dir", str(state_dir / "dcgm"))
    return fleet.agent(
        "gpu-node-1", url, join, "4xA100-80GB", dcgm,
        site="lab", metrics_port=metrics_port, log_level="warning", time_limit_grace_s=None,
    )  # fmt: skip


def test_agent_process_runs_a_task_survives_sigkill_and_serves_metrics(
    served: Api, tmp_path: Path
) -> None:
    state_dir, go, out = tmp_path / "gpu-node-1-state", tmp_path / "go", tmp_path / "env.json"
    token = add_org(served.admin, "acme", quotas={"A100-80GB": (4, None)}, user="ada")
    join = served.admin.post("/v1/join-tokens", json={"name": "join", "uses": 5}).json()["token"]
    fleet = Fleet(workdir=tmp_path)
    port = free_port()
    agent = start_agent(fleet, served.url, join, port)
    try:

        def nodes() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = served.get("/v1/nodes")["data"]
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
        body = {"command": [PY, "-c", code], "gpus_per_node": 2, "time_limit": 600}
        submitted = served.admin.post("/v1/jobs", json=body, headers=_bearer(token))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]

        def state() -> str:
            return str(served.get(f"/v1/jobs/{job_id}", token)["state"])

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

        agent.kill(signal.SIGKILL)
        before = nodes()[0]["last_heartbeat_at"]
        agent = start_agent(fleet, served.url, join, free_port())
        wait_for(lambda: nodes()[0]["last_heartbeat_at"] != before, timeout_s=30)
        go.touch()
        wait_for(lambda: state() == "COMPLETED", timeout_s=30)
        # The log's last chunk may come a heartbeat after the end: `eof` says when it has.
        wait_for(lambda: served.get(f"/v1/jobs/{job_id}/logs", token)["eof"], timeout_s=30)
        logs = served.get(f"/v1/jobs/{job_id}/logs", token)
        assert (logs["data"], logs["eof"]) == ("rank 0\n", True)
        assert [n["id"] for n in nodes()] == [node["id"]]  # the credential survived
        returncode = agent.kill(signal.SIGTERM, timeout_s=10)
        assert returncode == 0, agent.tail()
    finally:
        fleet.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _metrics(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="a pid namespace of its own needs root")
def test_an_agent_that_is_process_1_says_it_leaves_zombies(tmp_path: Path) -> None:
    """As process 1 of a container (a Kubernetes pod without an init) the agent inherits every
    process its tasks leave behind and reaps none: each stays a zombie holding a pid. The image
    runs it under tini (tests/deploy); run otherwise, it says so at once."""
    # Until it says so (or a minute: a loaded machine takes seconds to import the agent), then
    # SIGKILL to the process group, unshare and the agent. Not SIGINT: the line comes before
    # the agent handles signals, and the init of a pid namespace gets from outside only the
    # signals it handles (an xdist worker's children start with SIGINT ignored), so a SIGINT
    # sent then is lost; and unshare --fork ignores it while it waits.
    log = tmp_path / "agent.err"
    with log.open("wb") as err:
        agent = subprocess.Popen(
            [
                "unshare", "--pid", "--fork", "--kill-child=SIGINT", "--mount-proc",
                *FAIRGPU, "agent", "--server", "http://127.0.0.1:9", "--join-token", "x",
                "--simulate", "1xH100", "--isolation", "none", "--state-dir", str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )  # fmt: skip
    said = "the agent is process 1 of its pid namespace"
    try:
        deadline = time.monotonic() + 60
        while said not in log.read_text() and agent.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=60)
    assert said in log.read_text(), log.read_text()
    alone = run_cli(
        "agent", "--server", "http://127.0.0.1:9", "--simulate", "1xH100", "--isolation", "none",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert "process 1" not in alone.stderr, alone.stderr
