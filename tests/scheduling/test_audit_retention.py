"""Audit retention: the scheduler leader deletes events of no job, tokens revoked or expired,
and disabled users that own nothing, older than `audit_retention_s`, in bounded batches;
recent ones, live tokens, jobs' events and users that jobs or usage name stay."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from protocol.states import JobState
from scheduler.db import ApiToken, Event, UsageRollup, User
from scheduler.services import auditretention
from scheduler.services.tokens import issue_token
from scheduler.states import TokenKind
from tests import factories
from tests.scheduling.harness import fast_settings, running_cluster

RETENTION_S = 600.0


async def test_the_leader_deletes_old_audit_rows_in_batches(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auditretention, "BATCH_ROWS", 3)
    monkeypatch.setattr(auditretention, "MAX_BATCHES_PER_PASS", 2)
    settings = fast_settings(database_url, audit_retention_s=RETENTION_S, cycle_interval_s=60.0)
    async with running_cluster(settings) as cluster:
        maker = cluster.sessionmaker
        now = datetime.now(UTC)
        old = now - timedelta(seconds=2 * RETENTION_S)
        async with maker() as session:
            org = await factories.org(session)
            user = await factories.user(session, org)
            job = await factories.job(session, org, user)
            for i in range(7):  # seven old audit lines of no job: three transactions' worth
                session.add(Event(at=old, kind="token.revoke", org_id=org.id, actor=f"u{i}"))
            session.add(Event(at=now, kind="user.create", org_id=org.id, actor="recent"))
            session.add(
                Event(at=old, kind="job.state", job_id=job.id, org_id=org.id, actor="user:x")
            )
            tokens = {}
            for name, revoked, expires in (
                ("revoked-long-ago", old, None),
                ("expired-long-ago", None, old),
                ("revoked-just-now", now, None),
                ("live", None, now + timedelta(days=1)),
            ):
                issued = await issue_token(
                    session, kind=TokenKind.USER, name=name, user_id=user.id, ttl_s=3600
                )
                issued.row.revoked_at, issued.row.expires_at = revoked, expires
                tokens[name] = issued.row.id
            await session.commit()

        cluster.runtime.logs_expired_at = time.monotonic() + 3600  # only the passes asked for
        # Two transactions of three: six of the seven old events, no token yet.
        assert await cluster.runtime.expire_audit() == (6, 0, 0)
        # Then the last event, and the tokens in the pass's second transaction.
        assert await cluster.runtime.expire_audit() == (1, 2, 0)
        assert await cluster.runtime.expire_audit() == (0, 0, 0)
        async with maker() as session:
            left = set(await session.scalars(select(Event.actor).where(Event.org_id == org.id)))
            names = set(
                await session.scalars(select(ApiToken.name).where(ApiToken.user_id == user.id))
            )
        assert left == {"recent", "user:x"}  # the job's event is the job retention's
        assert names == {"revoked-just-now", "live"}
        registry = cluster.runtime.metrics.registry
        purged = "fairgpu_retention_purged_rows_total"
        assert registry.get_sample_value(purged, {"table": "api_tokens"}) == 2

        # The recent ones go once they are older than the retention; a live token never.
        later = now + timedelta(seconds=RETENTION_S + 1)
        _, dead, _ = await cluster.runtime.audit_retention.run_pass(maker, now=later)
        assert dead == 1
        async with maker() as session:
            mine = select(Event.actor).where(Event.org_id == org.id)
            assert set(await session.scalars(mine)) == {"user:x"}
            mine = select(ApiToken.name).where(ApiToken.user_id == user.id)
            assert set(await session.scalars(mine)) == {"live"}


async def test_disabled_users_that_own_nothing_are_deleted_after_the_retention(
    database_url: str,
) -> None:
    """An org admin creating and disabling users kept every row for ever, each name taken from
    every org. After the retention a disabled user goes with its tokens, unless a job or a
    usage rollup row names it (accounting keeps them); enabled and recently disabled users
    stay."""
    settings = fast_settings(database_url, audit_retention_s=RETENTION_S, cycle_interval_s=60.0)
    async with running_cluster(settings) as cluster:
        maker = cluster.sessionmaker
        now = datetime.now(UTC)
        old = now - timedelta(seconds=2 * RETENTION_S)
        async with maker() as session:
            org = await factories.org(session)
            users = {
                name: await factories.user(session, org)
                for name in ("idle", "with-job", "with-usage", "recent", "enabled")
            }
            for name in ("idle", "with-job", "with-usage"):
                users[name].disabled_at = old
            users["recent"].disabled_at = now
            await factories.job(session, org, users["with-job"], state=JobState.COMPLETED)
            session.add(
                UsageRollup(
                    org_id=org.id,
                    user_id=users["with-usage"].id,
                    gpu_type="H100",
                    period_start=old,
                    preempted=False,
                )
            )
            idle_token = await issue_token(
                session, kind=TokenKind.USER, name="t", user_id=users["idle"].id, ttl_s=3600
            )
            idle_token.row.revoked_at = now  # recent: not the tokens' pass, the user's cascade
            ids = {name: row.id for name, row in users.items()}
            await session.commit()

        cluster.runtime.logs_expired_at = time.monotonic() + 3600  # only the passes asked for
        assert await cluster.runtime.expire_audit() == (0, 0, 1)
        async with maker() as session:
            left = set(await session.scalars(select(User.id).where(User.org_id == org.id)))
            tokens = await session.scalar(
                select(ApiToken.id).where(ApiToken.user_id == ids["idle"])
            )
        assert left == {ids[n] for n in ("with-job", "with-usage", "recent", "enabled")}
        assert tokens is None
        registry = cluster.runtime.metrics.registry
        purged = "fairgpu_retention_purged_rows_total"
        assert registry.get_sample_value(purged, {"table": "users"}) == 1
