"""The order a cycle considers pending jobs in: submit order, or multifactor priority."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scheduler.core.types import PendingJob, PolicyConfig

# From this many pending jobs on, positions are sorted by priority alone (below). Shorter
# queues sort the tuples: the extra passes over the jobs cost more than the tuples' comparisons
# save (the simulator's Philly queues, a few hundred jobs with many equal priorities, took
# about a fifth longer), while at 50,000 jobs the order takes about 40 % less time.
_SORT_POSITIONS_FROM = 4_096


def priority_order(
    pending: Sequence[PendingJob],
    cfg: PolicyConfig,
    now: float,
    factor: Mapping[int, float],
    total_gpus: int,
) -> list[tuple[PendingJob, float]]:
    """Pending jobs in the order a cycle considers them, each with its priority.

    `fifo`: submit order (priority 0). `multifactor` (Slurm's plugin): priority = fair share +
    class + age + size, each weighted by the config, summed in that order; ties go to the
    earlier submission, then the lower job id.
    """
    if cfg.ordering == "fifo":
        jobs = sorted(pending, key=lambda j: (j.submitted_at, j.job_id))
        return [(j, 0.0) for j in jobs]
    classes = cfg.priority_classes
    top = max(classes.values(), default=1) or 1
    total = total_gpus or 1
    w_fs, w_cls, w_age, w_size = (
        cfg.weight_fairshare,
        cfg.weight_class,
        cfg.weight_age,
        cfg.weight_size,
    )
    age_max = cfg.age_max_s if cfg.age_max_s > 0 else 1.0
    fs = {o: w_fs * f for o, f in factor.items()}
    cls = {c: w_cls * v / top for c, v in classes.items()}
    age_w = w_age / age_max
    size_w = w_size / total
    fs_get, cls_get = fs.get, cls.get
    if len(pending) < _SORT_POSITIONS_FROM:
        # priority = fair share + class + age + size, summed in that order; sorted by
        # (-priority, submitted_at, job_id, position).
        keyed = [
            (
                -(
                    fs_get(j.org_id, 0.0)
                    + cls_get(j.priority_class, 0.0)
                    + (
                        w_age
                        if (age := now - j.submitted_at) >= age_max
                        else (age * age_w if age > 0 else 0.0)
                    )
                    + (w_size if (size := j.gpus_per_node * j.nodes) >= total else size * size_w)
                ),
                j.submitted_at,
                j.job_id,
                i,
            )
            for i, j in enumerate(pending)
        ]
        keyed.sort()
        return [(pending[x[3]], -x[0]) for x in keyed]
    # The same order for a long queue: positions sorted by priority alone, plain floats, which
    # sort about three times faster than those tuples. Sorts are stable (reverse ones too), so
    # equal priorities keep the order of what is sorted; where some are equal, that is first
    # put in (submitted_at, job_id, position) order by two more sorts of plain numbers.
    prio = [
        fs_get(j.org_id, 0.0)
        + cls_get(j.priority_class, 0.0)
        + (w_age if (age := now - j.submitted_at) >= age_max else (age * age_w if age > 0 else 0.0))
        + (w_size if (size := j.gpus_per_node * j.nodes) >= total else size * size_w)
        for j in pending
    ]
    positions: Sequence[int] = range(len(prio))
    if len(set(prio)) != len(prio):
        ids = [j.job_id for j in pending]
        submitted = [j.submitted_at for j in pending]
        by_submit = sorted(positions, key=ids.__getitem__)
        by_submit.sort(key=submitted.__getitem__)
        positions = by_submit
    ranked = sorted(positions, key=prio.__getitem__, reverse=True)
    return [(pending[i], prio[i]) for i in ranked]
