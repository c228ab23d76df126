"""What a member may read of other orgs in a job's reasons and events: that they exist, not who.

The scheduling core explains a wait with the jobs it waits for ("reserved for job 812"), and a
preempted job's event names the job it made room for ("reclaim for job 813"); those may belong
to another company. For a caller outside the platform admins, every such job of another org
becomes "a job of another org" in the message and leaves the details; victims of a preemption
are counted, not listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Job

_SINGLE_KEYS = ("behind_job_id", "reserved_for_job_id", "preemptor_job_id")
_LIST_KEY = "victim_job_ids"


def referenced_jobs(reasons: Iterable[dict[str, Any]]) -> set[int]:
    ids: set[int] = set()
    for reason in reasons:
        details = reason.get("details") or {}
        for key in _SINGLE_KEYS:
            if isinstance(details.get(key), int):
                ids.add(details[key])
        ids.update(_victims(details))
    return ids


async def foreign_jobs(session: AsyncSession, job_ids: set[int], org_id: int | None) -> set[int]:
    """Those of `job_ids` that belong to another org than `org_id`."""
    if not job_ids:
        return set()
    rows = await session.execute(select(Job.id, Job.org_id).where(Job.id.in_(job_ids)))
    return {job_id for job_id, owner in rows.all() if owner != org_id}


def redact(reasons: list[dict[str, Any]], foreign: set[int]) -> list[dict[str, Any]]:
    if not foreign:
        return reasons
    out = []
    for reason in reasons:
        details = dict(reason.get("details") or {})
        message = str(reason.get("message", ""))
        for key in _SINGLE_KEYS:
            job_id = details.get(key)
            if job_id in foreign:
                del details[key]
                details[key.removesuffix("_job_id") + "_other_org"] = True
                message = redact_text(message, {job_id})
        victims = _victims(details)
        if victims & foreign:
            details[_LIST_KEY] = ",".join(str(v) for v in sorted(victims - foreign))
            details["victims_of_other_orgs"] = len(victims & foreign)
        out.append({**reason, "message": message, "details": details})
    return out


def redact_text(message: str, foreign: set[int]) -> str:
    """ "job 812" → "a job of another org" for every job of `foreign` the message names."""
    for job_id in foreign:
        message = re.sub(rf"\bjob {job_id}\b", "a job of another org", message)
    return message


async def hidden_from(
    session: AsyncSession, reasons: Iterable[dict[str, Any]], viewer_org_id: int | None
) -> set[int]:
    """The jobs these reasons name that a member of `viewer_org_id` may not see."""
    return await foreign_jobs(session, referenced_jobs(reasons), viewer_org_id)


def _victims(details: dict[str, Any]) -> set[int]:
    listed = details.get(_LIST_KEY)
    if not isinstance(listed, str) or not listed:
        return set()
    return {int(v) for v in listed.split(",") if v.strip().isdigit()}
