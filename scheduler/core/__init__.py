"""Pure scheduling policy: a cluster snapshot in, decisions out (no I/O, no clock)."""

from scheduler.core.cycle import reason_codes
from scheduler.core.scheduler import Scheduler, schedule
from scheduler.core.usage import (
    capacity_usage,
    decay_factor,
    decay_usage,
    fairshare_factor,
    interval_usage,
    recovery_time,
    tree_standing,
)

__all__ = [
    "Scheduler",
    "capacity_usage",
    "decay_factor",
    "decay_usage",
    "fairshare_factor",
    "interval_usage",
    "reason_codes",
    "recovery_time",
    "schedule",
    "tree_standing",
]
