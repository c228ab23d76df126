"""The pending queue grouped into classes, kept across cycles by a `Scheduler`.

A class is every pending job that a cycle cannot tell apart except by its place in the order:
the same values of every `PendingJob` field but `job_id`, `user_id` and `submitted_at`. Within
a class the priority order is submit order (`submitted_at`, then `job_id`): the jobs share org,
class and size, so only age separates them, and priority never falls with age
(`scheduler.core.order.class_order_holds` says when the arithmetic keeps that true). The cycle
visits a class's jobs in that order and stops where the rest of the class must end the same way
(`scheduler.core.cycle`), so a queue of many jobs in few classes costs about what its classes
and its changes cost, not what its jobs do.

Kept across cycles, the classes are corrected by the jobs that came, went or changed since the
last snapshot (found by object identity: a snapshot reuses the objects of jobs that did not
change), or not at all when the snapshot passes the same pending tuple.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Hashable, Sequence

from scheduler.core.types import PendingJob


def class_key(job: PendingJob) -> Hashable:
    """Every field of the job a cycle's passes read, but the three that set its place only."""
    return (
        job.org_id,
        job.gpu_type,
        job.site,
        job.gpus_per_node,
        job.nodes,
        job.time_limit_s,
        job.priority_class,
        job.preemptible,
        job.held,
        job.dependency,
        job.needs_isolation,
        job.capabilities,
        job.not_before,
        job.array_throttled,
        job.memory_bytes,
    )


def few_classes(pending: Sequence[PendingJob], jobs_per_class: int) -> bool:
    """Whether the queue's classes likely hold `jobs_per_class` jobs each on average, from the
    classes of about 256 of its jobs taken evenly (all of a queue of fewer than 512)."""
    sample = pending if len(pending) < 512 else pending[:: len(pending) // 256]
    return len({class_key(j) for j in sample}) * jobs_per_class <= len(sample)


def _submit_order(job: PendingJob) -> tuple[float, int]:
    return (job.submitted_at, job.job_id)


class PendingClass:
    """The jobs of one class in submit order, and their ids in the same order."""

    __slots__ = ("ids", "jobs")

    def __init__(self, jobs: list[PendingJob]) -> None:
        jobs.sort(key=_submit_order)
        self.jobs = jobs
        self.ids = [j.job_id for j in jobs]

    def add(self, job: PendingJob) -> None:
        at = bisect_left(self.jobs, _submit_order(job), key=_submit_order)
        self.jobs.insert(at, job)
        self.ids.insert(at, job.job_id)

    def remove(self, job: PendingJob) -> None:
        at = bisect_left(self.jobs, _submit_order(job), key=_submit_order)
        if at >= len(self.jobs) or self.jobs[at] is not job:  # unordered times (NaN)
            at = next(i for i, j in enumerate(self.jobs) if j is job)
        del self.jobs[at]
        del self.ids[at]


class PendingClasses:
    """The classes of one pending queue; `advance` corrects them for the next queue."""

    def __init__(self, pending: Sequence[PendingJob]) -> None:
        self.pending = pending
        self.jobs: dict[int, PendingJob] = {j.job_id: j for j in pending}
        self.key_of: dict[int, Hashable] = {}
        groups: dict[Hashable, list[PendingJob]] = {}
        key_of = self.key_of
        for j in pending:
            key = key_of[j.job_id] = class_key(j)
            group = groups.get(key)
            if group is None:
                groups[key] = [j]
            else:
                group.append(j)
        self.classes: dict[Hashable, PendingClass] = {k: PendingClass(g) for k, g in groups.items()}
        # Two jobs of one id: the cycle's order would tell them apart by position; not kept.
        self.valid = len(self.jobs) == len(pending)

    def advance(self, pending: Sequence[PendingJob]) -> bool:
        """Correct the classes for `pending`; False (and unchanged) when it repeats a job id or
        most of its jobs are new objects, where building them anew costs less."""
        if pending is self.pending:
            return True
        old = self.jobs
        jobs = {j.job_id: j for j in pending}
        if len(jobs) != len(pending):
            return False
        old_get = old.get
        came = [j for j in pending if old_get(j.job_id) is not j]
        if len(came) * 2 > len(pending):
            return False  # new objects (the server loads them every cycle): build anew
        went = [old[i] for i in old.keys() - jobs.keys()]
        went += [j for j in (old_get(c.job_id) for c in came) if j is not None]
        classes, key_of = self.classes, self.key_of
        for j in went:
            key = key_of.pop(j.job_id)
            cls = classes[key]
            cls.remove(j)
            if not cls.jobs:
                del classes[key]
        for j in came:
            key = key_of[j.job_id] = class_key(j)
            found = classes.get(key)
            if found is None:
                classes[key] = PendingClass([j])
            else:
                found.add(j)
        self.jobs = jobs
        self.pending = pending
        return True


__all__ = ["PendingClass", "PendingClasses", "class_key", "few_classes"]
