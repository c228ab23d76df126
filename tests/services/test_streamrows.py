"""Stream rows on both databases: the per-job caps count every holder's live rows, a stream is
claimed once and only by its node before it expires, the relay secret is stored hashed and
checked, and rows of a holder gone quiet stop counting and are swept."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Stream
from scheduler.db.types import utcnow
from scheduler.services import streamrows
from scheduler.services.errors import TooManyRequests
from scheduler.services.interactive import AttachTarget
from scheduler.services.streamrows import MAX_OPEN, STALE_AFTER_S, StreamKind
from tests import factories as f


async def _target(session: AsyncSession) -> AttachTarget:
    o = await f.org(session)
    u = await f.user(session, o)
    n, gpus = await f.node(session, gpus=1)
    j = await f.job(session, o, u, interactive=True)
    t = await f.running_task(session, j, n, gpus)
    return AttachTarget(job_id=j.id, org_id=o.id, task_id=t.id, node_id=n.id, rank=0)


async def _open(
    session: AsyncSession,
    target: AttachTarget,
    stream_id: str,
    kind: StreamKind = "attach",
    holder: str = "holder-a",
    ttl_s: float = 15.0,
) -> None:
    await streamrows.open_row(
        session,
        stream_id=stream_id,
        target=target,
        kind=kind,
        port=8888 if kind == "port" else None,
        holder_id=holder,
        holder_url="http://127.0.0.1:1",
        now=utcnow(),
        ttl_s=ttl_s,
    )


async def test_the_caps_count_every_holders_rows_per_kind(session: AsyncSession) -> None:
    target = await _target(session)
    for i in range(MAX_OPEN["attach"]):
        await _open(session, target, f"attach-{i:02d}-xxxxxxxxxx", holder=f"holder-{i % 2}")
    await session.commit()
    with pytest.raises(TooManyRequests, match="8 terminal clients open already"):
        await _open(session, target, "attach-one-too-many-xx")
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
