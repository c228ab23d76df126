"""A real GPU through the whole product: a real server, a strict `fairgpu agent` process reading
its GPU through NVML, two orgs' jobs submitted through the CLI, one GPU between them.

Collected with FAIRGPU_REAL_GPU=1 only (tests/conftest.py); `make test-gpu` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.bench.procs import fairgpu_command
from tests.gpu.test_real_gpu import CUDA_PY, PATTERN, READ, WRITE
from tests.harness.served import Served, serve, wait_for
from tests.harness.strict_agent import end_strict_agent

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
UID_BASE = 3_000_000 + (os.getpid() % 10_000) * 1_000


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    yield from serve(database_url, tmp_path)


def one(text: str) -> Any:
    return json.loads(text)


class Pool:
    def __init__(self, served: Served, tmp_path: Path) -> None:
        self.served = served
        self.tokens: dict[str, str] = {}
        for org in ("acme", "rival"):
            served.ok("org", "create", org)
            served.ok("quota", "set", org, "--gpu-type", "H200", "--guaranteed", "1")
            user = one(
                served.ok("user", "create", f"{org}-eng", "--org", org, "--token", "-o", "json")
            )
            self.tokens[org] = user["token"]
            (tmp_path / "data" / org).mkdir(parents=True)
        tmp_path.chmod(0o755)
        self.state = tmp_path / "state"
        self.cgroup_parent = f"fairgpu-e2e-{uuid.uuid4().hex[:8]}"
        join = one(served.ok("join-token", "create", "-o", "json"))["token"]
        self.log = (tmp_path / "agent.log").open("wb")
        self.agent = subprocess.Popen(
            [
                *fairgpu_command(), "agent", "--server", served.url, "--join-token", join,
                "--name", "gpu-node", "--state-dir", str(self.state), "--isolation", "strict",
                "--org-root", str(tmp_path / "data" / "{org}"),
                "--task-uid-base", str(UID_BASE), "--cgroup-parent", self.cgroup_parent,
                "--log-level", "warning",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FAIRGPU_SERVER": "", "FAIRGPU_TOKEN": ""},
        )  # fmt: skip
        self.agent_log = tmp_path / "agent.log"

    def submit(self, org: str, code: str) -> str:
        return self.served.ok(
            "submit", "--parsable", "-G", "H200:1", "-t", "5m", "--", CUDA_PY, "-c", code,
            token=self.tokens[org],
        ).strip()  # fmt: skip

    def job(self, org: str, job_id: str) -> dict[str, Any]:
        found: dict[str, Any] = one(
            self.served.ok("describe", job_id, "-o", "json", token=self.tokens[org])
        )
        return found

    def logs(self, org: str, job_id: str) -> str:
        return self.served.ok("logs", job_id, token=self.tokens[org])

    def close(self) -> None:
        end_strict_agent(
            self.agent,
            self.log,
            uids=range(UID_BASE, UID_BASE + 1000),
            state=self.state,
            cgroup_parent=self.cgroup_parent,
        )


def ended(pool: Pool, org: str, job_id: str) -> None:
    job = pool.job(org, job_id)
    assert job["state"] == "COMPLETED", json.dumps(job) + pool.logs(org, job_id)


@pytest.fixture
def pool(served: Served, tmp_path: Path) -> Iterator[Pool]:
    p = Pool(served, tmp_path)
    yield p
    p.close()


def test_two_orgs_take_turns_on_one_real_gpu(pool: Pool) -> None:
    """The node registers its H200 as NVML tells it; acme's job holds the GPU while rival's
    waits; rival's then runs on the same GPU and finds nothing acme left in its memory."""
    wait_for(lambda: bool(one(pool.served.ok("node", "list", "-o", "json"))), 60)
    nodes = one(pool.served.ok("node", "list", "-o", "json"))
    print(json.dumps(nodes, indent=1)[:3000])
    assert json.dumps(nodes).count('"H200"') >= 1
    acme = pool.submit("acme", WRITE + "import time; time.sleep(15)\n")
    wait_for(lambda: pool.job("acme", acme)["state"] == "RUNNING", 60)
    rival = pool.submit("rival", READ)
    waiting = pool.job("rival", rival)
    assert waiting["state"] == "PENDING", waiting
    wait_for(lambda: pool.job("acme", acme)["state"] in ENDED, 120)
    ended(pool, "acme", acme)
    assert pool.logs("acme", acme).split()[:2] == ["written", str(8 * 2**28)]
    wait_for(lambda: pool.job("rival", rival)["state"] in ENDED, 120)
    ended(pool, "rival", rival)
    assert pool.logs("rival", rival).split() == ["found", "0"], PATTERN
