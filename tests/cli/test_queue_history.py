"""`queue` in one list call per page (reasons and names from the listing), `history -S/-E`
filtered by the server, and `submit -A` on behalf of another org."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cli.client import Client
from tests.harness.served import Served, get_json, wait_for


def test_queue_history_and_submit_on_behalf(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    served.ok("org", "create", "acme")
    served.ok("org", "create", "beta")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    token = ada["token"]
    first = int(served.ok("submit", "--parsable", "-G", "1", "-t", "1h", "true", token=token))
    held = int(served.ok("submit", "--parsable", "--hold", "-t", "1h", "true", token=token))

    def explained(job_id: int) -> dict[str, Any]:
        reply = get_json(served.url, f"/v1/jobs/{job_id}/explain", token)
        assert isinstance(reply, dict)
        return reply

    # No nodes: the scheduling cycle gives both jobs a reason; queue must show the first one.
    wait_for(lambda: all(explained(j)["reasons"] for j in (first, held)))
    why = explained(first)["reasons"][0]
    calls: list[tuple[str, str]] = []
    real = Client.request

    def counting(self: Client, method: str, path: str, **kw: Any) -> Any:
        calls.append((method, path))
        return real(self, method, path, **kw)

    monkeypatch.setattr(Client, "request", counting)
    table = served.ok("queue", "--start", "-o", "wide", token=token)
    assert calls == [("GET", "/v1/jobs")]
    assert f"({why['code']})" in table
    assert why["message"][:40] in table
    assert "(JobHeldUser)" in table
    assert " ada " in table
    assert " acme " in table
    listed = {j["id"]: j for j in json.loads(served.ok("queue", "-o", "json", token=token))}
    assert listed[first]["pending_reason"] == {"code": why["code"], "message": why["message"]}
    assert (listed[held]["org_name"], listed[held]["user_name"]) == ("acme", "ada")
    monkeypatch.setattr(Client, "request", real)

    # -A: a member may name only its own org; a platform admin submits for any org.
    refused = served.run("submit", "-A", "beta", "-t", "1h", "true", token=token)
    assert refused.exit_code != 0
    assert "own organisation" in refused.stderr
    assert "Traceback" not in refused.output
    assert "Submitted job" in served.ok("submit", "-A", "acme", "-t", "1h", "true", token=token)
    for_beta = int(served.ok("submit", "--parsable", "-A", "beta", "-t", "1h", "true"))
    beta = json.loads(served.ok("queue", "-A", "beta", "-o", "json"))
    assert [(j["id"], j["org_name"], j["user_name"]) for j in beta] == [(for_beta, "beta", "root")]
    missing = served.run("submit", "-A", "nope", "-t", "1h", "true")
    assert missing.exit_code != 0
    assert "not found" in missing.stderr

    # history: the server filters on end time.
    served.ok("cancel", str(first), str(held), token=token)
    ended = json.loads(served.ok("history", "-S", "1h", "-o", "json", token=token))
    assert sorted(j["id"] for j in ended) == [first, held]
    assert ended[0]["org_name"] == "acme"
    assert json.loads(served.ok("history", "-S", "2099-01-01", "-o", "json", token=token)) == []
    before = served.ok("history", "-S", "2000-01-01", "-E", "2001-01-01", "-o", "json")
    assert json.loads(before) == []
    assert "CANCELLED" in served.ok("history", "-E", "now", "-o", "wide", token=token)
