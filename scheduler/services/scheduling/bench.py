"""Measure one scheduling cycle against a real database at national scale.

    python -m scheduler.services.scheduling.bench --database-url postgresql://…/db \
        --nodes 1000 --pending 20000 --cycles 3

Seeds a fresh (migrated, empty) database with sites, nodes, GPUs, orgs with quotas, running jobs
and pending jobs, then runs full cycles (maintenance, load, decide, apply) and prints JSON with the
time of each phase. Even cycles rewrite every pending job's explanation (as every
`explain_interval_s`); odd ones only new jobs' (the steady state in between).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert

from scheduler.core import Scheduler
from scheduler.db import Gpu, Job, Node, Org, Quota, Site, User
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.db.migrate import run_migrations
from scheduler.services.scheduling import Lease, run_cycle
from scheduler.settings import Settings


async def seed(database_url: str, *, nodes: int, pending: int, orgs: int, seed: int) -> None:
    rng = random.Random(seed)
    engine = make_engine(database_url)
    await run_migrations(engine)
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(insert(Site), [{"id": i + 1, "name": f"dc{i}"} for i in range(4)])
        await conn.execute(
            insert(Node),
            [
                {
                    "id": i + 1,
                    "name": f"node{i}",
                    "site_id": i % 4 + 1,
                    "domain": f"rack{i // 32}",
                    "last_heartbeat_at": now,
                }
                for i in range(nodes)
            ],
        )
        await conn.execute(
            insert(Gpu),
            [
                {"node_id": n + 1, "index": g, "uuid": f"GPU-{n}-{g}", "model": "H100"}
                for n in range(nodes)
                for g in range(8)
            ],
        )
        per_org = nodes * 8 // orgs
        await conn.execute(
            insert(Org), [{"id": i + 1, "name": f"org{i}", "shares": 1.0} for i in range(orgs)]
        )
        await conn.execute(
            insert(Quota),
            [
                {"org_id": i + 1, "gpu_type": "H100", "guaranteed": per_org, "limit": 2 * per_org}
                for i in range(orgs)
            ],
        )
        await conn.execute(
            insert(User), [{"id": i + 1, "name": f"u{i}", "org_id": i + 1} for i in range(orgs)]
        )
        rows: list[dict[str, Any]] = []
        for i in range(pending):
            org = rng.randrange(orgs) + 1
            rows.append(
                {
                    "org_id": org,
                    "user_id": org,
                    "name": f"j{i}",
                    "command": ["python", "train.py"],
                    "env": {},
                    "gpus_per_node": rng.choice((1, 2, 4, 8, 8)),
                    "num_nodes": rng.choice((1, 1, 1, 2, 4)),
                    "time_limit_s": rng.choice((3600, 4 * 3600, 86_400)),
                    "preemptible": rng.random() < 0.3,
                    "submitted_at": now - timedelta(seconds=rng.uniform(0, 86_400)),
                }
            )
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(Job), rows[start : start + 5000])
    await engine.dispose()


class LoopLag:
    """The longest the event loop was kept from waking a 5 ms sleeper (loop-blocking stretches).

    Requests served by the leader wait as long as the loop is blocked; this is what they see.
    """

    def __init__(self, tick_s: float = 0.005) -> None:
        self.tick_s = tick_s
        self.max_s = 0.0
        self.over_20ms = 0
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            late_s = time.perf_counter() - before - self.tick_s
            self.max_s = max(self.max_s, late_s)
            self.over_20ms += late_s > 0.020

    def __enter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._probe())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def measure(database_url: str, cycles: int) -> list[dict[str, float | int | bool]]:
    engine = make_engine(database_url)
    maker = make_sessionmaker(engine)
    settings = Settings(database_url=database_url)
    lease = Lease(engine, ttl_s=settings.lease_timeout_s)
    async with maker() as session:
        assert await lease.try_acquire(session)
    assert lease.epoch is not None
    out: list[dict[str, float | int | bool]] = []
    previous: frozenset[int] | None = None
    scheduler = Scheduler()  # kept across cycles, as the server's loop keeps its own
    for i in range(cycles):
        began, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        with LoopLag() as lag:
            result = await run_cycle(
                maker,
                epoch=lease.epoch,
                settings=settings,
                previously_open=previous,
                explain_all=i % 2 == 0,  # odd cycles: the steady state between full explanations
                scheduler=scheduler,
            )
            total_s, cpu_s = time.perf_counter() - began, time.process_time() - cpu
            loop_cpu_s = time.thread_time() - loop_cpu
            await asyncio.sleep(2 * lag.tick_s)  # the probe's last wake-up
        previous = result.open_allocation_ids
        out.append(
            {
                "total_s": round(total_s, 3),
                "cpu_s": round(cpu_s, 3),  # all threads (decide included)
                "loop_cpu_s": round(loop_cpu_s, 3),  # the event loop's thread
                "max_loop_stall_s": round(lag.max_s, 3),
                "loop_stalls_over_20ms": lag.over_20ms,
                "load_s": round(result.load_s, 3),
                "decide_s": round(result.decide_s, 3),
                "apply_s": round(result.apply_s, 3),
                "started": len(result.applied.started),
                "pending_written": result.applied.pending_written,
                "explained_all": result.explained_all,
            }
        )
    await lease.release()
    await engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="an empty database")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pending", type=int, default=20_000)
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() the heap before the cycles, as a server may after start-up: full"
        " collections then scan only what was allocated since",
    )
    args = parser.parse_args()
    asyncio.run(
        seed(
            args.database_url,
            nodes=args.nodes,
            pending=args.pending,
            orgs=args.orgs,
            seed=args.seed,
        )
    )
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    cycles = asyncio.run(measure(args.database_url, args.cycles))
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "pending": args.pending,
                "gc_freeze": args.gc_freeze,
                "cycles": cycles,
            }
        )
    )


if __name__ == "__main__":
    main()
