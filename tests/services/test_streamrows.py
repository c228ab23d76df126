"""Stream rows on both databases: the per-job, per-user and per-org caps count every holder's
live rows (and openings racing each other queue rather than pass a cap together), a stream is
claimed once and only by its node before it expires, the relay secret is stored hashed and
checked, and rows of a holder gone quiet stop counting and are swept."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from scheduler.db import Event, Stream
from scheduler.db.engine import make_sessionmaker
from scheduler.db.types import utcnow
from scheduler.services import streamrows
from scheduler.services.errors import TooManyRequests
from scheduler.services.interactive import AttachTarget
from scheduler.services.jobevents import record_job_event
from scheduler.services.streamrows import (
    MAX_OPEN,
    STALE_AFTER_S,
    StreamCaps,
    StreamKind,
    StreamOwner,
)
from tests import factories as f
from tests.harness.locks import done_or_waiting


async def _target(session: AsyncSession) -> AttachTarget:
    o = await f.org(session)
    u = await f.user(session, o)
    n, gpus = await f.node(session, gpus=1)
    j = await f.job(session, o, u, interactive=True)
    t = await f.running_task(session, j, n, gpus)
    return AttachTarget(job_id=j.id, org_id=o.id, task_id=t.id, node_id=n.id, rank=0)


OWNER = StreamOwner(user_id=1, org_id=1)
CAPS = StreamCaps()


async def _open(
    session: AsyncSession,
    target: AttachTarget,
    stream_id: str,
    kind: StreamKind = "attach",
    holder: str = "holder-a",
    ttl_s: float = 15.0,
    owner: StreamOwner = OWNER,
    caps: StreamCaps = CAPS,
) -> None:
    await streamrows.open_row(
        session,
        stream_id=stream_id,
        target=target,
        kind=kind,
        port=8888 if kind == "port" else None,
        owner=owner,
        caps=caps,
        holder_id=holder,
        holder_url="http://127.0.0.1:1",
        now=utcnow(),
        ttl_s=ttl_s,
    )


async def test_the_caps_count_every_holders_rows_per_kind(session: AsyncSession) -> None:
    target = await _target(session)
    # Clients of the job's terminal and new shells in its sandbox are terminals alike.
    for i in range(MAX_OPEN["attach"]):
        kind: StreamKind = "new" if i % 3 == 0 else "attach"
        await _open(session, target, f"{kind}-{i:02d}-xxxxxxxxxxx", kind, holder=f"holder-{i % 2}")
    await session.commit()
    for kind in ("attach", "new"):
        with pytest.raises(TooManyRequests, match="8 terminals .attached or new shells. open"):
            await _open(session, target, f"{kind}-one-too-many-xxx", kind)
        await session.rollback()
    # Forwards are counted apart from terminals.
    await _open(session, target, "port-00-xxxxxxxxxxxxx", kind="port")
    await session.commit()
    assert len((await session.scalars(select(Stream))).all()) == MAX_OPEN["attach"] + 1


async def test_rows_of_a_holder_gone_quiet_stop_counting_and_are_swept(
    session: AsyncSession,
) -> None:
    target = await _target(session)
    for i in range(MAX_OPEN["attach"]):
        await _open(session, target, f"gone-{i:02d}-xxxxxxxxxxxx", holder="gone")
    await session.commit()
    quiet = utcnow() - timedelta(seconds=STALE_AFTER_S + 1)
    for row in await session.scalars(select(Stream)):
        row.alive_at = quiet
    await session.commit()
    await _open(session, target, "alive-xxxxxxxxxxxxxxx", holder="alive")  # room again
    await session.commit()
    await streamrows.keep_alive(session, holder_id="alive", now=utcnow())
    await session.commit()
    assert [r.id for r in await session.scalars(select(Stream))] == ["alive-xxxxxxxxxxxxxxx"]


async def test_a_stream_is_claimed_once_only_by_its_node_before_it_expires(
    session: AsyncSession,
) -> None:
    target = await _target(session)
    other, _ = await f.node(session, gpus=1)
    await _open(session, target, "claim-me-xxxxxxxxxxxx")
    await _open(session, target, "expired-xxxxxxxxxxxxx", ttl_s=-1)
    await session.commit()

    async def claim(stream_id: str, node_id: int, secret: str = "s" * 43) -> object:
        claimed = await streamrows.claim_row(
            session, stream_id=stream_id, node_id=node_id, relay_secret=secret, now=utcnow()
        )
        await session.commit()
        return claimed

    assert await claim("claim-me-xxxxxxxxxxxx", other.id) is None  # another node
    assert await claim("expired-xxxxxxxxxxxxx", target.node_id) is None
    assert await claim("no-such-xxxxxxxxxxxxx", target.node_id) is None
    claimed = await claim("claim-me-xxxxxxxxxxxx", target.node_id, secret="the-secret")
    assert claimed == streamrows.Claimed(
        holder_id="holder-a", holder_url="http://127.0.0.1:1", job_id=target.job_id, kind="attach"
    )
    assert await claim("claim-me-xxxxxxxxxxxx", target.node_id) is None  # once
    row = await session.get(Stream, "claim-me-xxxxxxxxxxxx")
    assert row is not None
    assert row.relay_secret_hash == streamrows.secret_hash("the-secret") != "the-secret"

    async def ok(secret: str, holder: str = "holder-a") -> bool:
        return await streamrows.relay_secret_ok(
            session, stream_id="claim-me-xxxxxxxxxxxx", holder_id=holder, secret=secret
        )

    assert await ok("the-secret")
    assert not await ok("the-secret", holder="holder-b")  # not a stream that holder holds
    assert not await ok("the-secreT")
    assert not await ok("")


async def test_the_per_user_and_per_org_caps_count_every_holders_rows(
    session: AsyncSession,
) -> None:
    caps = StreamCaps(open_per_user=2, open_per_org=3, pending_per_user=9, pending_per_job=9)
    ada, bob, eve = StreamOwner(1, 1), StreamOwner(2, 1), StreamOwner(3, 2)
    admin = StreamOwner(4, None)  # a platform admin counts as a user, against no org
    target = await _target(session)
    await _open(session, target, "ada-0-xxxxxxxxxxxxxxx", "port", "holder-a", owner=ada, caps=caps)
    await _open(session, target, "ada-1-xxxxxxxxxxxxxxx", "port", "holder-b", owner=ada, caps=caps)
    await session.commit()
    with pytest.raises(TooManyRequests, match="2 streams of yours are open") as refused:
        await _open(session, target, "ada-2-xxxxxxxxxxxxxxx", "port", owner=ada, caps=caps)
    assert refused.value.extra == {"limit": 2, "retry_after_s": 1}
    await session.rollback()
    await _open(session, target, "bob-0-xxxxxxxxxxxxxxx", "port", owner=bob, caps=caps)
    await session.commit()
    with pytest.raises(TooManyRequests, match="3 streams of your org are open"):
        await _open(session, target, "bob-1-xxxxxxxxxxxxxxx", "port", owner=bob, caps=caps)
    await session.rollback()
    # Another org's user, and a platform admin, have room of their own.
    await _open(session, target, "eve-0-xxxxxxxxxxxxxxx", "port", owner=eve, caps=caps)
    for i in range(2):
        await _open(session, target, f"admin-{i}-xxxxxxxxxxxxx", "port", owner=admin, caps=caps)
    await session.commit()
    # A row of a holder gone quiet no longer counts: ada has room again.
    gone = await session.get(Stream, "ada-0-xxxxxxxxxxxxxxx")
    assert gone is not None
    gone.alive_at = utcnow() - timedelta(seconds=STALE_AFTER_S + 1)
    await session.commit()
    await _open(session, target, "ada-3-xxxxxxxxxxxxxxx", "port", owner=ada, caps=caps)
    await session.commit()


async def test_the_pending_caps_count_streams_not_yet_claimed(session: AsyncSession) -> None:
    caps = StreamCaps(pending_per_user=2, pending_per_job=3)
    ada, bob = StreamOwner(1, 1), StreamOwner(2, 1)
    target = await _target(session)
    for i in range(2):
        await _open(session, target, f"ada-{i}-xxxxxxxxxxxxxxx", owner=ada, caps=caps)
    await session.commit()
    with pytest.raises(TooManyRequests, match="2 streams of yours wait for their node"):
        await _open(session, target, "ada-2-xxxxxxxxxxxxxxx", owner=ada, caps=caps)
    await session.rollback()
    await _open(session, target, "bob-0-xxxxxxxxxxxxxxx", owner=bob, caps=caps)
    await session.commit()
    with pytest.raises(TooManyRequests, match=f"3 streams into job {target.job_id} wait"):
        await _open(session, target, "bob-1-xxxxxxxxxxxxxxx", owner=bob, caps=caps)
    await session.rollback()
    # Claimed by the node, or expired: no longer waiting.
    claimed = await streamrows.claim_row(
        session, stream_id="ada-0-xxxxxxxxxxxxxxx", node_id=target.node_id,
        relay_secret="s" * 43, now=utcnow(),
    )  # fmt: skip
    assert claimed is not None
    expired = await session.get(Stream, "ada-1-xxxxxxxxxxxxxxx")
    assert expired is not None
    expired.expires_at = utcnow() - timedelta(seconds=1)
    await session.commit()
    for i in (2, 3):
        await _open(session, target, f"ada-{i}-xxxxxxxxxxxxxxx", owner=ada, caps=caps)
    await session.commit()


async def test_openings_racing_for_a_users_last_place_pass_one_at_a_time(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    """Two processes' openings of one user, each in its own transaction, on two jobs (no job
    row shared): the second waits for the first to commit, then sees its row and is refused.
    Without the wait each would count only itself and both would pass a cap of 1."""
    caps = StreamCaps(open_per_user=1)
    first_job, second_job = await _target(session), await _target(session)
    await session.commit()
    sessions = make_sessionmaker(engine)
    async with sessions() as first, sessions() as second:
        await _open(first, first_job, "first-xxxxxxxxxxxxxxx", owner=OWNER, caps=caps)
        racing = asyncio.create_task(
            _open(second, second_job, "second-xxxxxxxxxxxxxx", owner=OWNER, caps=caps)
        )
        await asyncio.wait({racing}, timeout=0.5)  # time to run ahead, were it not queued
        await first.commit()
        with pytest.raises(TooManyRequests, match="1 streams of yours are open"):
            await racing


async def test_a_process_that_missed_news_reloads_the_waiting_streams(
    session: AsyncSession, engine: AsyncEngine
) -> None:
    """The wake-up channel reconnected: the rows say which streams wait, for which nodes (the
    rows are read before the reload's session ends, whose rollback expires them)."""
    from scheduler.services.streams import StreamHub

    target = await _target(session)
    await _open(session, target, "waiting-port-xxxxxxxxx", kind="port", holder="another")
    await _open(session, target, "waiting-term-xxxxxxxxx", holder="another")
    await session.commit()
    hub = StreamHub(make_sessionmaker(engine))
    assert await hub.resync() == [target.node_id]
    asked = sorted((s.id, s.kind, s.port) for s in hub.for_node(target.node_id))
    assert asked == [
        ("waiting-port-xxxxxxxxx", "port", 8888),
        ("waiting-term-xxxxxxxxx", "attach", None),
    ]


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_an_opening_and_an_event_wait_for_no_transaction_that_only_references_the_job(
    engine: AsyncEngine,
) -> None:
    """A transaction that inserts a row pointing at the job (a heartbeat's events, usage
    ledger, log chunks) holds the job's row in KEY SHARE until it commits. Openings of streams
    and job events lock the job to queue behind each other, not behind those: FOR NO KEY
    UPDATE, as the heartbeat and the apply take it (a plain FOR UPDATE waits for every
    referencing insert, however long its transaction)."""
    maker = make_sessionmaker(engine)
    async with maker() as s:
        target = await _target(s)
        await s.commit()

    async def opening() -> None:
        async with maker() as s:
            await _open(s, target, "attach-while-referenced-x")
            await s.commit()

    async def event() -> None:
        async with maker() as s:
            await record_job_event(
                s,
                {"kind": "job.attach", "job_id": target.job_id, "actor": "user:ada"},
                max_per_kind=100,
            )
            await s.commit()

    for other_side in (opening, event):
        async with maker() as first:
            first.add(Event(kind="task.state", job_id=target.job_id, actor="agent:1"))
            await first.flush()  # the foreign key's check: KEY SHARE on the job's row
            task = asyncio.create_task(other_side())
            await done_or_waiting(engine, task)
            waited = not task.done()
            await first.commit()
        await asyncio.wait_for(task, timeout=120)
        assert not waited, f"{other_side.__name__} waited on a transaction referencing the job"
