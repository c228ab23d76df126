"""`fairgpu bench soak`: a real server on a private PostgreSQL under load, a fault a minute.

Simulated nodes are lightweight in-process heartbeat clients (hundreds of agent processes would
measure the machine, not fairgpu): each runs the tasks it is given for as long as the job's
`sleep N` command says and reports them like an agent. Users submit (with an Idempotency-Key,
retried until answered) and cancel at a steady rate. Faults rotate: the server is SIGKILLed and
restarted, PostgreSQL is restarted, a tenth of the nodes go silent past the node timeout. At the
end the invariant checker reads the database and every acknowledged submission is looked up.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from scheduler.bench.procs import FAST_SERVER_ENV, Fleet, PgInstance
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.services.invariants import check_invariants

SERVER_ENV = {
    "FAIRGPU_CYCLE_INTERVAL_S": "2",
    "FAIRGPU_CYCLE_MIN_GAP_S": "0.5",
    "FAIRGPU_HEARTBEAT_INTERVAL_S": "10",
    "FAIRGPU_HEARTBEAT_LONG_POLL_S": "0",
    "FAIRGPU_NODE_TIMEOUT_S": "30",
    "FAIRGPU_POLICY_PREEMPTION_GRACE_S": "2",
    "FAIRGPU_POLICY_MIN_RUNTIME_S": "5",
    "FAIRGPU_LEASE_TIMEOUT_S": "5",
    "FAIRGPU_EXPLAIN_INTERVAL_S": "10",
}
ORGS = {"alpha": (3, 400), "beta": (2, 300), "gamma": (1, 200)}  # shares, guaranteed H100
SIZES = [(1, 1)] * 6 + [(2, 1)] * 3 + [(4, 1)] * 2 + [(8, 1), (8, 2)]
FAULTS = ("server-kill", "postgres-restart", "network-cut")


@dataclass
class Stats:
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    unavailable: Counter[str] = field(default_factory=Counter)  # 503 / refused while a fault ran

    def record(self, op: str, seconds: float, status: int) -> None:
        self.latencies_s.setdefault(op, []).append(seconds)
        self.statuses[f"{op} {status}"] += 1

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], p: float) -> float:
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)

        return {
            op: {
                "requests": len(v),
                "p50_ms": pct(v, 0.5),
                "p99_ms": pct(v, 0.99),
                "max_ms": round(max(v) * 1000, 1),
            }
            for op, v in sorted(self.latencies_s.items())
            if v
        }


@dataclass
class Node:
    name: str
    credential: str = ""
    running: dict[int, tuple[int, float]] = field(default_factory=dict)  # task -> (job, end)
    ended: list[dict[str, Any]] = field(default_factory=list)
    silent_until: float = 0.0


class Soak:
    def __init__(self, url: str, fleet: Fleet, *, nodes: int, rate_per_s: float, seed: int):
        self.url, self.fleet = url, fleet
        self.rng = random.Random(seed)
        self.nodes = [Node(f"soak-{i:04d}") for i in range(nodes)]
        self.rate_per_s = rate_per_s
        self.stats = Stats()
        self.stop = asyncio.Event()
        self.keys: dict[str, int] = {}  # idempotency key -> job id
        self.user_tokens: list[str] = []
        self.faults: list[dict[str, Any]] = []
        self.submitting: set[asyncio.Task[None]] = set()
        self.http = httpx.AsyncClient(
            base_url=url, timeout=30, limits=httpx.Limits(max_connections=64)
        )

    async def call(
        self, op: str, method: str, path: str, token: str, **kw: Any
    ) -> httpx.Response | None:
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        t0 = time.perf_counter()
        try:
            r = await self.http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as exc:
            self.stats.unavailable[f"{op} {type(exc).__name__}"] += 1
            return None
        self.stats.record(op, time.perf_counter() - t0, r.status_code)
        if r.status_code == 503:
            self.stats.unavailable[f"{op} 503"] += 1
            return None
        if r.status_code >= 500:
            self.stats.errors[f"{op} {r.status_code}: {r.text[:120]}"] += 1
        return r

    async def setup(self, admin: str) -> None:
        for org, (shares, guaranteed) in ORGS.items():
            await self.call(
                "setup", "POST", "/v1/orgs", admin, json={"name": org, "shares": shares}
            )
            quota = {"guaranteed": guaranteed, "limit": guaranteed * 2}
            await self.call("setup", "PUT", f"/v1/orgs/{org}/quota/H100", admin, json=quota)
            r = await self.call("setup", "POST", "/v1/users", admin, json={"name": org, "org": org})
            assert r is not None
            body = {"name": "soak", "user_id": r.json()["id"]}
            t = await self.call("setup", "POST", "/v1/tokens", admin, json=body)
            assert t is not None
            self.user_tokens.append(t.json()["token"])
        r = await self.call(
            "setup", "POST", "/v1/join-tokens", admin, json={"uses": len(self.nodes) + 1}
        )
        assert r is not None
        join = r.json()["token"]
        sem = asyncio.Semaphore(16)

        async def register(node: Node) -> None:
            gpus = [
                {"index": i, "uuid": f"GPU-{node.name}-{i}", "model": "H100",
                 "memory_bytes": 80 << 30}
                for i in range(8)
            ]  # fmt: skip
            body = {
                "name": node.name, "site": f"site-{hash(node.name) % 3}", "domain": "rack",
                "hostname": node.name, "address": "127.0.0.1", "agent_version": "soak",
                "gpus": gpus,
            }  # fmt: skip
            async with sem:
                reply = await self.call("register", "POST", "/v1/agent/register", join, json=body)
            if reply is None or reply.status_code != 200:
                raise RuntimeError(f"register {node.name}: {reply and reply.text}")
            node.credential = reply.json()["credential"]

        await asyncio.gather(*(register(n) for n in self.nodes))

    async def node_loop(self, node: Node, interval_s: float) -> None:
        await asyncio.sleep(self.rng.uniform(0, interval_s))
        while not self.stop.is_set():
            now = time.monotonic()
            if now < node.silent_until:
                await asyncio.sleep(1)
                continue
            for task_id, (job_id, end) in list(node.running.items()):
                if end <= now:
                    del node.running[task_id]
                    node.ended.append(
                        {"task_id": task_id, "job_id": job_id, "state": "exited", "exit_code": 0}
                    )
            reports = [
                {"task_id": t, "job_id": j, "state": "running"}
                for t, (j, _) in node.running.items()
            ] + node.ended
            sent_ended = len(node.ended)
            r = await self.call(
                "heartbeat", "POST", "/v1/agent/heartbeat", node.credential,
                json={"tasks": reports[:256], "wait_s": 0},
            )  # fmt: skip
            if r is not None and r.status_code == 200:
                del node.ended[:sent_ended]
                reply = r.json()
                for spec in reply["start"]:
                    seconds = float(spec["command"][-1]) if spec["command"][0] == "sleep" else 30
                    node.running[spec["task_id"]] = (spec["job_id"], time.monotonic() + seconds)
                for stop in reply["stop"]:
                    job = node.running.pop(stop["task_id"], (0, 0.0))[0]
                    node.ended.append(
                        {"task_id": stop["task_id"], "job_id": job, "state": "stopped",
                         "signal": 15}
                    )  # fmt: skip
            await asyncio.sleep(interval_s * self.rng.uniform(0.8, 1.2))

    async def submit_loop(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            token = self.rng.choice(self.user_tokens)
            gpus, nodes = self.rng.choice(SIZES)
            body = {
                "command": ["sleep", str(self.rng.randint(5, 90))],
                "gpus_per_node": gpus, "nodes": nodes, "time_limit": 600,
                "preemptible": self.rng.random() < 0.5, "gpu_type": "H100",
            }  # fmt: skip
            task = asyncio.create_task(self.submit_until_answered(f"soak-{n}", token, body))
            self.submitting.add(task)
            task.add_done_callback(self.submitting.discard)
            await asyncio.sleep(self.rng.expovariate(self.rate_per_s))

    async def submit_until_answered(self, key: str, token: str, body: dict[str, Any]) -> None:
        for _ in range(600):
            r = await self.call(
                "submit", "POST", "/v1/jobs", token, json=body, headers={"Idempotency-Key": key}
            )
            if r is not None and r.status_code in (200, 201):
                job_id = r.json()["id"]
                if self.keys.setdefault(key, job_id) != job_id:
                    self.stats.errors["one key, two jobs"] += 1
                return
            if r is not None and r.status_code < 500:
                self.stats.errors[f"submit {r.status_code}: {r.text[:120]}"] += 1
                return
            await asyncio.sleep(1)
        self.stats.errors["submit never answered"] += 1

    async def cancel_loop(self, rate_per_s: float) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.expovariate(rate_per_s))
            if not self.keys:
                continue
            job_id = self.rng.choice(list(self.keys.values()))
            for token in self.user_tokens:  # the owner answers 200, the others 404
                r = await self.call("cancel", "POST", f"/v1/jobs/{job_id}/cancel", token)
                if r is not None and r.status_code not in (200, 404, 409):
                    self.stats.errors[f"cancel {r.status_code}: {r.text[:120]}"] += 1

    async def inject(self, kind: str, pg: PgInstance, node_timeout_s: float) -> None:
        t0 = time.monotonic()
        if kind == "server-kill":
            self.fleet.procs["server"].kill()
            await asyncio.to_thread(self.fleet.server, port=int(self.url.rsplit(":", 1)[1]))
        elif kind == "postgres-restart":
            await asyncio.to_thread(pg.stop, "fast")
            await asyncio.sleep(3)
            await asyncio.to_thread(pg.start)
        else:
            cut = self.rng.sample(self.nodes, max(1, len(self.nodes) // 10))
            for node in cut:
                node.silent_until = time.monotonic() + node_timeout_s + 10
        self.faults.append({"fault": kind, "at_s": None, "took_s": round(time.monotonic() - t0, 2)})


async def _invariants_and_ledger(url: str, keys: dict[str, int]) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as session:
            report = await check_invariants(session)
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
        stored = {int(r[0]) for r in await conn.fetch("SELECT id FROM jobs")}
    finally:
        await conn.close()
    lost = sorted(set(keys.values()) - stored)
    return {
        "invariants_ok": report.ok,
        "violations": report.violations[:50],
        "checked": report.checked,
        "jobs_by_state": {str(r[0]): int(r[1]) for r in rows},
        "jobs_stored": len(stored),
        "submissions_acknowledged": len(keys),
        "distinct_jobs_acknowledged": len(set(keys.values())),
        "lost": lost[:50],
    }


async def _run(
    fleet: Fleet, pg: PgInstance, url: str, admin: str, *, duration_s: float, nodes: int,
    rate_per_s: float, fault_interval_s: float, seed: int,
) -> dict[str, Any]:  # fmt: skip
    soak = Soak(url, fleet, nodes=nodes, rate_per_s=rate_per_s, seed=seed)
    await soak.setup(admin)
    interval_s = float(SERVER_ENV["FAIRGPU_HEARTBEAT_INTERVAL_S"])
    node_timeout_s = float(SERVER_ENV["FAIRGPU_NODE_TIMEOUT_S"])
    loops = [asyncio.create_task(soak.node_loop(n, interval_s)) for n in soak.nodes]
    loops += [
        asyncio.create_task(soak.submit_loop()),
        asyncio.create_task(soak.cancel_loop(rate_per_s / 5)),
    ]
    started = time.monotonic()
    fault_no = 0
    while (elapsed := time.monotonic() - started) < duration_s:
        next_fault = (fault_no + 1) * fault_interval_s
        await asyncio.sleep(max(0.0, min(next_fault, duration_s) - elapsed))
        if time.monotonic() - started < duration_s - 5:
            kind = FAULTS[fault_no % len(FAULTS)]
            await soak.inject(kind, pg, node_timeout_s)
            soak.faults[-1]["at_s"] = round(time.monotonic() - started, 1)
        fault_no += 1
    soak.stop.set()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.wait(pending, timeout=120)  # submissions retry until answered
    await soak.http.aclose()
    checked = await _invariants_and_ledger(fleet.database_url, soak.keys)
    return {
        "bench": "soak",
        "duration_s": duration_s,
        "nodes": nodes,
        "gpus": nodes * 8,
        "submit_rate_per_s": rate_per_s,
        "faults": soak.faults,
        "latency": soak.stats.summary(),
        "statuses": dict(sorted(soak.stats.statuses.items())),
        "unavailable_during_faults": dict(sorted(soak.stats.unavailable.items())),
        "errors": dict(soak.stats.errors),
        **checked,
        "ok": checked["invariants_ok"] and not checked["lost"] and not soak.stats.errors,
    }


def run_soak(
    *, duration_s: float = 600.0, nodes: int = 500, rate_per_s: float = 3.0,
    fault_interval_s: float = 60.0, seed: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Run the soak; returns the JSON-ready result (`ok` false on any loss or violation)."""
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-soak-"))
    pg = PgInstance()
    pg.start()
    server_env = {**FAST_SERVER_ENV, **SERVER_ENV}
    fleet = Fleet(workdir=workdir, database_url=pg.create_database("soak"), server_env=server_env)
    try:
        admin = fleet.bootstrap()
        url = fleet.server(log_level="warning")
        result = asyncio.run(
            _run(
                fleet,
                pg,
                url,
                admin,
                duration_s=duration_s,
                nodes=nodes,
                rate_per_s=rate_per_s,
                fault_interval_s=fault_interval_s,
                seed=seed,
            )
        )
        result["workdir"] = str(workdir)
        return result
    finally:
        fleet.close()
        pg.destroy()
