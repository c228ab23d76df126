"""What every fault test needs: a fleet with an org and a member, job helpers, the invariants."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from scheduler.bench.cluster import add_org
from scheduler.bench.procs import Fleet, wait_for
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.services.invariants import InvariantReport, check_invariants
from tests.conftest import run_async

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def invariants(database_url: str) -> InvariantReport:
    async def check() -> InvariantReport:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return await check_invariants(session)
        finally:
            await engine.dispose()

    return run_async(check)


def assert_invariants(database_url: str) -> InvariantReport:
    report = invariants(database_url)
    assert report.ok, "invariants broken:\n" + "\n".join(report.violations)
    assert report.checked.get("jobs", 0) > 0
    return report


@dataclass
class Org:
    """A member's client and a join token on a running server."""

    url: str
    admin: httpx.Client
    member: httpx.Client
    join_token: str
    pid_dir: Path

    def __enter__(self) -> Org:
        return self

    def __exit__(self, *exc: object) -> None:
        self.admin.close()
        self.member.close()

    def submit(self, **body: Any) -> int:
        job = {"command": ["sleep", "600"], "gpus_per_node": 1, "time_limit": 600, **body}
        r = self.member.post("/v1/jobs", json=job)
        assert r.status_code == 201, r.text
        job_id: int = r.json()["id"]
        return job_id

    def tracked(self, **body: Any) -> int:
        """A job whose every process start writes its pid to pid_dir/<job id> (one line each)."""
        script = f'echo $$ >> {self.pid_dir}/"$FAIRGPU_JOB_ID"; exec sleep 600'
        return self.submit(command=["sh", "-c", script], **body)

    def job(self, job_id: int) -> dict[str, Any]:
        r = self.member.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def states(self, ids: list[int]) -> dict[int, str]:
        return {i: self.job(i)["state"] for i in ids}

    def wait_states(self, ids: list[int], wanted: set[str], timeout_s: float = 30) -> None:
        wait_for(
            f"jobs {ids} in {wanted} (now {self.states(ids)})",
            lambda: all(s in wanted for s in self.states(ids).values()),
            timeout_s,
        )

    def node_state(self, name: str) -> str | None:
        nodes = self.admin.get("/v1/nodes").json()["data"]
        return next((n["state"] for n in nodes if n["name"] == name), None)

    def pids(self, job_id: int) -> list[int]:
        path = self.pid_dir / str(job_id)
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    def live_pids(self, job_id: int) -> list[int]:
        return [p for p in self.pids(job_id) if _running(p)]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def setup_org(url: str, admin_token: str, pid_dir: Path, *, guaranteed: int = 8) -> Org:
    admin = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
    )
    quotas = {"H100": (guaranteed, guaranteed * 2)}
    token = add_org(admin, "acme", quotas=quotas, user="ada")
    join = admin.post("/v1/join-tokens", json={"name": "faults", "uses": 50}).json()["token"]
    member = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    pid_dir.mkdir(exist_ok=True)
    return Org(url=url, admin=admin, member=member, join_token=join, pid_dir=pid_dir)


@contextmanager
def fleet(workdir: Path, database_url: str) -> Iterator[Fleet]:
    f = Fleet(workdir=workdir, database_url=database_url)
    try:
        yield f
    finally:
        f.close()
        if os.environ.get("FAIRGPU_FAULTS_KEEP_LOGS"):
            print(f"logs kept in {workdir}")


def settle(seconds: float) -> None:
    """Let a few cycles and heartbeats pass (fast clocks: see FAST_SERVER_ENV)."""
    time.sleep(seconds)
