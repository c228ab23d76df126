"""`/v1/usage`: accounting for billing and reporting, as JSON or CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.deps import Principal, SessionDep, UserPrincipal
from api.schemas.nodes import UsageReport, UsageRow
from scheduler.db import Org
from scheduler.db.types import utcnow
from scheduler.services.errors import InvalidInput, NotFound
from scheduler.services.orgs import all_orgs, find_org, full_view_ids, subtree_ids
from scheduler.services.usage import MAX_REPORT_DAYS, By, Period, usage_report

router = APIRouter(tags=["usage"])

DEFAULT_REPORT_DAYS = 30
CSV_FIELDS = (
    "period_start",
    "key",
    "gpu_hours_allocated",
    "gpu_hours_busy",
    "billed_gpu_hours",
    "energy_joules",
    "preempted_gpu_hours",
)


async def _scope(
    session: SessionDep, principal: Principal, org: str | None
) -> tuple[set[int] | None, set[int]]:
    """Orgs the report covers (an org and the orgs below it; never outside the caller's view;
    None: every org), and those of them beyond the caller's tenant wall, whose users it does
    not name (scheduler/services/orgs.py `full_view_ids`)."""
    orgs = await all_orgs(session)
    own = _own_subtree(orgs, principal)
    if org is not None:
        root = (await find_org(session, org)).id
        if not principal.is_platform_admin and root not in own:
            raise NotFound(f"org {org!r} not found")
        covered: set[int] | None = subtree_ids(orgs, root)
    else:
        covered = None if principal.is_platform_admin else own
    if principal.is_platform_admin or principal.org_id is None:
        return covered, set()
    assert covered is not None
    return covered, covered - full_view_ids(orgs, principal.org_id)


def _own_subtree(orgs: list[Org], principal: Principal) -> set[int]:
    return subtree_ids(orgs, principal.org_id) if principal.org_id is not None else set()


def _utc(value: datetime | None, default: datetime) -> datetime:
    if value is None:
        return default
    if value.tzinfo is None:
        raise InvalidInput("since/until need a timezone (e.g. 2026-01-01T00:00:00Z)")
    return value.astimezone(UTC)


@router.get(
    "/v1/usage",
    response_model=UsageReport,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
async def usage(
    session: SessionDep,
    principal: UserPrincipal,
    by: By = "org",
    period: Period = "day",
    since: datetime | None = None,
    until: datetime | None = None,
    org: Annotated[str | None, Query(max_length=63)] = None,
    format: Literal["json", "csv"] = "json",
) -> UsageReport | Response:
    """GPU-hours allocated, busy (from utilisation) and billed, energy, and GPU-hours lost to
    preemption, per `period` and per `by`. Default: the last 30 days. `format=csv` for
    spreadsheets. Members and org admins see their org and the orgs below it; by user, the
    users of an org beyond a tenant wall below theirs (a company under their programme) are
    summed in one line per org, `ORG/*`, never named."""
    now = utcnow()
    until_at = _utc(until, now)
    since_at = _utc(since, until_at - timedelta(days=DEFAULT_REPORT_DAYS))
    if since_at >= until_at:
        raise InvalidInput("since must be before until")
    if until_at - since_at > timedelta(days=MAX_REPORT_DAYS):
        raise InvalidInput(f"a report covers at most {MAX_REPORT_DAYS} days")
    org_ids, unnamed = await _scope(session, principal, org)
    lines = await usage_report(
        session,
        by=by,
        period=period,
        since=since_at,
        until=until_at,
        org_ids=org_ids,
        unnamed_org_ids=unnamed,
    )
    rows = [UsageRow.model_validate(line) for line in lines]
    if format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for r in rows:
            writer.writerow(
                [
                    r.period_start.isoformat(),
                    r.key,
                    *(f"{getattr(r, f):.6f}" for f in CSV_FIELDS[2:]),
                ]
            )
        return Response(
            buffer.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="usage-{by}-{period}.csv"'},
        )
    return UsageReport(by=by, period=period, since=since_at, until=until_at, data=rows)
