"""Tenant isolation from the CLI (#13): `org update`, `org get`, `submit --mem`, `describe`,
`node list -o wide`, against the real server on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.cli.test_commands import register
from tests.cli.test_errors import one_line
from tests.harness.served import Served, wait_for

REFUSED = "workdir /etc is outside the data roots allowed to org acme (/data/acme)"


def _as_json(served: Served, *args: str, token: str | None = None) -> Any:
    return json.loads(served.ok(*args, "-o", "json", token=token))


def _register(served: Served, name: str, isolation: str) -> str:
    join = _as_json(served, "join-token", "create", "--uses", "1", "--ttl", "1h")
    return str(register(served, join["token"], name, isolation)["credential"])


def _heartbeat(served: Served, credential: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{served.url}/v1/agent/heartbeat",
        json=body,
        headers={"Authorization": f"Bearer {credential}"},
    )
    assert r.status_code == 200, r.text
    reply: dict[str, Any] = r.json()
    return reply


def test_org_isolation_and_images(served: Served) -> None:
    served.ok("org", "create", "acme")
    served.ok("org", "create", "acme-lab", "--parent", "acme")
    assert "Updated org acme" in served.ok("org", "update", "acme", "--require-isolation")
    got = served.ok("org", "get", "acme")
    assert "ISOLATION" in got
    assert "required" in got
    listed = {o["name"]: o for o in _as_json(served, "org", "list")}
    assert listed["acme"]["require_isolation"] is True
    assert listed["acme-lab"]["isolation_required"] is True
    assert "inherited" in served.ok("org", "get", "acme-lab")

    served.ok("org", "update", "acme", "--images", "registry.example/acme/*", "--images", "base/*")
    org = _as_json(served, "org", "get", "acme")
    assert org["image_patterns"] == ["registry.example/acme/*", "base/*"]
    assert "registry.example/acme/*,base/*" in served.ok("org", "list", "-o", "wide")
    user = _as_json(served, "user", "create", "ada", "--org", "acme", "--token")["token"]
    served.ok(
        "submit", "--image", "registry.example/acme/train:1", "-t", "1h", "--", "x", token=user
    )
    refused = served.run("submit", "--image", "evil.example/x", "-t", "1h", "--", "x", token=user)
    assert refused.exit_code != 0
    line = one_line(refused.stderr)
    assert "registry.example/acme/*" in line
    assert refused.stdout == ""
    denied = served.run("org", "update", "acme", "--no-require-isolation", token=user)
    assert denied.exit_code != 0
    one_line(denied.stderr)

    served.ok("org", "update", "acme", "--images", "", "--no-require-isolation")
    org = _as_json(served, "org", "get", "acme")
    assert (org["image_patterns"], org["require_isolation"]) == ([], False)
    served.ok("submit", "--image", "evil.example/x", "-t", "1h", "--", "x", token=user)
    nothing = served.run("org", "update", "acme")
    assert nothing.exit_code == 2


def test_org_private_network(served: Served) -> None:
    served.ok("org", "create", "acme")
    served.ok("org", "create", "acme-lab", "--parent", "acme")
    assert "Updated org acme" in served.ok("org", "update", "acme", "--require-private-network")
    rows = {line.split()[1]: line for line in served.ok("org", "list", "-o", "wide").splitlines()}
    assert "NETWORK" in served.ok("org", "list", "-o", "wide").splitlines()[0]
    assert " private " in f"{rows['acme']} "
    assert "private-inherited" in rows["acme-lab"]
    user = _as_json(served, "user", "create", "ada", "--org", "acme-lab", "--token")["token"]
    refused = served.run("submit", "--network", "host", "-t", "1h", "--", "x", token=user)
    assert refused.exit_code != 0
    assert "require_private_network" in one_line(refused.stderr)
    assert refused.stdout == ""
    job_id = served.ok("submit", "-t", "1h", "--parsable", "--", "x", token=user).strip()
    assert _as_json(served, "describe", job_id, token=user)["network"] == "private"
    gang = served.ok("submit", "-N", "2", "-t", "1h", "--parsable", "--", "x", token=user)
    assert _as_json(served, "describe", gang.strip(), token=user)["network"] is None
    denied = served.run("org", "update", "acme", "--no-require-private-network", token=user)
    assert denied.exit_code != 0
    one_line(denied.stderr)
    served.ok("org", "update", "acme", "--no-require-private-network")
    assert _as_json(served, "org", "get", "acme-lab")["private_network_required"] is False


def test_mem_describe_and_a_refused_task(served: Served) -> None:
    served.ok("org", "create", "acme")
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "2")
    user = _as_json(served, "user", "create", "ada", "--org", "acme", "--token")["token"]
    cred = _register(served, "iso1", "strict")
    _register(served, "loose1", "none")
    wide = served.ok("node", "list", "-o", "wide")
    assert "ISOLATION" in wide
    rows = {line.split()[1]: line for line in wide.splitlines()[1:]}
    assert "strict" in rows["iso1"]
    assert "none" in rows["loose1"]

    bad = served.run("submit", "--mem", "lots", "-t", "1h", "--", "x", token=user)
    assert bad.exit_code == 2
    assert "memory" in bad.stderr
    job_id = served.ok(
        "submit", "--mem", "64G", "--workdir", "/etc", "-t", "1h", "--parsable", "--", "x",
        token=user,
    ).strip()  # fmt: skip
    assert "64G per node" in served.ok("describe", job_id, token=user)
    assert _as_json(served, "describe", job_id, token=user)["memory_bytes"] == 64 << 30

    specs: list[dict[str, Any]] = []

    def started() -> bool:
        specs.extend(_heartbeat(served, cred)["start"])
        return bool(specs)

    wait_for(started)
    spec = specs[0]
    assert spec["job_id"] == int(job_id)
    assert spec["memory_bytes"] == 64 << 30
    report = {
        "task_id": spec["task_id"],
        "job_id": spec["job_id"],
        "state": "failed_to_start",
        "reason": REFUSED,
    }
    _heartbeat(served, cred, tasks=[report])
    described = served.ok("describe", job_id, token=user)
    assert f"FAILED ({REFUSED})" in described
    events = described.split("Events:")[1]
    assert "FAILED" in events
    assert "outside the data roots" in events

    # The agent restarts and reports its GPUs' memory share: the operator sees it.
    _heartbeat(served, cred, isolation="strict", memory_per_gpu_bytes=32 << 30)
    rows = {line.split()[1]: line for line in served.ok("node", "list", "-o", "wide").splitlines()}
    assert "MEM/GPU" in rows["NAME"]
    assert "32.0GiB" in rows["iso1"]
    assert "GiB" not in rows["loose1"]
