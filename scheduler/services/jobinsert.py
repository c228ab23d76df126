"""A plain submission as one prepared statement on the lean pool (api/direct.py answers it).

The job and its PENDING event, with ON CONFLICT for idempotency keys and the tenant limits'
guard: the very statement scheduler/services/jobsubmit.py runs for a submission on a session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scheduler.db.leanpool import LeanPool, Prepared
from scheduler.services.jobsubmit import SUBMIT_PG

_INSERT_JOB = Prepared(SUBMIT_PG)


async def insert_job(
    pool: LeanPool, values: Mapping[str, Any], event: Mapping[str, Any], guard: Mapping[str, Any]
) -> int | None:
    """The job and its event, no dependencies; None when the user's idempotency key is
    taken (a retry) or a tenant limit refuses it (`guard`: tenantlimits.guard_params)."""
    params: dict[str, Any] = {f"j_{k}": v for k, v in values.items()}
    params.update({f"e_{k}": v for k, v in event.items()})
    params["deps"] = []
    params["dep_kinds"] = []
    params.update(guard)
    job_id: int | None = await pool.run("fetchval", _INSERT_JOB.sql, *_INSERT_JOB.args(params))
    return job_id
