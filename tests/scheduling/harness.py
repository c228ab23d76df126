"""A real app on a real database, driven over HTTP: admin, orgs, users, agents, heartbeats."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app import create_app
from protocol.agent import AGENT_CAPABILITIES
from scheduler.policysettings import PolicySettings
from scheduler.services.auth import bootstrap_admin
from scheduler.services.runtime import SchedulerRuntime
from scheduler.settings import Settings

_names = itertools.count(1)


def fast_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings that make a test cluster react in milliseconds rather than seconds."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "migrate_on_start": False,
        "database_pool_size": 5,
        "cycle_interval_s": 0.2,
        "cycle_min_gap_s": 0.0,
        # Also the database's idle-in-transaction timeout (scheduler/db/engine.py): at 2 s, a
        # machine crowded by parallel tests ended transactions that were merely waiting for CPU.
        "lease_timeout_s": 10.0,
        "heartbeat_interval_s": 1.0,
        "heartbeat_long_poll_s": 5.0,
        "long_poll_recheck_s": 0.2,
        "node_timeout_s": 60.0,
        "requeue_backoff_s": 0.0,
        "policy": PolicySettings(preemption_grace_s=1.0, min_runtime_s=0.0),
    }
    values.update(overrides)
    return Settings(**values)


class Cluster:
    """One running app and an HTTP client to it, with the steps every scenario needs."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient, admin_token: str) -> None:
        self.app = app
        self.http = client
        self.admin = admin_token

    @property
    def runtime(self) -> SchedulerRuntime:
        runtime: SchedulerRuntime = self.app.state.runtime
        return runtime

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        maker: async_sessionmaker[AsyncSession] = self.app.state.sessionmaker
        return maker

    async def call(
        self, method: str, path: str, token: str, body: Any = None, expect: int | None = None
    ) -> Any:
        response = await self.http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {token}"}
        )
        if expect is not None:
            assert response.status_code == expect, (response.status_code, response.text)
        elif response.status_code >= 400:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    async def org(
        self, guaranteed: int = 0, limit: int | None = None, gpu_type: str = "H100", **kw: Any
    ) -> str:
        name = f"org{next(_names)}"
        await self.call("POST", "/v1/orgs", self.admin, {"name": name, **kw})
        await self.call(
            "PUT",
            f"/v1/orgs/{name}/quota/{gpu_type}",
            self.admin,
            {"guaranteed": guaranteed, "limit": limit},
        )
        return name

    async def user_token(self, org: str) -> str:
        name = f"user{next(_names)}"
        user = await self.call("POST", "/v1/users", self.admin, {"name": name, "org": org})
        token = await self.call(
            "POST", "/v1/tokens", self.admin, {"name": "t", "user_id": user["id"]}
        )
        return str(token["token"])

    async def join_token(self) -> str:
        created = await self.call(
            "POST", "/v1/join-tokens", self.admin, {"name": "join", "uses": 100}
        )
        return str(created["token"])

    async def register(
        self,
        join: str,
        gpus: int = 8,
        model: str = "H100",
        name: str | None = None,
        capabilities: Sequence[str] | None = AGENT_CAPABILITIES,
        memory_per_gpu_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Register a node as a current agent does (every capability), or as an older one
        (`capabilities=None`); with `memory_per_gpu_bytes`, as a strict agent reporting its
        GPUs' memory share."""
        name = name or f"node{next(_names)}"
        body = {
            "name": name,
            "site": "dc1",
            "domain": "rack1",
            "hostname": name,
            "address": f"10.0.0.{next(_names) % 250 + 1}",
            "agent_version": "test",
            "gpus": [
                {"index": i, "uuid": f"GPU-{name}-{i}", "model": model, "memory_bytes": 80 << 30}
                for i in range(gpus)
            ],
        }
        if capabilities is not None:  # an older agent sends no such field
            body["capabilities"] = list(capabilities)
        if memory_per_gpu_bytes is not None:
            body["isolation"] = "strict"
            body["memory_per_gpu_bytes"] = memory_per_gpu_bytes
        result: dict[str, Any] = await self.call("POST", "/v1/agent/register", join, body)
        result["gpu_uuids"] = [g["uuid"] for g in body["gpus"]]  # type: ignore[index]
        return result

    async def heartbeat(self, credential: str, **body: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("POST", "/v1/agent/heartbeat", credential, body)
        return result

    async def submit(self, token: str, **spec: Any) -> dict[str, Any]:
        body = {"command": ["python", "train.py"], "time_limit": 3600, **spec}
        job: dict[str, Any] = await self.call("POST", "/v1/jobs", token, body)
        return job

    async def job(self, token: str, job_id: int) -> dict[str, Any]:
        job: dict[str, Any] = await self.call("GET", f"/v1/jobs/{job_id}", token)
        return job

    async def cycle(self) -> None:
        """Ask for a cycle and wait until one has run after the request."""
        self.runtime.notify("test")
        await self.runtime.wait_cycles(1)


def report(task_id: int, job_id: int, state: str, **kw: Any) -> dict[str, Any]:
    return {"task_id": task_id, "job_id": job_id, "state": state, **kw}


def sample(index: int, uuid: str, at: datetime, **kw: Any) -> dict[str, Any]:
    return {"index": index, "uuid": uuid, "sampled_at": at.isoformat(), **kw}


def now() -> datetime:
    return datetime.now(UTC)


@asynccontextmanager
async def running_cluster(settings: Settings) -> AsyncIterator[Cluster]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with app.state.sessionmaker() as session:
            issued = await bootstrap_admin(session, name="root", ttl_s=3600, force=True)
            await session.commit()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fairgpu") as client:
            cluster = Cluster(app, client, issued.secret)
            if settings.run_scheduler:
                # Ask for the cycle: one already running when we start waiting does not count,
                # and the next timer cycle may be far off (a test with a long cycle_interval_s).
                cluster.runtime.notify("test")
                await cluster.runtime.wait_cycles(1)
            yield cluster
