"""What one tenant's rows cost another's queries: a page of one org's or one user's jobs reads
that page's rows, however many jobs another org has (on PostgreSQL: the rows the plan reads;
on SQLite: the index its plan walks), and audit retention finds dead tokens through an index."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from protocol.states import JobState
from scheduler.db import ApiToken, Job
from scheduler.services.auditretention import delete_dead_tokens
from scheduler.services.joblist import list_jobs
from scheduler.states import TokenKind
from tests import factories

PAGE = 10
QUIET_ORGS_JOBS = 50
OTHER_ORGS_JOBS = 3_000


@contextmanager
def captured(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def _rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows a PostgreSQL plan node of `table` produced or filtered away, over all its loops."""
    read = 0
    if plan.get("Relation Name") == table:
        per_loop = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
        read += per_loop * plan.get("Actual Loops", 1)
    for child in plan.get("Plans", []):
        read += _rows_read(child, table)
    return read


async def _cost(session: AsyncSession, statement: str, parameters: Any, table: str) -> str | int:
    """On PostgreSQL the rows of `table` the statement reads; on SQLite its query plan."""
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        result = await conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
        )
        raw = result.scalar_one()
        plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
        return _rows_read(plan, table)
    result = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
    return " | ".join(str(row[-1]) for row in result)


async def _analyze(session: AsyncSession) -> None:
    await session.commit()
    await session.execute(text("ANALYZE"))


async def test_a_page_of_one_orgs_jobs_reads_only_that_page(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    quiet = await factories.org(session)
    quiet_user = await factories.user(session, quiet)
    busy = await factories.org(session)
    busy_user = await factories.user(session, busy)
    base = {"name": "j", "command": ["x"], "gpus_per_node": 1, "time_limit_s": 60}
    done = {"state": JobState.COMPLETED}
    # The quiet org's jobs are older than all of the busy org's: newest first, a scan by id
    # alone would pass every one of the busy org's jobs before reaching the quiet org's.
    await session.execute(
        insert(Job),
        [{**base, **done, "org_id": quiet.id, "user_id": quiet_user.id}] * QUIET_ORGS_JOBS,
    )
    await session.execute(
        insert(Job),
        [{**base, **done, "org_id": busy.id, "user_id": busy_user.id}] * OTHER_ORGS_JOBS,
    )
    quiet_id, quiet_user_id = quiet.id, quiet_user.id
    await _analyze(session)

    for scope in (
        {"scope_org_id": quiet_id},
        {"scope_org_id": quiet_id, "user_id": quiet_user_id, "states": [JobState.COMPLETED]},
        {"scope_org_id": None, "user_id": quiet_user_id},
    ):
        with captured(engine) as statements:
            rows, more = await list_jobs(session, limit=PAGE, **scope)  # type: ignore[arg-type]
        assert len(rows) == PAGE
        assert more
        assert {r.job.org_id for r in rows} == {quiet_id}
        statement, parameters = statements[0]
        cost = await _cost(session, statement, parameters, "jobs")
        # What it reads is bounded by the quiet org's own jobs, never the busy org's.
        if isinstance(cost, int):
            assert cost <= QUIET_ORGS_JOBS + PAGE + 1, (scope, cost)
        else:
            jobs_step = next(step for step in cost.split(" | ") if " jobs " in f"{step} ")
            assert jobs_step.startswith("SEARCH jobs USING"), (scope, cost)
            assert "(org_id=?" in jobs_step or "(user_id=?" in jobs_step, (scope, cost)
        await session.rollback()


async def test_finding_dead_tokens_reads_only_dead_ones(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    org = await factories.org(session)
    user = await factories.user(session, org)
    now = datetime.now(UTC)
    live = {"kind": TokenKind.USER, "prefix": "p", "user_id": user.id}
    await session.execute(
        insert(ApiToken),
        [
            {**live, "token_hash": f"{i:064x}", "expires_at": now + timedelta(days=1)}
            for i in range(2_000)
        ]
        + [
            {**live, "token_hash": f"{i + 10_000:064x}", "revoked_at": now - timedelta(days=9)}
            for i in range(5)
        ],
    )
    await _analyze(session)
    with captured(engine) as statements:
        deleted = await delete_dead_tokens(session, before=now - timedelta(days=1), limit=100)
    assert deleted == 5
    await session.rollback()
    if engine.dialect.name == "postgresql":
        # A table this small is cheaper to scan than to look up; on a big one the planner
        # takes the index if there is one, which is what this asks.
        await session.execute(text("SET enable_seqscan = off"))
    statement, parameters = statements[0]
    cost = await _cost(session, statement, parameters, "api_tokens")
    if isinstance(cost, int):
        # The five dead rows, met by each index and by the delete: never the 2,000 live ones.
        assert cost <= 4 * 5, cost
    else:
        assert "ix_api_tokens_revoked_at" in cost, cost
        assert "ix_api_tokens_expires_at" in cost, cost
