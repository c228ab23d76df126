"""Per-tenant submission limits: the highest priority class an org may use and the caps on
pending jobs per user and per org.

The same rules run twice, in one place each: `submission_guard` folds them into the insert
itself on PostgreSQL (no extra round trip: the direct submission route keeps its one
statement), reading the counts a trigger keeps in `pending_job_counts` (a few rows, however
many jobs wait); and `check_submission` counts the jobs themselves, up to the cap, for a
clear refusal (and before every insert on SQLite).

The caps hold exactly under concurrent submissions. PostgreSQL: the guard's counts are read by
`fairgpu_pending_room()` (migration 7c3e9a2d5f18) after it takes the user's, then the org's,
transaction-level advisory lock, in a snapshot of their own taken after the locks (a plain
subquery would read in the statement's snapshot, taken before it waited, and miss the jobs of
the submission it waited for); an array takes the same locks (`lock_pending_counts`) before it
counts. One org's submissions, and one user's, go one at a time through their insert and
commit; other orgs' never wait for them. SQLite: a submission takes the database's write lock
before it counts (services/rowlocks.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    ColumnElement,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    false,
    func,
    literal,
    not_,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.core.types import PolicyConfig
from scheduler.db import Job, Org
from scheduler.services.errors import Conflict, Forbidden, InvalidInput
from scheduler.settings import Settings


@dataclass(frozen=True, slots=True)
class SubmitLimits:
    """The server's defaults (scheduler/settings.py); an org may override the maximum class,
    the org cap and the interactive maximum time. `priority_classes` are the policy's
    configured classes and their ranks."""

    default_max_priority_class: str = "normal"
    max_pending_jobs_per_user: int = 5_000
    max_pending_jobs_per_org: int = 20_000
    interactive_max_time_s: int = 8 * 3600
    interactive_idle_timeout_s: int = 3600
    priority_classes: Mapping[str, int] = field(
        default_factory=lambda: PolicyConfig().priority_classes
    )

    @classmethod
    def of(cls, settings: Settings) -> SubmitLimits:
        return cls(
            default_max_priority_class=settings.default_max_priority_class,
            max_pending_jobs_per_user=settings.max_pending_jobs_per_user,
            max_pending_jobs_per_org=settings.max_pending_jobs_per_org,
            interactive_max_time_s=settings.interactive_max_time_s,
            interactive_idle_timeout_s=settings.interactive_idle_timeout_s,
            priority_classes=dict(settings.policy.priority_classes),
        )

    def check_class(self, priority_class: str | None) -> None:
        """Refuse (422) a priority class this server's policy does not configure."""
        if priority_class is not None and priority_class not in self.priority_classes:
            raise InvalidInput(
                f"unknown priority class {priority_class[:64]!r}; one of "
                f"{', '.join(self.priority_classes)} (the server's FAIRGPU_POLICY_PRIORITY_CLASSES)"
            )

    def classes_at_least(self, priority_class: str) -> list[str]:
        """The org maxima that allow `priority_class`: it and every class above it."""
        rank = self.priority_classes[priority_class]
        return [name for name, r in self.priority_classes.items() if r >= rank]


def _pending_of(column: Any, value: Any, cap: Any) -> Any:
    """Pending jobs of one user or org, counted up to `cap` at most: a range of the (user_id,
    state) or (org_id, state) index, whose columns are all it reads (an index-only scan)."""
    capped = select(literal(1)).where(column == value, Job.state == JobState.PENDING).limit(cap)
    return select(func.count()).select_from(capped.subquery()).scalar_subquery()


# Advisory lock classes (the first of the two keys) of one user's and one org's pending
# counts; fairgpu_pending_room() takes the same, user first. Streams use 0x66670001-2.
PENDING_USER_LOCK_CLASS = 0x66670003
PENDING_ORG_LOCK_CLASS = 0x66670004


