"""Dependencies in Slurm's words: `afterok:12:13,afterany:14,afternotok:15,singleton`.

`afterok` waits for COMPLETED, `afterany` for any end, `afternotok` for an end other than
COMPLETED; `singleton` waits until no earlier job of the org with the same name is pending or
active. The cycle's load (scheduling/load.py) turns them into the core's DependencyState, and
`explain` names each one with the state of the job it waits for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Job, JobDependency

AFTEROK = "afterok"
KINDS = (AFTEROK, "afterany", "afternotok")
MAX_DEPENDENCY_IDS = 64


@dataclass(frozen=True, slots=True)
class Dependencies:
    kinds: dict[int, str] = field(default_factory=dict)  # job id -> kind
    singleton: bool = False


def parse_dependency(text: str) -> Dependencies:
    """Raises ValueError naming the item it cannot use."""
    kinds: dict[int, str] = {}
    singleton = False
    for item in text.split(","):
        item = item.strip()
        if item == "singleton":
            singleton = True
            continue
        kind, _, ids = item.partition(":")
        if kind not in KINDS or not ids:
            raise ValueError(
                f"bad dependency {item[:64]!r}: use afterok:JOB[:JOB...], afterany:JOB, "
                "afternotok:JOB or singleton, separated by commas"
            )
        for job_text in ids.split(":"):
            if not job_text.isdigit() or not 0 < int(job_text) < 2**63:
                raise ValueError(f"bad job id {job_text[:24]!r} in dependency {item[:64]!r}")
            if kinds.setdefault(int(job_text), kind) != kind:
                raise ValueError(f"job {job_text} is named with two dependency kinds")
    if len(kinds) > MAX_DEPENDENCY_IDS:
        raise ValueError(f"at most {MAX_DEPENDENCY_IDS} dependencies")
    return Dependencies(kinds, singleton)


def met(kind: str, state: JobState) -> bool | None:
    """True: the dependency is met; False: it never will be; None: not yet."""
    if not state.is_terminal:
        return None
    if kind == "afterany":
        return True
    completed = state is JobState.COMPLETED
    return completed if kind == AFTEROK else not completed


def text_of(kinds: dict[int, str], singleton: bool) -> str | None:
    """The Slurm spelling back: `afterok:12:13,afterany:14,singleton`."""
    by_kind: dict[str, list[str]] = {}
    for job_id, kind in sorted(kinds.items()):
        by_kind.setdefault(kind, []).append(str(job_id))
    parts = [f"{kind}:{':'.join(ids)}" for kind, ids in by_kind.items()]
    if singleton:
        parts.append("singleton")
    return ",".join(parts) or None


async def dependency_text(session: AsyncSession, job: Job) -> str | None:
    """The job's dependencies in Slurm's words, as `describe` shows them."""
    rows = await session.execute(
        select(JobDependency.depends_on_id, JobDependency.kind).where(
            JobDependency.job_id == job.id
        )
    )
    kinds: dict[int, str] = dict(rows.all())
    return text_of(kinds, job.singleton)


async def unmet(session: AsyncSession, job: Job) -> dict[str, str]:
    """What a pending job still waits for: `afterok:12` -> `RUNNING`, `singleton:9` -> ..."""
    rows = await session.execute(
        select(JobDependency.depends_on_id, JobDependency.kind, Job.state)
        .join(Job, Job.id == JobDependency.depends_on_id)
        .where(JobDependency.job_id == job.id)
        .order_by(JobDependency.depends_on_id)
    )
    out = {f"{kind}:{job_id}": str(state) for job_id, kind, state in rows if not met(kind, state)}
    if job.singleton:
        earlier = await session.scalar(
            select(func.min(Job.id)).where(
                Job.org_id == job.org_id,
                Job.name == job.name,
                Job.id < job.id,
                Job.state.in_([JobState.PENDING, JobState.STARTING, JobState.RUNNING]),
            )
        )
        if earlier is not None:
            state = await session.scalar(select(Job.state).where(Job.id == earlier))
            out[f"singleton:{earlier}"] = str(state)
    return out
