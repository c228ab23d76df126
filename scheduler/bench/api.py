"""`fairgpu bench api`: a real server on PostgreSQL, loaded from a separate client process.

The server runs as `fairgpu server` (uvicorn, `--workers` processes) on a fresh database this
benchmark creates and drops; the load generator (scheduler.bench.loadgen) is another process,
so client and server compete for the same cores exactly as they would on one machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from scheduler.db import Org, Quota, User
from scheduler.db.engine import asyncpg_dsn, make_engine, make_sessionmaker
from scheduler.db.migrate import migrate_url
from scheduler.process import POOL_SIZE as SCHEDULER_POOL_SIZE
from scheduler.services.tokens import issue_token
from scheduler.states import Role, TokenKind

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT_S = 60.0
MAX_SERVER_CONNECTIONS = 90  # of PostgreSQL's default 100, a few kept for everyone else
# The scheduler process: its pool and overflow, the lease, wake-ups.
SCHEDULER_CONNECTIONS = 2 * SCHEDULER_POOL_SIZE + 2


# The load generator is one user and a thousand nodes sending as fast as the server answers:
# far beyond what the per-token rate limits and pending caps let one tenant do. The limits stay
# on (their cost is measured: a bucket per request, the caps' guard in every insert) with
# bounds this load never reaches (it leaves about ten thousand jobs pending). The guard reads
# trigger-kept counts, so the size of a cap costs nothing.
BENCH_LIMITS = {
    "FAIRGPU_SUBMIT_RATE_PER_S": "1000000",
    "FAIRGPU_SUBMIT_BURST": "1000000",
    "FAIRGPU_HEARTBEAT_RATE_PER_S": "1000000",
    "FAIRGPU_HEARTBEAT_BURST": "1000000",
    "FAIRGPU_READ_RATE_PER_S": "1000000",
    "FAIRGPU_READ_BURST": "1000000",
    "FAIRGPU_ORG_READ_RATE_PER_S": "1000000",
    "FAIRGPU_ORG_READ_BURST": "1000000",
    "FAIRGPU_ORG_SUBMIT_RATE_PER_S": "1000000",
    "FAIRGPU_ORG_SUBMIT_BURST": "1000000",
    "FAIRGPU_MAX_PENDING_JOBS_PER_USER": "100000",
    "FAIRGPU_MAX_PENDING_JOBS_PER_ORG": "100000",
}


def pool_size(concurrency: int, workers: int) -> int:
    """Per HTTP worker: the client's share of connections, within MAX_SERVER_CONNECTIONS.

    A worker opens up to three pools' worth (ORM pool, its overflow, the direct routes' lean
    pool) and one for wake-ups; with several workers the scheduler process takes its own few.
    """
    wanted = max(8, -(-concurrency // workers) * 3 // 4)
    scheduler = SCHEDULER_CONNECTIONS if workers > 1 else 1
    return max(2, min(wanted, (MAX_SERVER_CONNECTIONS - scheduler - workers) // (3 * workers)))


async def _create_database(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(asyncpg_dsn(server_url), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def _drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _seed(database_url: str, run_id: str, gpus: int) -> tuple[str, str]:
    """An org guaranteed every GPU (so its jobs start and nodes report real tasks), a member
    with a token, and a join token for the nodes."""
    await migrate_url(database_url)
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            org = Org(name=f"bench-{run_id}")
            session.add(org)
            await session.flush()
            session.add(Quota(org_id=org.id, gpu_type="H100", guaranteed=gpus, limit=gpus))
            user = User(name=f"bench-{run_id}", org_id=org.id, role=Role.MEMBER)
            session.add(user)
            await session.flush()
            token = await issue_token(session, kind=TokenKind.USER, user_id=user.id, ttl_s=86_400)
            join = await issue_token(session, kind=TokenKind.JOIN, ttl_s=86_400)
            await session.commit()
            return token.secret, join.secret
    finally:
        await engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def run_api_bench(
    *,
    database_url: str | None = None,
    postgres_url: str = DEFAULT_POSTGRES_URL,
    workers: int = 2,
    concurrency: int = 32,
    submit_s: float = 10.0,
    heartbeat_s: float = 10.0,
    nodes: int = 1000,
    job_gpu_type: str = "H100",
    server_log: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready result."""
    run_id = uuid.uuid4().hex[:8]
    db_name = f"fairgpu_bench_{os.getpid()}_{run_id}"
    created = database_url is None
    url = asyncio.run(_create_database(postgres_url, db_name)) if created else database_url
    assert url is not None
    if not make_url(url).drivername.startswith("postgres"):
        raise ValueError("fairgpu bench api runs on PostgreSQL")
    proc: subprocess.Popen[bytes] | None = None
    try:
        user_token, join_token = asyncio.run(_seed(url, run_id, nodes * 8))
        port = _free_port()
        fairgpu = str(Path(sys.executable).parent / "fairgpu")
        log = server_log.open("wb") if server_log else subprocess.DEVNULL
        proc = subprocess.Popen(
            [
                fairgpu, "server", "--port", str(port), "--database-url", url,
                "--workers", str(workers), "--no-access-log", "--log-level", "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "FAIRGPU_MIGRATE_ON_START": "false",
                # Enough pooled connections for the client's concurrency (connections opened
                # and closed past the pool would be measured instead of the server), and few
                # enough for PostgreSQL's default max_connections of 100: each process opens
                # up to three times this (ORM pool and overflow, the lean pool).
                "FAIRGPU_DATABASE_POOL_SIZE": str(pool_size(concurrency, workers)),
                **BENCH_LIMITS,
            },
        )  # fmt: skip
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        params = {
            "host": "127.0.0.1",
            "port": port,
            "user_token": user_token,
            "join_token": join_token,
            "concurrency": concurrency,
            "submit_s": submit_s,
            "heartbeat_s": heartbeat_s,
            "nodes": nodes,
            "run_id": run_id,
            "job_gpu_type": job_gpu_type,
            "server_pid": proc.pid,
        }
        client = subprocess.run(
            [sys.executable, "-m", "scheduler.bench.loadgen"],
            input=json.dumps(params),
            capture_output=True,
            text=True,
            timeout=submit_s + heartbeat_s + 600,
            check=False,
        )
        if client.returncode != 0:
            raise RuntimeError(f"load generator failed: {client.stderr.strip()[-2000:]}")
        measured = json.loads(client.stdout)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if created:
            asyncio.run(_drop_database(postgres_url, db_name))
    return {
        "bench": "api",
        "database": "postgresql",
        "server_workers": workers,
        "client_connections": concurrency,
        "cpu_count": os.cpu_count(),
        **measured,
    }
