"""A whole fairgpu cluster on this machine: a server, its first admin, a join token and agents
with simulated GPUs, all started through `procs.Fleet` and all stopped on the way out.
`fairgpu demo`, `fairgpu bench latency` / `bench cli` and the end-to-end tests use it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scheduler.bench.procs import Fleet, HarnessError, free_port

AGENTS_READY_S = 30.0

# Short cycles, grace and minimum runtime: preemption fits in a one-minute demo or benchmark.
QUICK_SERVER_ENV = {
    "FAIRGPU_CYCLE_INTERVAL_S": "1",
    "FAIRGPU_CYCLE_MIN_GAP_S": "0.2",
    "FAIRGPU_HEARTBEAT_INTERVAL_S": "2",
    "FAIRGPU_HEARTBEAT_LONG_POLL_S": "2",
    "FAIRGPU_POLICY_PREEMPTION_GRACE_S": "2",
    "FAIRGPU_POLICY_MIN_RUNTIME_S": "4",
    "FAIRGPU_NODE_TIMEOUT_S": "30",
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    url: str
    admin_token: str
    agent_metrics: list[str]
    workdir: Path
    server_ready_s: float
    fleet: Fleet

    def wait_nodes(self) -> None:
        """Block until every agent has registered its GPUs and the node is ready."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        with httpx.Client(base_url=self.url, headers=headers) as http:
            deadline = time.monotonic() + AGENTS_READY_S
            ready = 0
            while time.monotonic() < deadline:
                self.fleet.check_alive()
                nodes = _all_nodes(http)
                ready = sum(1 for n in nodes if n["state"] == "ready" and n["gpus_total"] > 0)
                if ready == self.nodes:
                    return
                time.sleep(0.1)
        raise HarnessError(
            f"only {ready} of {self.nodes} agents registered in {AGENTS_READY_S:.0f} s"
        )


def _all_nodes(http: httpx.Client) -> list[dict[str, Any]]:
    """Every node, following the listing's pages."""
    nodes: list[dict[str, Any]] = []
    params: dict[str, str] = {}
    while True:
        page = http.get("/v1/nodes", params=params).json()
        nodes += page.get("data", [])
        if not page.get("next_cursor"):
            return nodes
        params = {"cursor": page["next_cursor"]}


@contextmanager
def cluster(
    workdir: Path,
    *,
    nodes: Sequence[tuple[str, str, str]],
    server_env: Mapping[str, str],
    database_url: str | None = None,
    agent_args: Sequence[str] = ("--time-limit-grace-s", "2"),
    isolation: str = "none",
    replicas: int = 1,
) -> Iterator[Cluster]:
    """Server + bootstrap + join token + agents (name, site, --simulate). With `replicas` 2 (on
    PostgreSQL) a second server replica takes the agents' reports while `url` is the first's,
    so that every interactive stream crosses from one to the other. Under strict isolation
    (as root) tasks reach their directories beside the agents' state through `workdir`, which
    must then be traversable (0711). Raises HarnessError when a process exits or is not ready."""
    cgroup_parent = f"fairgpu-{workdir.name}"  # this cluster's own, removed on the way out
    if isolation == "strict":
        os.chmod(workdir, 0o711)  # noqa: S103 - traversable, not listable
        agent_args = (*agent_args, "--cgroup-parent", cgroup_parent)
    db_url = database_url or f"sqlite:///{workdir / 'fairgpu.db'}"
    fleet = Fleet(workdir=workdir, database_url=db_url, server_env=dict(server_env))
    t0 = time.monotonic()
    try:
        url = fleet.server(log_level="warning", access_log=False, wait=False)
        token = fleet.bootstrap()  # while the server starts: migrating may race
        fleet.wait_ready(url)
        ready_s = time.monotonic() - t0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            join = http.post("/v1/join-tokens", json={"name": "demo", "uses": len(nodes)})
            if join.status_code != 201:
                raise HarnessError(
                    f"could not create a join token: {join.status_code} {join.text[:200]}"
                )
            join_token = join.json()["token"]
        agents_url = url
        if replicas > 1:
            agents_url = fleet.server("server-b", log_level="warning", access_log=False)
        metrics = []
        for name, site, gpus in nodes:
            port = free_port()
            metrics.append(f"http://127.0.0.1:{port}/metrics")
            fleet.agent(
                name, agents_url, join_token, gpus, tuple(agent_args),
                site=site, metrics_port=port, isolation=isolation, log_level="warning",
                time_limit_grace_s=None,
            )  # fmt: skip
        yield Cluster(
            nodes=len(nodes),
            url=url,
            admin_token=token,
            agent_metrics=metrics,
            workdir=workdir,
            server_ready_s=ready_s,
            fleet=fleet,
        )
    finally:
        fleet.close()
        if isolation == "strict":
            from agents.cgroups import CgroupError, open_hierarchy

            with suppress(CgroupError):
                open_hierarchy(cgroup_parent).remove()


def add_org(
    admin: httpx.Client,
    name: str,
    *,
    quotas: Mapping[str, tuple[int, int | None]],
    user: str,
    shares: float | None = None,
    role: str = "member",
) -> str:
    """Create org `name` with `quotas` ({GPU type: (guaranteed, limit)}) and one user of it
    (`role`); returns that user's token. `admin` is a platform admin's client."""
    org: dict[str, object] = {"name": name} if shares is None else {"name": name, "shares": shares}
    _ok(admin.post("/v1/orgs", json=org), f"create org {name}")
    for gpu_type, (guaranteed, limit) in quotas.items():
        quota = {"guaranteed": guaranteed, "limit": limit}
        _ok(admin.put(f"/v1/orgs/{name}/quota/{gpu_type}", json=quota), f"set {name}'s quota")
    created = _ok(
        admin.post("/v1/users", json={"name": user, "org": name, "role": role}),
        f"create user {user}",
    )
    issued = _ok(admin.post("/v1/tokens", json={"name": user, "user_id": created["id"]}), "token")
    return str(issued["token"])


def _ok(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 300:
        raise HarnessError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    body: dict[str, Any] = response.json()
    return body
