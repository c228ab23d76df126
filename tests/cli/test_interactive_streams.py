"""The agent's side of a terminal stream, driven by hand against the real server (uvicorn on
loopback, real WebSockets): only the node a stream is for may open it, never a user token nor
another node's credential; then the relay carries frames both ways and the exit status."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from protocol.agent import AGENT_CAPABILITIES
from tests.harness.served import Served, wait_for


def _ws(served: Served, path: str, token: str) -> ClientConnection:
    url = served.url.replace("http://", "ws://") + path
    return connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10)


def _refused(served: Served, path: str, token: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        _ws(served, path, token)
    response = refused.value.response
    assert json.loads(response.body or b"{}")["status"] == response.status_code  # a problem
    return response.status_code


class FakeAgent:
    """A node speaking the agent protocol over HTTP, as `fairgpu agent` does."""

    def __init__(self, served: Served, name: str, gpus: int = 1) -> None:
        self.served = served
        join = json.loads(served.ok("join-token", "create", "-o", "json"))["token"]
        body = {
            "name": name, "site": "dc1", "domain": "rack1", "hostname": name,
            "address": "127.0.0.1", "agent_version": "test",
            "gpus": [
                {"index": i, "uuid": f"GPU-{name}-{i}", "model": "H100", "memory_bytes": 1 << 36}
                for i in range(gpus)
            ],
            "capabilities": list(AGENT_CAPABILITIES),
        }  # fmt: skip
        registered = self._post("/v1/agent/register", join, body)
        self.credential = str(registered["credential"])

    def _post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(
            self.served.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def heartbeat(self, **body: Any) -> dict[str, Any]:
        return self._post("/v1/agent/heartbeat", self.credential, body)


def test_only_its_node_opens_a_stream_and_the_relay_carries_frames(served: Served) -> None:
    served.ok("org", "create", "acme")
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "1")
    owner = json.loads(
        served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json")
    )["token"]
    node = FakeAgent(served, "n1")
    other = FakeAgent(served, "n2")
    # Interactive, as `run --pty` submits it.
    response = httpx.post(
        served.url + "/v1/jobs",
        json={"command": ["bash"], "gpus_per_node": 1, "time_limit": 600, "interactive": True},
        headers={"Authorization": f"Bearer {owner}"},
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    starts: list[dict[str, Any]] = []

    def started() -> bool:
        starts.extend(s for s in node.heartbeat(wait_s=1)["start"] if s["job_id"] == job_id)
        return bool(starts)

    wait_for(started)
    spec = starts[0]
    assert spec["pty"] is True
    at = datetime.now(UTC).isoformat()
    report = {"task_id": spec["task_id"], "job_id": job_id, "state": "running", "started_at": at}
    node.heartbeat(tasks=[report])

    # The user's side is accepted at once and waits for the node's.
    with _ws(served, f"/v1/jobs/{job_id}/attach", owner) as user:
        streams = node.heartbeat(tasks=[report])["streams"]
        assert [s["task_id"] for s in streams] == [spec["task_id"]]
        path = f"/v1/agent/streams/{streams[0]['id']}"
        assert _refused(served, path, owner) == 404  # a user token
        assert _refused(served, path, other.credential) == 404  # another node's credential
        assert _refused(served, "/v1/agent/streams/" + "x" * 32, node.credential) == 404

        with _ws(served, path, node.credential) as agent:
            user.send(b"typed")
            assert agent.recv(timeout=10) == b"typed"
            user.send(json.dumps({"type": "resize", "rows": 5, "cols": 7}))
            assert json.loads(agent.recv(timeout=10)) == {"type": "resize", "rows": 5, "cols": 7}
            agent.send(b"printed")
            assert user.recv(timeout=10) == b"printed"
            agent.send(json.dumps({"type": "exit", "code": 7}))
            assert json.loads(user.recv(timeout=10)) == {"type": "exit", "code": 7}
    # Claimed once: the same id cannot be opened again, even by its node.
    assert _refused(served, path, node.credential) == 404
