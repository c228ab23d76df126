"""A real `fairgpu server` (uvicorn, SQLite) seeded with two orgs, a user of every role and a
registered node, one per test module (the fuzzer may revoke tokens and cancel jobs); its log is
kept so tests can grep it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.bench.procs import Fleet


@dataclass
class Live:
    url: str
    fleet: Fleet
    tokens: dict[str, str] = field(default_factory=dict)  # role key -> bearer secret
    ids: dict[str, int] = field(default_factory=dict)  # users, orgs, jobs, node by key

    def client(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    @property
    def server_log(self) -> str:
        return self.fleet.procs["server"].tail(50_000_000)


def _ok(r: httpx.Response) -> Any:
    assert r.status_code < 300, r.text
    return r.json()


def seed(live: Live, admin_token: str) -> None:
    live.tokens["platform"] = admin_token
    with live.client("platform") as admin:
        for org in ("acme", "rival"):
            live.ids[org] = _ok(admin.post("/v1/orgs", json={"name": org}))["id"]
            _ok(admin.put(f"/v1/orgs/{org}/quota/H100", json={"guaranteed": 4, "limit": 8}))
        users = {
            "member_a": ("acme", "member"),
            "admin_a": ("acme", "org-admin"),
            "member_b": ("rival", "member"),
        }
        for key, (org, role) in users.items():
            user = _ok(
                admin.post(
                    "/v1/users", json={"name": key.replace("_", "-"), "org": org, "role": role}
                )
            )
            live.ids[key] = user["id"]
            live.tokens[key] = _ok(admin.post("/v1/tokens", json={"user_id": user["id"]}))["token"]
        join = _ok(admin.post("/v1/join-tokens", json={"name": "sec", "uses": 5}))["token"]
        live.tokens["join"] = join
    gpus = [
        {"index": i, "uuid": f"GPU-sec-{i}", "model": "H100", "memory_bytes": 80 << 30}
        for i in range(4)
    ]
    body = {
        "name": "sec-node", "site": "dc1", "domain": "r1", "hostname": "sec-node",
        "address": "127.0.0.1", "agent_version": "test", "gpus": gpus,
    }  # fmt: skip
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {join}"}) as c:
        registered = _ok(c.post("/v1/agent/register", json=body))
    live.tokens["agent"] = registered["credential"]
    live.ids["node"] = registered["node_id"]
    for key in ("member_a", "member_b"):
        with live.client(key) as c:
            job = _ok(c.post("/v1/jobs", json={"command": ["sleep", "1"], "time_limit": 60}))
            live.ids[f"job_{key}"] = job["id"]


FUZZ_ENV = {
    "FAIRGPU_CYCLE_INTERVAL_S": "1",
    "FAIRGPU_NODE_TIMEOUT_S": "3600",
    # Every role's token, join and node credentials included, on every route, all from one
    # address: the bound on an address's failed authentications (tests/api/test_auth_failures)
    # would answer most of the fuzz 429 before its route.
    "FAIRGPU_AUTH_FAILURE_RATE_PER_S": "0",
    # Each role's token reads every GET route with every example: past the read burst the fuzz
    # would meet the read rate (tests/security/test_read_rates) rather than the routes.
    "FAIRGPU_READ_RATE_PER_S": "0",
    "FAIRGPU_ORG_READ_RATE_PER_S": "0",
}


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-sec-"))
    fleet = Fleet(workdir=workdir, database_url=f"sqlite:///{workdir / 'fairgpu.db'}")
    try:
        admin = fleet.bootstrap()
        # debug logging and the access log: the secrets test greps everything the server wrote
        url = fleet.server(log_level="debug", **FUZZ_ENV)
        live = Live(url=url, fleet=fleet)
        seed(live, admin)
        yield live
    finally:
        fleet.close()
