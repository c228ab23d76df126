"""Database layer: ORM rows, engine and session handling, migrations runner."""

from scheduler.db.base import Base
from scheduler.db.jobs import (
    Allocation,
    Event,
    Job,
    JobDependency,
    LogChunk,
    OrgLogBytes,
    PendingJobCount,
    Task,
    UsageRecord,
    UsageRollup,
)
from scheduler.db.models import (
    ApiToken,
    Gpu,
    Node,
    Org,
    OrgUsage,
    Quota,
    RetentionCursor,
    SchedulerLease,
    Site,
    User,
)
from scheduler.db.streams import Stream

__all__ = [
    "Allocation",
    "ApiToken",
    "Base",
    "Event",
    "Gpu",
    "Job",
    "JobDependency",
    "LogChunk",
    "Node",
    "Org",
    "OrgLogBytes",
    "OrgUsage",
    "PendingJobCount",
    "Quota",
    "RetentionCursor",
    "SchedulerLease",
    "Site",
    "Stream",
    "Task",
    "UsageRecord",
    "UsageRollup",
    "User",
]