async def lock_pending_counts(session: AsyncSession, *, user_id: int, org_id: int) -> None:
    """PostgreSQL: wait, to the end of the transaction, for the user's and the org's other
    submissions (in the order the submit statement takes them), so that a count read next
    sees every job they inserted. SQLite: nothing (a writer holds the whole database)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    await session.execute(select(func.pg_advisory_xact_lock(PENDING_USER_LOCK_CLASS, user_id)))
    await session.execute(select(func.pg_advisory_xact_lock(PENDING_ORG_LOCK_CLASS, org_id)))


def submission_guard() -> ColumnElement[bool]:
    """True when a job of `j_org_id`, `j_user_id` at `j_priority_class` may be inserted (and,
    for an org whose one-node jobs must be private, `j_network` and `j_num_nodes` say it is).

    Parameters: `allowed_max` (classes_at_least(priority)), `default_max_priority`,
    `user_cap`, `org_cap_default` (SubmitLimits). Shares the job's own `j_` parameters.
    """
    org_id = bindparam("j_org_id", type_=Integer)
    user_id = bindparam("j_user_id", type_=Integer)
    org_max = select(Org.max_priority_class).where(Org.id == org_id).scalar_subquery()
    org_cap = func.coalesce(
        select(Org.max_pending_jobs).where(Org.id == org_id).scalar_subquery(),
        bindparam("org_cap_default", type_=Integer),
    )
    user_cap = bindparam("user_cap", type_=Integer)
    priority_ok = func.coalesce(org_max, bindparam("default_max_priority", type_=String)) == any_(
        bindparam("allowed_max", type_=ARRAY(String))
    )
    # An org whose one-node jobs must be private: the route that submits one has made it so
    # (or refused it); a direct submission that has not goes to that route instead.
    forced = select(Org.private_network_required).where(Org.id == org_id).scalar_subquery()
    network_ok = or_(
        bindparam("j_network", type_=String) == "private",
        bindparam("j_num_nodes", type_=Integer) > 1,
        not_(func.coalesce(forced, false())),
    )
    # Counted under the user's and the org's advisory locks: exact under concurrency.
    room = func.fairgpu_pending_room(user_id, org_id, user_cap, org_cap, type_=Boolean)
    return and_(priority_ok, network_ok, room)


def guard_params(priority_class: str, limits: SubmitLimits) -> dict[str, Any]:
    return {
        "allowed_max": limits.classes_at_least(priority_class),
        "default_max_priority": limits.default_max_priority_class,
        "user_cap": limits.max_pending_jobs_per_user,
        "org_cap_default": limits.max_pending_jobs_per_org,
    }


async def _count_pending(session: AsyncSession, column: Any, value: int, cap: int) -> int:
    return int(await session.scalar(select(_pending_of(column, value, cap))) or 0)


async def check_submission(
    session: AsyncSession,
    *,
    org: Org,
    user_id: int,
    priority_class: str,
    limits: SubmitLimits,
    adding: int = 1,
) -> None:
    """Refuse a submission of `adding` jobs (an array's elements) over the org's priority
    maximum (403) or a pending cap (409)."""
    org_max = org.max_priority_class or limits.default_max_priority_class
    ranks = limits.priority_classes
    if ranks[priority_class] > ranks.get(org_max, 0):
        raise Forbidden(
            f"org {org.name} may submit at priority {org_max} at most, not {priority_class}",
            org=org.name,
            max_priority_class=org_max,
        )
    user_cap = limits.max_pending_jobs_per_user
    pending = await _count_pending(session, Job.user_id, user_id, user_cap)
    if pending + adding > user_cap:
        raise Conflict(
            f"you have {pending} pending jobs, the most one user may have; submit again once "
            "some have started or been cancelled"
            if adding == 1
            else f"an array of {adding} jobs would take you to {pending + adding} pending jobs; "
            f"one user may have {user_cap} (max_pending_jobs_per_user): submit a smaller array",
            limit="max_pending_jobs_per_user",
            cap=user_cap,
            count=pending,
        )
    org_cap = (
        org.max_pending_jobs
        if org.max_pending_jobs is not None
        else limits.max_pending_jobs_per_org
    )
    pending = await _count_pending(session, Job.org_id, org.id, org_cap)
    if pending + adding > org_cap:
        raise Conflict(
            f"org {org.name} has {pending} pending jobs, the most it may have; submit again "
            "once some have started or been cancelled"
            if adding == 1
            else f"an array of {adding} jobs would take org {org.name} to {pending + adding} "
            f"pending jobs; it may have {org_cap} (max_pending_jobs_per_org)",
            limit="max_pending_jobs_per_org",
            org=org.name,
            cap=org_cap,
            count=pending,
        )
