"""Jobs' secret_env on a live server (SQLite and PostgreSQL, debug log, access log on): the values
reach the node's TaskSpec only; no API answer, no plain column and no log line carries them, and
refused submissions do not echo them."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError

from protocol.limits import MAX_ENV_BYTES
from scheduler.bench.procs import Fleet, wait_for
from scheduler.db import Job
from scheduler.db.engine import error_line, make_engine
from scheduler.secretenv import MASK, cipher, generate_key, seal
from scheduler.services.secretkeys import rotate_secret_env
from tests.scheduling.harness import fast_settings, running_cluster
from tests.security.conftest import Live, seed


@pytest.fixture
def keyed(database_url: str) -> Iterator[Live]:
    """A live server with a secret key (its old key second: both decrypt), seeded as `live`."""
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-secenv-"))
    fleet = Fleet(workdir=workdir, database_url=database_url)
    try:
        admin = fleet.bootstrap()
        url = fleet.server(
            log_level="debug",
            FAIRGPU_CYCLE_INTERVAL_S="0.5",
            FAIRGPU_NODE_TIMEOUT_S="3600",
            FAIRGPU_SECRET_KEYS=f"{generate_key()},{generate_key()}",
        )
        live = Live(url=url, fleet=fleet)
        seed(live, admin)
        yield live
    finally:
        fleet.close()


def _marker(tag: str) -> str:
    return f"s3cr3t-{tag}-{uuid.uuid4().hex}"


def _spec_of(live: Live, job_id: int) -> dict[str, Any]:
    """The TaskSpec the node is sent for `job_id` (polled until the scheduler has placed it)."""
    headers = {"Authorization": f"Bearer {live.tokens['agent']}"}

    def spec() -> dict[str, Any] | None:
        with httpx.Client(base_url=live.url, headers=headers) as c:
            r = c.post("/v1/agent/heartbeat", json={"wait_s": 0})
        assert r.status_code == 200, r.text
        found = [s for s in r.json()["start"] if s["job_id"] == job_id]
        return found[0] if found else None

    found: dict[str, Any] = wait_for(f"job {job_id} sent", spec, 30)
    return found


async def _plain_columns(database_url: str) -> str:
    """Every stored row of every table that holds job data, as text (raw SQL)."""
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            dump = []
            for table in ("jobs", "events", "tasks"):
                rows = (await conn.execute(text(f"SELECT * FROM {table}"))).all()  # noqa: S608
                dump += [repr(tuple(row)) for row in rows]
            sealed = (await conn.execute(text("SELECT secret_env_ciphertext FROM jobs"))).all()
    finally:
        await engine.dispose()
    assert any(value is not None for (value,) in sealed), "the secret_env was stored"
    return "\n".join(dump)


async def test_secret_env_reaches_the_task_spec_only(keyed: Live, database_url: str) -> None:
    live = keyed
    hf, db_pass, plain = _marker("hf"), _marker("db"), _marker("plain")
    body = {
        "command": ["python", "train.py"],
        "time_limit": 600,
        "env": {"PLAIN": plain},
        "secret_env": {"HF_TOKEN": hf, "DB_PASSWORD": db_pass},
    }
    secrets = [hf, db_pass]
    answers: list[bytes] = []
    with live.client("member_a") as c:
        r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
        assert r.status_code == 201, r.text
        answers.append(r.content)
        assert r.json()["secret_env"] == {"HF_TOKEN": MASK, "DB_PASSWORD": MASK}
        assert r.json()["env"] == {"PLAIN": plain}
        job_id = r.json()["id"]
        retry = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
        assert retry.status_code == 200, retry.text
        answers.append(retry.content)
        # A second submission: on PostgreSQL the now-cached user would take the hot path,
        # which hands anything with secrets to the ordinary route.
        again = c.post("/v1/jobs", json={**body, "hold": True})
        assert again.status_code == 201, again.text
        held_id = again.json()["id"]
        answers.append(again.content)
        waiting = c.post("/v1/jobs", json={**body, "gpus_per_node": 8})  # never fits the node
        assert waiting.status_code == 201, waiting.text
        for path, payload in (
            (f"/v1/jobs/{held_id}/release", None),
            (f"/v1/jobs/{waiting.json()['id']}/hold", None),
            (f"/v1/jobs/{waiting.json()['id']}/cancel", {"reason": "done"}),
        ):
            r = c.post(path, json=payload)
            assert r.status_code == 200, (path, r.text)
            answers.append(r.content)
            assert r.json()["secret_env"] == {"HF_TOKEN": MASK, "DB_PASSWORD": MASK}

    spec = _spec_of(live, job_id)
    restarts = {"FAIRGPU_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": "0"}
    assert spec["env"] == {"PLAIN": plain, "HF_TOKEN": hf, "DB_PASSWORD": db_pass, **restarts}

    for who in ("member_a", "admin_a", "platform"):
        with live.client(who) as c:
            for path in (
                "/v1/jobs",
                "/v1/jobs?state=CANCELLED&state=RUNNING&state=PENDING",
                f"/v1/jobs/{job_id}",
                f"/v1/jobs/{job_id}/events",
                f"/v1/jobs/{job_id}/explain",
                f"/v1/jobs/{held_id}",
                f"/v1/jobs/{held_id}/events",
            ):
                r = c.get(path)
                assert r.status_code == 200, (who, path, r.text)
                answers.append(r.content)
            got = c.get(f"/v1/jobs/{job_id}").json()
            assert got["secret_env"] == {"HF_TOKEN": MASK, "DB_PASSWORD": MASK}
    for answer in answers:
        for secret in secrets:
            assert secret.encode() not in answer

    dump = await _plain_columns(database_url)
    for secret in secrets:
        assert secret not in dump
    assert plain in dump  # the dump does read the rows
    log = live.server_log
    assert "POST /v1/jobs" in log, "the access log is on"
    for secret in secrets:
        assert secret not in log


def test_refused_secrets_are_not_echoed(keyed: Live) -> None:
    """Bad submissions answer 422 naming the field and the rule, never the value, and the
    server logs none of it."""
    live = keyed
    sent: list[str] = []

    def refused(**fields: Any) -> None:
        body = {"command": ["true"], "time_limit": 60, **fields}
        with live.client("member_a") as c:
            r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        for secret in sent:
            assert secret not in r.text, r.text

    nul = _marker("nul")
    sent.append(nul)
    refused(secret_env={"TOKEN": nul + "\x00"})
    both = _marker("both")
    sent.append(both)
    refused(env={"TOKEN": "x"}, secret_env={"TOKEN": both})
    reserved = _marker("reserved")
    sent.append(reserved)
    refused(secret_env={"FAIRGPU_JOB_SECRET": reserved})
    big = _marker("big")
    sent.append(big)
    refused(secret_env={"TOKEN": big + "x" * MAX_ENV_BYTES})
    # together over one environment's limit, though each alone fits
    half = _marker("half")
    sent.append(half)
    filler = "y" * (MAX_ENV_BYTES // 2)
    refused(env={"A": filler}, secret_env={"TOKEN": half + filler})
    wrong_type = _marker("type")
    sent.append(wrong_type)
    refused(secret_env=[wrong_type])
    refused(secret_env={"TOKEN": 12345}, env={"X": wrong_type + "\x00"})
    # a value put where a name goes is clipped, not echoed whole
    long_name = "N" + _marker("name").replace("-", "_") * 8
    refused(secret_env={long_name: "v"})
    with live.client("member_a") as c:
        r = c.post("/v1/jobs", json={"command": ["true"], "secret_env": {long_name: "v"}})
    assert long_name not in r.text
    log = live.server_log
    for secret in [*sent, long_name]:
        assert secret not in log


async def test_a_server_without_a_key_refuses_secrets(database_url: str) -> None:
    secret = _marker("nokey")
    async with running_cluster(fast_settings(database_url, secret_keys=None)) as cluster:
        org = await cluster.org(guaranteed=1)
        token = await cluster.user_token(org)
        for _ in range(2):  # the second one from a cached user: the hot path on PostgreSQL
            r = await cluster.http.post(
                "/v1/jobs",
                json={"command": ["true"], "time_limit": 60, "secret_env": {"TOKEN": secret}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 422, r.text
            problem = r.json()
            assert problem["title"] == "Secrets not configured"
            assert "FAIRGPU_SECRET_KEYS" in problem["detail"]
            assert "fairgpu admin gen-secret-key" in problem["detail"]
            assert secret not in r.text
        # jobs without secrets are still taken
        await cluster.submit(token, env={"A": "b"})
        async with cluster.sessionmaker() as session:
            stored = (await session.execute(text("SELECT secret_env_ciphertext FROM jobs"))).all()
        assert stored == [(None,)]


async def test_a_rotated_key_set_still_decrypts(database_url: str) -> None:
    """Add a new key first: old values still open. Re-seal (`admin rotate-secrets`), drop the
    old key: they still open. Drop the only key that opens a job's values: that task fails
    alone, with the reason, and the node carries on."""
    old, new, other = generate_key(), generate_key(), generate_key()
    settings = fast_settings(database_url, secret_keys=SecretStr(old))
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=4)
        token = await cluster.user_token(org)
        node = await cluster.register(await cluster.join_token(), gpus=4)
        cred = node["credential"]
        await cluster.heartbeat(cred)
        first = await cluster.submit(token, secret_env={"TOKEN": "one"})
        lost = await cluster.submit(token, secret_env={"TOKEN": "lost"})

        settings.secret_keys = SecretStr(f"{new},{old}")
        second = await cluster.submit(token, secret_env={"TOKEN": "two"})
        async with cluster.sessionmaker() as session:
            done, _ = await rotate_secret_env(
                session, secret_cipher=cipher(f"{new},{old}"), after_id=lost["id"]
            )
            await session.commit()
        assert done.rotated == 1  # `second`, sealed with `new`, is re-sealed alike
        async with cluster.sessionmaker() as session:
            done, _ = await rotate_secret_env(session, secret_cipher=cipher(f"{new},{old}"))
            await session.commit()
            # `lost` is sealed again with `other` only: as if its key had been dropped
            await session.execute(
                update(Job)
                .where(Job.id == lost["id"])
                .values(secret_env_ciphertext=seal(cipher(other), {"TOKEN": "lost"}))
            )
            await session.commit()
        assert done.rotated == 3
        settings.secret_keys = SecretStr(new)

        await cluster.cycle()
        reply = await cluster.heartbeat(cred)
        env = {s["job_id"]: s["env"].get("TOKEN") for s in reply["start"]}
        assert env == {first["id"]: "one", second["id"]: "two"}
        failed = await cluster.job(token, lost["id"])
        assert failed["state"] == "FAILED"
        assert "cannot be decrypted" in failed["state_reason"], failed["state_reason"]
        assert "lost" not in failed["state_reason"]
        async with cluster.sessionmaker() as session:
            leftover, _ = await rotate_secret_env(session, secret_cipher=cipher(new))
        assert leftover.unreadable == [lost["id"]]


def test_database_errors_are_logged_without_the_failing_row() -> None:
    """PostgreSQL's DETAIL repeats a failing row's values; the log gets the first line only."""
    error = asyncpg.CheckViolationError('new row for relation "jobs" violates check constraint')
    error.detail = "Failing row contains (7, s3cr3t-value)"
    wrapped = IntegrityError("INSERT INTO jobs ...", {"env": "s3cr3t-value"}, error)
    for exc in (error, wrapped):
        line = error_line(exc)
        assert "violates check constraint" in line
        assert "s3cr3t" not in line
