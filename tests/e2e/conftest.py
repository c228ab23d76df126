"""End to end: a real `fairgpu server` and real `fairgpu agent --simulate` processes on loopback.

`scheduler.bench.cluster` starts them (bootstrap, join token, agents) and stops everything on the
way out; `E2E` adds an org with an H100 quota, a member's client and the waits the tests share.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scheduler.bench.cluster import Cluster, add_org, cluster

# Production defaults except where a test would otherwise wait for minutes.
SERVER_ENV = {
    "FAIRGPU_CYCLE_INTERVAL_S": "1",
    "FAIRGPU_HEARTBEAT_INTERVAL_S": "2",
    "FAIRGPU_HEARTBEAT_LONG_POLL_S": "2",
    "FAIRGPU_POLICY_PREEMPTION_GRACE_S": "2",
    "FAIRGPU_NODE_TIMEOUT_S": "60",
}
GRACE_S = 2.0
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED")


@dataclass
class E2E:
    cluster: Cluster
    admin: httpx.Client
    member: httpx.Client

    def submit(self, command: list[str], **fields: Any) -> int:
        body = {"command": command, "gpu_type": "H100", "time_limit": 120, **fields}
        r = self.member.post("/v1/jobs", json=body)
        assert r.status_code == 201, (
            r.status_code,
            r.text,
            self.cluster.fleet.procs["server"].last_lines(20),
        )
        job_id: int = r.json()["id"]
        return job_id

    def restart_server(self) -> None:
        """Start the server stopped with `fleet.procs["server"].kill()` again; wait until it is
        ready."""
        self.cluster.fleet.procs["server"].start()

        def ready() -> bool:
            self.cluster.fleet.check_alive()
            try:
                return httpx.get(f"{self.cluster.url}/readyz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "the server is ready again")

    def job(self, job_id: int) -> dict[str, Any]:
        r = self.member.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        return job

    def wait_state(
        self, job_id: int, states: Sequence[str], timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Poll until the job is in one of `states`; a different terminal state fails at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            assert job["state"] not in TERMINAL, (job, self.events(job_id))
            assert time.monotonic() < deadline, (job, self.events(job_id))
            self.cluster.fleet.check_alive()
            time.sleep(0.1)

    def events(self, job_id: int) -> list[tuple[str, Any]]:
        r = self.admin.get(f"/v1/jobs/{job_id}/events", params={"limit": 100})
        return [(e["kind"], e.get("details")) for e in r.json().get("data", [])]

    def logs(self, job_id: int, rank: int = 0, timeout_s: float = 15.0) -> str:
        """The whole log of a rank, once the server has all of it (agents ship logs after exit)."""
        deadline = time.monotonic() + timeout_s
        text, offset = "", 0
        while True:
            r = self.member.get(
                f"/v1/jobs/{job_id}/logs", params={"rank": rank, "offset": offset, "wait_s": 1}
            )
            assert r.status_code == 200, r.text
            piece = r.json()
            text += str(piece["data"])
            offset = piece["next_offset"]
            if piece["eof"]:
                return text
            assert time.monotonic() < deadline, (rank, text)


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


@contextmanager
def running(
    workdir: Path,
    *,
    database_url: str | None = None,
    nodes: Sequence[tuple[str, str, str]] = (("n1", "lab", "4xH100"),),
) -> Iterator[E2E]:
    """A server and agents, an org `acme` guaranteed 8 H100, and a member of it."""
    workdir.mkdir(parents=True, exist_ok=True)
    with cluster(workdir, nodes=nodes, server_env=SERVER_ENV, database_url=database_url) as c:
        headers = {"Authorization": f"Bearer {c.admin_token}"}
        with httpx.Client(base_url=c.url, headers=headers, timeout=15.0) as admin:
            token = add_org(admin, "acme", quotas={"H100": (8, 8)}, user="ada")
            member_headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=c.url, headers=member_headers, timeout=15.0) as member:
                c.wait_nodes()
                yield E2E(cluster=c, admin=admin, member=member)
