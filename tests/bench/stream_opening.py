"""What the cross-process stream bounds cost one opening: the opening's transaction as it was
(the job's row locked, the job's streams of the kind counted) against `streamrows.open_row`
(the user's and org's advisory locks too, and the per-user, per-org and pending counts),
interleaved A/B, `OPENINGS` a turn, six turns.

    .venv/bin/python -m tests.bench.stream_opening postgresql://postgres@127.0.0.1/DB

DB: an empty database at the migrations' head (`fairgpu db upgrade`); it is written to.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Job, Stream
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.db.types import utcnow
from scheduler.services import streamrows
from scheduler.services.interactive import AttachTarget
from scheduler.services.streamrows import STALE_AFTER_S, StreamCaps, StreamOwner
from tests import factories as f

OPENINGS = 200
UNBOUNDED = StreamCaps(10**6, 10**6, 10**6, 10**6)
Opening = Callable[[AsyncSession, AttachTarget, str, datetime], Awaitable[None]]


async def per_job_only(
    session: AsyncSession, target: AttachTarget, sid: str, now: datetime
) -> None:
    await session.execute(select(Job.id).where(Job.id == target.job_id).with_for_update())
    session.add(
        Stream(
            id=sid, job_id=target.job_id, task_id=target.task_id, node_id=target.node_id,
            rank=0, kind="port", port=1, holder_id="h", holder_url="u", created_at=now,
            expires_at=now + timedelta(seconds=15), alive_at=now,
        )
    )  # fmt: skip
    await session.flush()
    await session.scalar(
        select(func.count())
        .select_from(Stream)
        .where(
            Stream.job_id == target.job_id,
            Stream.kind == "port",
            Stream.alive_at >= now - timedelta(seconds=STALE_AFTER_S),
        )
    )


async def every_bound(session: AsyncSession, target: AttachTarget, sid: str, now: datetime) -> None:
    await streamrows.open_row(
        session, stream_id=sid, target=target, kind="port", port=1, owner=StreamOwner(1, 1),
        caps=UNBOUNDED, holder_id="h", holder_url="u", now=now, ttl_s=15,
    )  # fmt: skip


async def main(url: str) -> None:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        org = await f.org(session)
        user = await f.user(session, org)
        node, gpus = await f.node(session, gpus=1)
        job = await f.job(session, org, user, interactive=True)
        task = await f.running_task(session, job, node, gpus)
        target = AttachTarget(job_id=job.id, org_id=org.id, task_id=task.id, node_id=node.id,
                              rank=0)  # fmt: skip
        await session.commit()
    streamrows.MAX_OPEN["port"] = 10**6
    variants: dict[str, Opening] = {"per job only": per_job_only, "every bound": every_bound}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for turn in range(6):
        order = list(variants.items()) if turn % 2 == 0 else list(variants.items())[::-1]
        for name, opening in order:
            ids = []
            start = time.perf_counter()
            for _ in range(OPENINGS):
                async with sessions() as session:
                    ids.append(secrets.token_urlsafe(24))
                    await opening(session, target, ids[-1], utcnow())
                    await session.commit()
            results[name].append((time.perf_counter() - start) / OPENINGS * 1e3)
            async with sessions() as session:
                await streamrows.end_rows(session, ids)
                await session.commit()
    for name, per_turn in results.items():
        print(f"{name}: ms per opening, by turn:", " ".join(f"{ms:.2f}" for ms in per_turn))
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
