"""A whole fairgpu cluster on this machine: a server, its first admin, a join token and agents
with simulated GPUs, all started through `procs.Fleet` and all stopped on the way out.
`fairgpu demo`, `fairgpu bench latency` / `bench cli` and the end-to-end tests use it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

from scheduler.bench.procs import Fleet, HarnessError, fairgpu_command, free_port

SERVER_START_S = 30.0
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
                nodes = http.get("/v1/nodes").json().get("data", [])
                ready = sum(1 for n in nodes if n["state"] == "ready" and n["gpus_total"] > 0)
                if ready == self.nodes:
                    return
                time.sleep(0.1)
        raise HarnessError(
            f"only {ready} of {self.nodes} agents registered in {AGENTS_READY_S:.0f} s"
        )


@contextmanager
def cluster(
    workdir: Path,
    *,
    nodes: Sequence[tuple[str, str, str]],
    server_env: Mapping[str, str],
    database_url: str | None = None,
    agent_args: Sequence[str] = ("--time-limit-grace-s", "2"),
    isolation: str = "none",
) -> Iterator[Cluster]:
    """Server + bootstrap + join token + agents (name, site, --simulate). Under strict isolation
    (as root) tasks reach their directories beside the agents' state through `workdir`, which
    must then be traversable (0711). Raises HarnessError when a process exits or is not ready."""
    cgroup_parent = f"fairgpu-{workdir.name}"  # this cluster's own, removed on the way out
    if isolation == "strict":
        os.chmod(workdir, 0o711)  # noqa: S103 - traversable, not listable
        agent_args = (*agent_args, "--cgroup-parent", cgroup_parent)
    db_url = database_url or f"sqlite:///{workdir / 'fairgpu.db'}"
    fleet = Fleet(workdir=workdir, database_url=db_url)
    cmd = fairgpu_command()
    t0 = time.monotonic()
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server_args = [*cmd, "server", "--host", "127.0.0.1", "--port", str(port)]
        server = fleet.start(
            "server",
            [*server_args, "--log-level", "warning", "--no-access-log"],
            {**server_env, "FAIRGPU_DATABASE_URL": db_url},
        )
        token = _bootstrap(fleet, cmd, db_url)  # while the server starts: migrating may race
        _wait_ready(url, fleet, server.name)
        ready_s = time.monotonic() - t0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            join = http.post("/v1/join-tokens", json={"name": "demo", "uses": len(nodes)})
            if join.status_code != 201:
                raise HarnessError(
                    f"could not create a join token: {join.status_code} {join.text[:200]}"
                )
            join_token = join.json()["token"]
        metrics = []
        for name, site, gpus in nodes:
            mport = free_port()
            metrics.append(f"http://127.0.0.1:{mport}/metrics")
            fleet.start(
                name,
                [
                    *cmd, "agent", "--server", url, "--join-token", join_token,
                    "--simulate", gpus, "--name", name, "--site", site,
                    "--domain", f"{site}-rack1", "--state-dir", str(workdir / name),
                    "--metrics-port", str(mport), "--metrics-addr", "127.0.0.1",
                    "--log-level", "warning", "--isolation", isolation, *agent_args,
                ],
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


def _bootstrap(fleet: Fleet, cmd: list[str], db_url: str) -> str:
    boot = subprocess.Popen(
        [*cmd, "admin", "bootstrap", "--name", "admin"],
        env=fleet.env({"FAIRGPU_DATABASE_URL": db_url}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=fleet.workdir,
    )
    try:
        out, err = boot.communicate(timeout=SERVER_START_S)
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()
    if boot.returncode != 0 or not out.strip():
        raise HarnessError(f"admin bootstrap failed: {err.strip() or out.strip()}")
    return out.strip().splitlines()[-1]


def _wait_ready(url: str, fleet: Fleet, name: str) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        fleet.check_alive()
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise HarnessError(
        f"the server did not become ready in {SERVER_START_S:.0f} s: "
        f"{fleet.procs[name].last_lines()}"
    )
