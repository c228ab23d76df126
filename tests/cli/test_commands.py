"""Every user and admin command against the real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import stat
from typing import Any

import httpx
import yaml

from tests.harness.served import Served


def as_json(served: Served, *args: str, token: str | None = None) -> Any:
    return json.loads(served.ok(*args, "-o", "json", token=token))


def register(
    served: Served, join_token: str, name: str = "n1", isolation: str = "none"
) -> dict[str, Any]:
    """An agent's registration of a 2xH100 node, straight over HTTP; the server's reply."""
    body = {
        "name": name,
        "site": "dc1",
        "domain": "rack1",
        "hostname": name,
        "address": "127.0.0.1",
        "agent_version": "test",
        "isolation": isolation,
        "gpus": [
            {"index": i, "uuid": f"GPU-{name}-{i}", "model": "H100", "memory_bytes": 80 << 30}
            for i in range(2)
        ],
    }
    r = httpx.post(
        f"{served.url}/v1/agent/register",
        json=body,
        headers={"Authorization": f"Bearer {join_token}"},
    )
    assert r.status_code in (200, 201), r.text
    reply: dict[str, Any] = r.json()
    return reply


def register_node(served: Served, join_token: str, name: str = "n1") -> int:
    return int(register(served, join_token, name)["node_id"])


def test_admin_and_user_commands(served: Served) -> None:
    # Platform admin: orgs, quotas, users, tokens, join tokens, nodes.
    assert "Created org acme" in served.ok("org", "create", "acme", "--shares", "2")
    served.ok("org", "create", "beta", "--default-time", "2h")
    orgs = as_json(served, "org", "list")
    assert [o["name"] for o in orgs] == ["acme", "beta"]
    assert orgs[1]["default_time_limit_s"] == 7200
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "8", "--limit", "16")
    assert as_json(served, "quota", "show", "acme") == [
        {"gpu_type": "H100", "guaranteed": 8, "limit": 16}
    ]
    assert "H100:8/16" in served.ok("org", "list")
    created = as_json(served, "user", "create", "ada", "--org", "acme", "--token")
    ada = created["token"]
    assert created["name"] == "ada"
    assert created["role"] == "member"
    users = as_json(served, "user", "list")
    assert {u["name"]: u["org"] for u in users} == {"root": None, "ada": "acme"}
    assert yaml.safe_load(served.ok("user", "list", "-o", "yaml"))[1]["name"] == "ada"
    no_headers = served.ok("user", "list", "--no-headers").splitlines()
    assert [line.split()[1] for line in no_headers if line.strip()] == ["root", "ada"]

    join = as_json(served, "join-token", "create", "--uses", "1", "--ttl", "1h")
    assert join["token"]
    assert [t["id"] for t in as_json(served, "join-token", "list")] == [join["id"]]
    node_id = register_node(served, join["token"])
    nodes = as_json(served, "node", "list")
    assert nodes[0]["name"] == "n1"
    assert nodes[0]["gpus_total"] == 2
    assert "Node n1: drain" in served.ok("node", "drain", "n1", "--reason", "maintenance")
    assert as_json(served, "node", "show", str(node_id))["state"] in ("draining", "drained")
    assert "maintenance" in served.ok("node", "list", "-o", "wide")
    assert "Node n1: ready" in served.ok("node", "resume", "n1")
    assert "2x" in served.ok("node", "show", "n1")
    served.ok("node", "drain", "n1")  # keep the member's jobs below pending

    # A member: whoami, submit, queue, describe, explain, hold, release, cancel, history.
    assert "ada (member) in acme" in served.ok("whoami", token=ada)
    out = served.ok(
        "submit", "-G", "H100:2", "-t", "1h30m", "-J", "train", "-e", "LR=3", "--hold",
        "--", "python", "train.py", "--lr", "3",
        token=ada,
    )  # fmt: skip
    assert out.strip() == "Submitted job 1"
    job2 = served.ok(
        "submit", "--parsable", "-A", "acme", "-G", "1", "-N", "2", "-t", "2-00:00:00",
        "--priority", "low", "--preemptible", "--after", "1", "sleep", "60",
        token=ada,
    )  # fmt: skip
    assert job2.strip() == "2"
    job = as_json(served, "describe", "1", token=ada)
    assert job["command"] == ["python", "train.py", "--lr", "3"]
    assert job["gpu_type"] == "H100"
    assert job["gpus_per_node"] == 2
    assert job["time_limit_s"] == 5400
    assert job["env"] == {"LR": "3"}
    assert job["held"] is True
    assert job["events"][0]["to_state"] == "PENDING"
    second = as_json(served, "describe", "2", token=ada)
    assert (second["nodes"], second["time_limit_s"], second["depends_on"]) == (2, 172_800, [1])
    assert "Command: python train.py --lr 3" in served.ok("describe", "1", token=ada)

    queue = as_json(served, "queue", token=ada)
    assert [j["id"] for j in queue] == [1, 2]
    table = served.ok("queue", "--start", token=ada)
    assert "JOBID" in table
    assert "START" in table
    assert "(JobHeldUser)" in table
    assert "H100:2" in table
    assert [j["id"] for j in as_json(served, "queue", "--me", "-A", "acme", token=ada)] == [1, 2]
    assert as_json(served, "queue", "-t", "R", token=ada) == []

    explained = as_json(served, "explain", "1", token=ada)
    assert explained["job_id"] == 1
    assert explained["held"] is True
    assert "Job 1: pending" in served.ok("explain", "1", token=ada)

    assert "Released job 1" in served.ok("release", "1", token=ada)
    assert "Held job 1" in served.ok("hold", "1", token=ada)
    out = served.ok("cancel", "1", "2", token=ada)
    assert "Cancelled job 1\n" in out
    assert "Cancelled job 2\n" in out
    history = as_json(served, "history", token=ada)
    assert sorted((j["id"], j["state"]) for j in history) == [(1, "CANCELLED"), (2, "CANCELLED")]
    assert as_json(served, "history", "-S", "2099-01-01", token=ada) == []
    assert "CANCELLED" in served.ok("history", "-o", "wide", token=ada)
    assert served.ok("logs", "1", token=ada) == ""

    # Standing and accounting.
    shares = as_json(served, "share", token=ada)
    assert [r["org"] for r in shares["data"]] == ["acme"]
    assert "FAIRSHARE" in served.ok("share")
    usage = as_json(served, "usage", "--by", "user", "--period", "week")
    assert usage["by"] == "user"
    assert usage["data"] == []

    # Tokens: issue, list, revoke; a revoked token is refused.
    issued = as_json(served, "token", "create", "--name", "ci", "--ttl", "1d", token=ada)
    assert "ci" in [t["name"] for t in as_json(served, "token", "list", token=ada)]
    served.ok("token", "revoke", str(issued["id"]), token=ada)
    refused = served.run("queue", token=issued["token"])
    assert refused.exit_code == 4
    assert "not authenticated" in refused.stderr


def test_login_writes_a_private_config_file_and_env_overrides_it(served: Served) -> None:
    env = {"FAIRGPU_CONFIG_DIR": str(served.config_dir), "COLUMNS": "200"}
    result = served.runner.invoke(
        __import__("cli.main", fromlist=["app"]).app,
        ["login", "--server", served.url, "--token", served.admin_token],
        env={**env, "FAIRGPU_SERVER": "", "FAIRGPU_TOKEN": ""},
    )
    assert result.exit_code == 0, result.output
    assert "as root (platform-admin)" in result.stdout
    path = served.config_dir / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"server": served.url, "token": served.admin_token}
    # No variables: the file is used.
    from cli.main import app

    ok = served.runner.invoke(
        app, ["whoami"], env={**env, "FAIRGPU_SERVER": "", "FAIRGPU_TOKEN": ""}
    )
    assert ok.exit_code == 0, ok.output
    assert "root" in ok.stdout
    # FAIRGPU_TOKEN wins over the file.
    bad = served.runner.invoke(app, ["whoami"], env={**env, "FAIRGPU_TOKEN": "nope"})
    assert bad.exit_code == 4
    # A bad token at login is refused before anything is saved.
    again = served.runner.invoke(
        app, ["login", "--server", served.url, "--token", "wrong"], env={**env, "FAIRGPU_TOKEN": ""}
    )
    assert again.exit_code == 4
    assert json.loads(path.read_text())["token"] == served.admin_token
