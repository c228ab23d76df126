"""A port-forward run is one event on its job, on both databases: its connections find the
session's event (one row however many connect), count in it as they end, and a session id
another user names is another event; a client that names no session gets one per connection."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Event
from scheduler.services import forwarding
from scheduler.services.interactive import AttachTarget
from tests import factories as f


async def _target(session: AsyncSession) -> AttachTarget:
    o = await f.org(session)
    u = await f.user(session, o)
    n, gpus = await f.node(session, gpus=1)
    j = await f.job(session, o, u)
    t = await f.running_task(session, j, n, gpus)
    return AttachTarget(job_id=j.id, org_id=o.id, task_id=t.id, node_id=n.id, rank=0)


async def _forward(
    session: AsyncSession, target: AttachTarget, actor: str, run: str | None
) -> int | None:
    event_id = await forwarding.record_forward(
        session, target, actor=actor, port=8888, max_events=100, forward_session=run
    )
    await session.commit()
    return event_id


async def _events(session: AsyncSession) -> list[Event]:
    return list(await session.scalars(select(Event).order_by(Event.id)))


async def test_a_forward_session_is_one_event_that_counts_its_connections(
    session: AsyncSession,
) -> None:
    target = await _target(session)
    run = "0123456789abcdef"
    ids = {await _forward(session, target, "user:ada", run) for _ in range(500)}
    assert len(ids) == 1
    [event_id] = ids
    assert event_id is not None
    for _ in range(3):
        await forwarding.count_connection(
            session, event_id=event_id, bytes_to_job=10, bytes_from_job=1000
        )
        await session.commit()
    [event] = await _events(session)
    assert event.kind == "job.forward"
    assert event.reason == "started forwarding port 8888 of rank 0"
    assert event.details == {
        "rank": 0,
        "port": 8888,
        "session": forwarding.session_key(run),
        "connections": 3,
        "bytes_to_job": 30,
        "bytes_from_job": 3000,
    }
    # The same id named by somebody else is their own session, never a way into this one's.
    other = await _forward(session, target, "user:cy", run)
    assert other is not None
    assert other != event_id
    assert len(await _events(session)) == 2


async def test_without_a_session_every_connection_is_an_event(session: AsyncSession) -> None:
    target = await _target(session)
    for _ in range(3):
        assert await _forward(session, target, "user:ada", None) is None
    events = await _events(session)
    assert [e.reason for e in events] == ["forwarded a connection to port 8888 of rank 0"] * 3
