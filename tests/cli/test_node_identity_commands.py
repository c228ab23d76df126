"""`fairgpu join-token create` defaults and `node approve|revoke|delete` against the real server."""

from __future__ import annotations

import json

import httpx

from tests.cli.test_commands import register_node
from tests.harness.served import Served


def test_node_identity_commands(served: Served) -> None:
    join = json.loads(served.ok("join-token", "create", "-o", "json"))
    (listed,) = json.loads(served.ok("join-token", "list", "-o", "json"))
    assert listed["id"] == join["id"]
    assert listed["uses_left"] == 1
    node_id = register_node(served, join["token"], name="n7")

    again = json.loads(
        served.ok("join-token", "create", "--uses", "2", "--ttl", "1h", "-o", "json")
    )
    body = {"name": "n7", "site": "dc1", "domain": "r", "hostname": "n7", "address": "a",
            "agent_version": "t", "gpus": []}  # fmt: skip
    headers = {"Authorization": f"Bearer {again['token']}"}
    refused = httpx.post(f"{served.url}/v1/agent/register", json=body, headers=headers)
    assert refused.status_code == 409
    assert "allowed until" in served.ok("node", "approve", "n7")
    assert register_node(served, again["token"], name="n7") == node_id

    assert "credential revoked, down" in served.ok("node", "revoke", "n7")
    assert "Deleted node n7" in served.ok("node", "delete", "n7")
    assert json.loads(served.ok("node", "list", "-o", "json")) == []
