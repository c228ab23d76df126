"""Secrets and cross-tenant data on the live server: tokens are stored only as SHA-256 and never
logged (the server runs at debug level with its access log on); job logs go only to the job's
org; a node's credential cannot report on, or write logs for, another node's tasks."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from typing import Any

import httpx

from scheduler.bench.procs import wait_for
from tests.security.conftest import Live


def _register(live: Live, name: str) -> str:
    body = {
        "name": name, "site": "dc1", "domain": "r1", "hostname": name, "address": "a",
        "agent_version": "t",
        "gpus": [{"index": 0, "uuid": f"GPU-{name}-0", "model": "H100", "memory_bytes": 1}],
    }  # fmt: skip
    with live.client("join") as c:
        r = c.post("/v1/agent/register", json=body)
    assert r.status_code == 200, r.text
    credential: str = r.json()["credential"]
    return credential


def _heartbeat(credential: str, live: Live, **body: Any) -> dict[str, Any]:
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {credential}"}) as c:
        r = c.post("/v1/agent/heartbeat", json={"wait_s": 0, **body})
    assert r.status_code == 200, r.text
    reply: dict[str, Any] = r.json()
    return reply


def _task_of(live: Live, job_key: str) -> tuple[int, int]:
    """(task id, job id) of a seeded job once the scheduler has placed it on the seeded node."""
    job_id = live.ids[job_key]
    db = sqlite3.connect(live.fleet.database_url.removeprefix("sqlite:///"))
    try:

        def task() -> int | None:
            row = db.execute("SELECT id FROM tasks WHERE job_id = ?", (job_id,)).fetchone()
            return int(row[0]) if row else None

        task_id: int = wait_for(f"job {job_id} placed", task, 20)
    finally:
        db.close()
    return task_id, job_id


def test_tokens_are_stored_hashed_and_never_logged(live: Live) -> None:
    with live.client("member_a") as c:
        fresh = c.post("/v1/tokens", json={"name": "fresh"}).json()["token"]
        c.get("/v1/jobs")
    unknown = "fg_u_" + uuid.uuid4().hex * 2
    with httpx.Client(base_url=live.url) as c:
        for secret in [*live.tokens.values(), fresh, unknown]:
            c.get("/v1/users/me", headers={"Authorization": f"Bearer {secret}"})
            c.post("/v1/agent/heartbeat", headers={"Authorization": f"Bearer {secret}"}, json={})
    secrets = [*live.tokens.values(), fresh, unknown]
    log = live.server_log
    assert "GET /v1/users/me" in log, "the access log is on"
    leaked = [s[:12] for s in secrets if s in log or s[5:] in log]
    assert not leaked, f"secrets in the server log: {leaked}"

    db = sqlite3.connect(live.fleet.database_url.removeprefix("sqlite:///"))
    try:
        hashes = {h for (h,) in db.execute("SELECT token_hash FROM api_tokens")}
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    for secret in [*live.tokens.values(), fresh]:
        assert hashlib.sha256(secret.encode()).hexdigest() in hashes
        assert secret not in dump
        assert secret[5:] not in dump


def test_logs_go_only_to_the_jobs_org(live: Live) -> None:
    task_id, job_id = _task_of(live, "job_member_a")
    marker = f"secret-training-output-{uuid.uuid4().hex}"
    chunk = {"task_id": task_id, "offset": 0, "next_offset": len(marker) + 1, "data": marker + "\n"}
    _heartbeat(live.tokens["agent"], live, logs=[chunk])
    with live.client("member_a") as c:
        wait_for("own log", lambda: marker in c.get(f"/v1/jobs/{job_id}/logs").text, 10)
    for who, status in (("member_b", 404), ("agent", 403), ("join", 403), (None, 401)):
        with live.client(who) as c:
            for params in ({}, {"tail": 100}, {"offset": 0, "rank": 0}, {"wait_s": 1}):
                r = c.get(f"/v1/jobs/{job_id}/logs", params=params)
                assert r.status_code == status, (who, params, r.text)
                assert marker not in r.text


def test_a_node_cannot_report_for_another_nodes_task(live: Live) -> None:
    task_id, job_id = _task_of(live, "job_member_b")
    intruder = _register(live, f"intruder-{uuid.uuid4().hex[:6]}")
    forged = f"forged-{uuid.uuid4().hex}"
    report = {"task_id": task_id, "job_id": job_id, "state": "exited", "exit_code": 0}
    chunk = {"task_id": task_id, "offset": 0, "next_offset": 10**6, "data": forged}
    _heartbeat(intruder, live, tasks=[report], logs=[chunk])
    _heartbeat(intruder, live, tasks=[{**report, "state": "running"}])
    with live.client("member_b") as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        logs = c.get(f"/v1/jobs/{job_id}/logs").text
    assert job["state"] not in ("COMPLETED", "FAILED"), job
    assert forged not in logs
    db = sqlite3.connect(live.fleet.database_url.removeprefix("sqlite:///"))
    try:
        (state, exit_code) = db.execute(
            "SELECT state, exit_code FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
    finally:
        db.close()
    assert exit_code is None
    assert state in ("STARTING", "RUNNING"), state


def test_job_secrets_reach_the_task_only(live: Live) -> None:
    """The per-job secret is in the task's spec, and in no API answer and no server log line."""
    task_id, job_id = _task_of(live, "job_member_a")
    reply = _heartbeat(live.tokens["agent"], live)
    (spec,) = [s for s in reply["start"] if s["task_id"] == task_id]
    secret = spec["job_secret"]
    assert isinstance(secret, str)
    assert len(secret) >= 32
    for who in ("member_a", "admin_a", "platform"):
        with live.client(who) as c:
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/events"):
                r = c.get(path)
                assert r.status_code == 200, (who, path, r.text)
                assert secret not in r.text
                assert "job_secret" not in r.text
    assert secret not in live.server_log
