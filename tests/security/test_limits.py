"""Hostile sizes and shapes at the real server (uvicorn in front): each gets a 4xx problem with a
clear detail, never a 500, and the server keeps serving. (Field-by-field submission rules are in
tests/api/test_jobs.py; this is what only a real server, or another endpoint, shows.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.security.conftest import Live

BIG = 2**64
JOB = {"command": ["sleep", "1"], "time_limit": 60}


def _problem(r: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == r.status_code
    assert body["detail"]
    return body


def test_oversized_and_deeply_nested_bodies(live: Live) -> None:
    with live.client("member_a") as c:
        huge = b'{"command": ["' + b"x" * (16 * 1024 * 1024) + b'"], "time_limit": 60}'
        _problem(
            c.post("/v1/jobs", content=huge, headers={"content-type": "application/json"}), 413, 422
        )
        nested = (
            b'{"command": ["x"], "time_limit": 60, "env": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        )
        _problem(
            c.post("/v1/jobs", content=nested, headers={"content-type": "application/json"}),
            400,
            413,
            422,
        )
        args = {"command": ["x"] * 100_000, "time_limit": 60}
        _problem(c.post("/v1/jobs", json=args), 413, 422)
        env = {
            "command": ["x"],
            "time_limit": 60,
            "env": {f"V{i}": "x" * 1000 for i in range(5000)},
        }
        _problem(c.post("/v1/jobs", json=env), 413, 422)
        assert c.get("/v1/jobs").status_code == 200  # still serving


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/orgs", {"name": "evil\u202eorg"}),  # right-to-left override
        ("POST", "/v1/orgs", {"name": "a\x00b"}),
        ("POST", "/v1/orgs", {"name": "x" * 10_000}),
        ("POST", "/v1/orgs", {"name": "ok-org", "shares": -1}),
        ("POST", "/v1/orgs", {"name": "ok-org", "shares": BIG}),
        ("POST", "/v1/orgs", {"name": "ok-org", "default_time_limit": 2**31}),  # an INTEGER
        ("PATCH", "/v1/orgs/acme", {"default_time_limit": 2**31}),
        ("PATCH", "/v1/orgs/acme", {"default_time_limit": "99999999d"}),
        ("POST", "/v1/users", {"name": "bob\nroot", "org": "acme"}),
        ("POST", "/v1/users", {"name": "\u0000", "org": "acme"}),
        ("PUT", "/v1/orgs/acme/quota/H100", {"guaranteed": -1}),
        ("PUT", "/v1/orgs/acme/quota/H100", {"guaranteed": BIG, "limit": BIG}),
        ("PUT", "/v1/orgs/acme/quota/H100", {"guaranteed": 4, "limit": 2}),
        ("POST", "/v1/tokens", {"name": "t", "ttl_s": -5}),
        ("POST", "/v1/tokens", {"name": "t", "ttl_s": BIG}),
        ("POST", "/v1/tokens", {"name": "t", "ttl": BIG}),
        ("POST", "/v1/join-tokens", {"uses": -1}),
        ("POST", "/v1/join-tokens", {"uses": BIG}),
        ("POST", "/v1/jobs", {**JOB, "gpus_per_node": -1}),
        ("POST", "/v1/jobs", {**JOB, "gpus_per_node": BIG}),
        ("POST", "/v1/jobs", {**JOB, "nodes": BIG}),
        ("POST", "/v1/jobs", {**JOB, "time_limit": -60}),
        ("POST", "/v1/jobs", {**JOB, "time_limit": BIG}),
        ("POST", "/v1/jobs", {**JOB, "name": "\u0007bell"}),
        # an option of the node's container runtime: every device of the node, or root
        ("POST", "/v1/jobs", {**JOB, "image": "--privileged"}),
        ("POST", "/v1/jobs", {**JOB, "image": "--user=0"}),
    ],
)
def test_bad_values_are_clear_4xx(live: Live, method: str, path: str, body: Any) -> None:
    with live.client("platform" if "/v1/jobs" not in path else "member_a") as c:
        _problem(c.request(method, path, json=body), 400, 404, 409, 422)


@pytest.mark.parametrize(
    "body",
    [
        {"tasks": [{"task_id": -(2**63) - 1, "job_id": 1, "state": "running"}]},
        {"tasks": [{"task_id": 1, "job_id": BIG, "state": "exited", "exit_code": BIG}]},
        {"logs": [{"task_id": 1, "offset": 0, "next_offset": BIG, "data": "x"}]},
        {"samples": [{"index": 0, "uuid": "GPU-sec-0", "sampled_at": "2026-01-01T00:00:00Z",
                      "memory_total_bytes": BIG, "power_w": 1e308}]},
    ],
)  # fmt: skip
def test_agent_reports_with_huge_numbers_are_4xx(live: Live, body: Any) -> None:
    with live.client("agent") as c:
        _problem(c.post("/v1/agent/heartbeat", json={**body, "wait_s": 0}), 422)


def test_agent_register_with_huge_memory_is_4xx(live: Live) -> None:
    gpu = {"index": 0, "uuid": "GPU-big-0", "model": "H100", "memory_bytes": BIG}
    body = {
        "name": "big", "site": "dc1", "domain": "r1", "hostname": "big", "address": "a",
        "agent_version": "t", "gpus": [gpu],
    }  # fmt: skip
    with live.client("join") as c:
        _problem(c.post("/v1/agent/register", json=body), 422)


def test_huge_ids_in_queries_are_4xx(live: Live) -> None:
    """Found by schemathesis: an id beyond the column's range reached the database (500)."""
    with live.client("platform") as c:
        _problem(c.get("/v1/tokens", params={"user_id": 2**70}), 404, 422)


def test_csv_usage_is_documented(live: Live) -> None:
    """Found by schemathesis: `format=csv` answers text/csv, which the schema did not say."""
    spec = httpx.get(f"{live.url}/openapi.json").json()
    content = spec["paths"]["/v1/usage"]["get"]["responses"]["200"]["content"]
    assert "text/csv" in content
    with live.client("member_a") as c:
        r = c.get("/v1/usage", params={"format": "csv"})
    assert r.headers["content-type"].startswith("text/csv")


def test_bodies_over_the_limit_are_413_before_being_read(live: Live) -> None:
    big = b'{"command": ["x"], "time_limit": 60, "name": "' + b"n" * (2 * 1024 * 1024) + b'"}'

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    with live.client("member_a") as c:
        declared = c.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
        streamed = c.post(
            "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in streamed.request.headers
        body = _problem(declared, 413)
        assert "larger than" in body["detail"]
        _problem(streamed, 413)
        assert c.get("/v1/jobs").status_code == 200
    with live.client("agent") as c:  # a heartbeat full of logs is larger, and allowed
        logs = [
            {"task_id": 987654, "offset": i * 60000, "next_offset": (i + 1) * 60000,
             "data": "y" * 60000}
            for i in range(40)
        ]  # fmt: skip
        r = c.post("/v1/agent/heartbeat", json={"logs": logs, "wait_s": 0})
        assert r.status_code == 200, r.text[:300]
