"""One scheduling cycle: order, admit in quota, preempt or reserve, lend to borrowers, explain.

Pass 1 walks pending jobs in priority order and starts those that fit in their org's guarantee;
an in-quota job that does not fit reclaims (preemption) or gets a backfill reservation. Pass 2
lends what is still free to preemptible jobs beyond their guarantee, org by org in order of
weighted share (lowest first). Every job left waiting has a `Wait` (its cause); its reasons with
numbers and its estimated start are built when the decisions' `pending` is first read. The order
of pass 1 comes from `scheduler.core.order`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from itertools import repeat

from scheduler.core.backfill import Reservations
from scheduler.core.capacity import FreeIndex, Layout
from scheduler.core.explain import BuiltOnRead, CycleState, Ended, Explainer, Wait
from scheduler.core.occupied import Occupied
from scheduler.core.order import class_order_holds, priority_of, priority_order
from scheduler.core.pending import PendingClass, PendingClasses
from scheduler.core.preempt import Plan, Preemptor
from scheduler.core.quota import OrgBooks, Paths
from scheduler.core.running import RunningTables, gpu_counts
from scheduler.core.types import (
    Decisions,
    DependencyState,
    OrgStanding,
    PendingJob,
    Placement,
    Preemption,
    PreemptionReason,
    ReasonCode,
    Snapshot,
    Start,
)
from scheduler.core.usage import TreeShares, fair_tree_factors, tree_standing

_RUNNABLE = frozenset({DependencyState.NONE, DependencyState.SATISFIED})

# A stretch of one class's jobs waiting in pass 2, the first one next: its place in the order
# (-priority, submitted_at, job_id: unique, so the rest is never compared), the index of that
# job in the class, the end of the stretch, the class, and the types its jobs may borrow on.
_Run = tuple[float, float, int, int, int, PendingClass, tuple[str, ...]]


class Cycle:
    def __init__(
        self,
        snap: Snapshot,
        layout: Layout,
        tree: tuple[Paths, TreeShares] | None = None,
        run: RunningTables | None = None,
        occupied: Occupied | None = None,
        classes: PendingClasses | None = None,
    ) -> None:
        """`tree`, `run` and `occupied`: kept by a `Scheduler` for this snapshot (and used, not
        changed, by the cycle); None builds them. `classes`: the snapshot's pending queue by
        class (`scheduler.core.pending`), kept by a `Scheduler`; with them the passes visit
        the queue class by class where that decides the same (`run`)."""
        self.snap = snap
        self.classes = classes
        self.cfg = cfg = snap.config
        self.now = snap.now
        if run is None:
            run = RunningTables(snap.running, self.now, cfg.min_runtime_s)
        if occupied is None:
            self.index = FreeIndex(layout, Occupied(layout, run.held))
        else:
            self.index = FreeIndex(layout, occupied, kept=True)
        paths, shares = tree if tree is not None else (None, None)
        self.books = OrgBooks(snap.orgs, self.index.capacity, paths)
        self.books.add_totals(run.booked, run.leaving)
        cap = self.index.capacity_usage(cfg)
        self.shares_norm, self.usage_norm, self.factor = tree_standing(snap.orgs, cap, shares)
        if cfg.fairshare_algorithm == "fairtree":
            self.factor = fair_tree_factors(snap.orgs, self.shares_norm, self.usage_norm)
        self.res = Reservations(self.index, snap.running, self.now, run.drains)
        self.pre = Preemptor(
            run.preempting.values(),
            run.aged,
            self.index,
            self.books,
            cfg,
            self.now,
            self.res.protected,
            run.aged_classes,
        )
        self.ex = Explainer(
            CycleState(self.now, cfg, self.index, self.books, self.res, self.factor)
        )
        self.starts: list[tuple[Start, PendingJob, str]] = []
        self.preemptions: list[Preemption] = []
        self.waits: dict[int, Wait] = {}
        self.failed: dict[tuple[str, str | None, int, int], int] = {}
        self.blocked_by: int | None = None  # strict order: the job everyone waits behind
        self._bump_failed: set[tuple[object, ...]] = set()
        self._borrow_failed: dict[tuple[object, ...], Wait] = {}
        self._quota_floor: dict[tuple[int, str, int], int] = {}
        self._longest_waiting: int | None = None  # see _org_waiting_longest; found when needed
        self._static_memo: dict[tuple[str | None, str | None, int, int, int], tuple[str, ...]] = {}
        self._static_full: dict[
            tuple[int, str | None, str | None, int, int, bool, frozenset[str], int | None],
            tuple[str, ...] | Wait,
        ] = {}

    # -- checks ------------------------------------------------------------------------------

    def static_types(self, job: PendingJob) -> tuple[str, ...] | None:
        """GPU types the job could ever run on; records why not when there are none."""
        ex = self.ex
        if job.held:
            self.waits[job.job_id] = ex.fixed(ReasonCode.JOB_HELD_USER)
            return None
        if job.array_throttled:
            self.waits[job.job_id] = ex.fixed(ReasonCode.JOB_ARRAY_TASK_LIMIT)
            return None
        if job.dependency == DependencyState.WAITING:
            self.waits[job.job_id] = ex.fixed(ReasonCode.DEPENDENCY)
            return None
        if job.dependency == DependencyState.NEVER:
            self.waits[job.job_id] = ex.fixed(ReasonCode.DEPENDENCY_NEVER_SATISFIED)
            return None
        if job.not_before is not None and job.not_before > self.now:
            self.waits[job.job_id] = ex.begin_time(job.not_before)
            return None
        full = (
            job.org_id,
            job.gpu_type,
            job.site,
            job.gpus_per_node,
            job.nodes,
            job.needs_isolation,
            job.capabilities,
            job.memory_bytes,
        )
        known = self._static_full.get(full)
        if known is None:
            known = self._static_full[full] = self._static_types(job)
        if isinstance(known, Wait):
            self.waits[job.job_id] = known
            return None
        return known

    def _static_types(self, job: PendingJob) -> tuple[str, ...] | Wait:
        ex = self.ex
        if job.org_id not in self.books.orgs:
            return ex.bad(job, "unknown organisation")
        need = self.index.job_class(job)
        types = self._possible_types(job, need)
        if not types or job.time_limit_s <= 0:
            if types or job.time_limit_s <= 0 or not need or not self._possible_types(job, 0):
                return ex.bad(job, None)
            return ex.features(job)  # it would fit the cluster, but not the nodes it needs
        if not self.books.limited[job.org_id]:
            return types
        ok = tuple(t for t in types if self.books.limit_never(job.org_id, t, job.gpu_count) is None)
        if not ok:
            lim = self.books.limit_never(job.org_id, types[0], job.gpu_count)
            assert lim is not None
            return ex.limit(job, types[0], lim, never=True)
        return ok

    def _possible_types(self, job: PendingJob, need: int) -> tuple[str, ...]:
        """GPU types whose nodes (of feature class `need`) could ever fit the job."""
        key = (job.gpu_type, job.site, job.gpus_per_node, job.nodes, need)
        types = self._static_memo.get(key)
        if types is None:
            index = self.index
            cands = (job.gpu_type,) if job.gpu_type is not None else tuple(index.types)
            types = tuple(
                t for t in cands if index.possible(t, job.site, job.gpus_per_node, job.nodes, need)
            )
            self._static_memo[key] = types
        return types

    def place(self, job: PendingJob, gpu_type: str) -> tuple[list[int], bool] | None:
        """Nodes for the job, and whether they are reserved nodes it may use because it is short.

        This is where a job is kept to the nodes having the features it needs (`PendingJob.needs`:
        agent capabilities, strict isolation, its memory per GPU): the index places it from the
        levels of their feature class only, and reservations and preemption plans take only
        them.
        """
        need = self.index.job_class(job)
        key = (gpu_type, job.site, job.gpus_per_node, need)
        if self.failed.get(key, job.nodes + 1) > job.nodes:
            if job.nodes == 1 and self.cfg.pack_by_end:
                nodes = self.index.find_by_end(
                    gpu_type,
                    job.site,
                    job.gpus_per_node,
                    need,
                    self.now + job.time_limit_s,
                    self.res.drains_at,
                )
            else:
                nodes = self.index.find(gpu_type, job.site, job.gpus_per_node, job.nodes, need)
            if nodes is not None:
                return nodes, False
            self.failed[key] = job.nodes
        if self.res.reserved:
            short = self.res.short_fit(job, gpu_type, self.now + job.time_limit_s)
            if short is not None:
                return short, True
        return None

    def start(
        self, job: PendingJob, gpu_type: str, where: tuple[list[int], bool], borrowed: bool
    ) -> None:
        gpn = job.gpus_per_node
        end = self.now + job.time_limit_s
        nodes, short = where
        placements = []
        for nid in nodes:
            gpus = self.res.take_short(nid, gpn) if short else self.index.allocate(nid, gpn)
            placements.append(Placement(nid, gpus))
            self.res.note_start(nid, gpn, end)
        self.books.add(job.org_id, gpu_type, job.gpu_count)
        self.starts.append((Start(job.job_id, tuple(placements), borrowed), job, gpu_type))
        # Capacity went down: shapes that failed still fail; nothing else to invalidate.

    # -- passes ------------------------------------------------------------------------------

    def run(self) -> Decisions:
        classes = self.classes
        if (
            classes is not None
            and len(self.snap.pending) <= self.cfg.backfill_depth
            and class_order_holds(self.cfg)
        ):
            self._run_by_class(classes)
            return self._decisions(None)
        order = priority_order(
            self.snap.pending, self.cfg, self.now, self.factor, sum(self.index.capacity.values())
        )
        deferred: dict[int, deque[tuple[PendingJob, tuple[str, ...]]]] = {}
        depth = self.cfg.backfill_depth
        waits = self.waits
        static_full = self._static_full
        ex = self.ex
        settled = self._protect_first(order)
        for rank, (job, _prio) in enumerate(order):
            if settled and job.job_id in settled:
                continue
            known = static_full.get(
                (
                    job.org_id,
                    job.gpu_type,
                    job.site,
                    job.gpus_per_node,
                    job.nodes,
                    job.needs_isolation,
                    job.capabilities,
                    job.memory_bytes,
                )
            )
            if (
                known is None
                or job.held
                or job.array_throttled
                or job.dependency not in _RUNNABLE
                or (job.not_before is not None and job.not_before > self.now)
            ):
                types = self.static_types(job)
                if types is None:
                    continue
            elif isinstance(known, Wait):
                waits[job.job_id] = known
                continue
            else:
                types = known
            if rank >= depth or self.blocked_by is not None:
                waits[job.job_id] = ex.queued(job, types[0], self.blocked_by)
                continue
            borrow = self._consider(job, types)
            if borrow:
                queue = deferred.get(job.org_id)
                if queue is None:
                    queue = deferred[job.org_id] = deque()
                queue.append((job, borrow))
        self._lend(deferred)
        return self._decisions(order)

    def _protect_first(self, order: list[tuple[PendingJob, float]]) -> set[int]:
        """Settle the protected big gangs before the rest of pass 1; returns those settled.

        A job of at least `protect_gang_gpus` GPUs that has waited `protect_gang_after_s` is
        protected: each org's oldest such job (one per org, so no org drains the cluster for
        a series of gangs), the oldest `backfill_reservations` of those in submit order, is
        started (in quota or borrowing), reclaims
        its guarantee, or reserves nodes before any other job is looked at. Its reservation
        is then computed on the running jobs alone each cycle, so later jobs, in quota or
        not, cannot push it back: they only backfill GPUs they hand back before it starts,
        and reclaim plans leave its nodes alone.
        """
        cfg = self.cfg
        least = cfg.protect_gang_gpus
        if least <= 0 or not cfg.backfill:
            return set()
        jobs = (job for job, _prio in itertools.islice(order, cfg.backfill_depth))
        return self._protect_oldest(self._oldest_protected(jobs))

    def _protect_oldest(self, oldest: dict[int, PendingJob]) -> set[int]:
        """Settle each org's oldest protected gang, oldest first; returns those settled."""
        settled: set[int] = set()
        # The oldest `backfill_reservations` only: as many as could hold a reservation, which
        # bounds the work (one plan each) on a cluster of a thousand orgs. A gang among them
        # stays among them until it starts, since only older ones are ahead of it.
        first = sorted(oldest.values(), key=lambda j: (j.submitted_at, j.job_id))
        for job in first[: self.cfg.backfill_reservations]:
            types = self.static_types(job)
            if types is not None and self._protect(job, types):
                settled.add(job.job_id)
        return settled

    def _run_by_class(self, classes: PendingClasses) -> None:
        """Pass 1 and pass 2 as `run` does them, visiting the queue class by class.

        The jobs are taken in the order `run` takes them: a heap holds each class's next job
        under its place in the priority order, and within a class the order is submit order
        (`scheduler.core.pending`). A job's outcome is then the one `run` gives it, and the
        rest of its class is settled without a visit where each of them would end the same
        way with nothing changed on the way (the same as `run` gives them):
        - a reason that holds for any job of the class (held, dependency, no node fits ...);
        - a job behind the strict order's blocked head: the same `queued` wait;
        - a borrower with no type in quota, of an org without limits, where the order cannot
          block (backfill on): allocations only grow in a cycle, so the rest is not in quota
          either; all wait for pass 2, in order;
        - in pass 2, a borrower that found nothing: the rest of its class finds the same
          failed borrow (capacity and victims only shrank), without its limits (an org without
          limits) or its time limit (the same) changing that.
        A job not settled that way is visited as in `run`, and the next of its class after it.
        Every `rank` is below `backfill_depth` (the caller checked the queue's length).
        """
        waits = self.waits
        prio = priority_of(self.cfg, self.now, self.factor, sum(self.index.capacity.values()))
        settled = self._protect_first_by_class(classes)
        heap: list[tuple[float, float, int, int, PendingClass]] = []
        for c in classes.classes.values():
            jobs = c.jobs
            i = 0
            if settled:
                while i < len(jobs) and jobs[i].job_id in settled:
                    i += 1
                if i == len(jobs):
                    continue
            j = jobs[i]
            heap.append((-prio(j), j.submitted_at, j.job_id, i, c))
        heapq.heapify(heap)
        limited = self.books.limited
        deferred: dict[int, list[_Run]] = {}
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            negp, sub, jid, i, c = pop(heap)
            jobs = c.jobs
            job = jobs[i]
            end = len(jobs)
            types = self.static_types(job)
            if types is None:
                waits.update(zip(c.ids[i + 1 :], repeat(waits[jid])))
                continue
            if self.blocked_by is not None:
                w = self.ex.queued(job, types[0], self.blocked_by)
                waits.update(zip(c.ids[i:], repeat(w)))
                continue
            borrow = self._consider(job, types)
            if borrow:
                # The rest of the class waits for pass 2 with it, unless the strict order may
                # still block ahead of them (a later job of another class in quota, nothing
                # free): job by job, those behind the blocked head then wait behind it.
                whole = borrow is types and not limited[job.org_id] and self.cfg.backfill
                last = end if whole else i + 1
                run: _Run = (negp, sub, jid, i, last, c, borrow)
                queue = deferred.get(job.org_id)
                if queue is None:
                    deferred[job.org_id] = [run]
                else:
                    push(queue, run)
                if last == end:
                    continue
            i += 1
            if i < end:
                j = jobs[i]
                push(heap, (-prio(j), j.submitted_at, j.job_id, i, c))
        self._lend_runs(deferred, prio)

    def _protect_first_by_class(self, classes: PendingClasses) -> set[int]:
        """`_protect_first` over the classes: the same gangs, in the same order.

        Which big job of an org it picks depends on the job's class (its types, whether one is
        in quota) and submission only, the oldest among those that qualify: a class's first
        job when its class qualifies.
        """
        cfg = self.cfg
        least = cfg.protect_gang_gpus
        if least <= 0 or not cfg.backfill:
            return set()
        firsts = (c.jobs[0] for c in classes.classes.values())
        return self._protect_oldest(self._oldest_protected(firsts))

    def _oldest_protected(self, jobs: Iterable[PendingJob]) -> dict[int, PendingJob]:
        """Each org's oldest job among `jobs` that is big enough, has waited long enough, has a
        type it may run on, and whose org is within its share or in quota on one of them."""
        cfg = self.cfg
        least = cfg.protect_gang_gpus
        since = self.now - cfg.protect_gang_after_s
        oldest: dict[int, PendingJob] = {}
        within = self._within_share
        for job in jobs:
            if job.submitted_at > since or job.gpus_per_node * job.nodes < least:
                continue
            have = oldest.get(job.org_id)
            if have is not None and (have.submitted_at, have.job_id) < (
                job.submitted_at,
                job.job_id,
            ):
                continue
            types = self.static_types(job)
            if types is None:
                continue
            n = job.gpus_per_node * job.nodes
            if within(job.org_id) or any(self.books.in_quota(job.org_id, t, n) for t in types):
                oldest[job.org_id] = job
        return oldest

    def _within_share(self, org_id: int) -> bool:
        """Its subtree's decayed usage is no more than its share of the cluster (F ≥ 0.5)."""
        return self.usage_norm.get(org_id, 0.0) <= self.shares_norm.get(org_id, 0.0)

    def _protect(self, job: PendingJob, types: tuple[str, ...]) -> bool:
        """Start, reclaim for or reserve nodes for a protected gang; False: treat it as usual."""
        books = self.books
        org_id = job.org_id
        n = job.gpus_per_node * job.nodes
        may_borrow = self.cfg.borrowing and job.preemptible
        in_quota: list[str] = []
        borrow: list[str] = []
        limited = books.limited[org_id]
        for t in types:
            if limited and books.limit_block(org_id, t, n) is not None:
                continue
            if books.in_quota(org_id, t, n):
                in_quota.append(t)
            elif may_borrow:
                borrow.append(t)
        for allowed, borrowed in ((in_quota, False), (borrow, True)):
            for t in allowed:
                where = self.place(job, t)
                if where is not None:
                    self.start(job, t, where, borrowed=borrowed)
                    return True
        if in_quota and self.cfg.preemption:
            plan = self.pre.plan(job, in_quota[0], in_quota=True)
            if plan is not None:
                self._commit(job, in_quota[0], plan)
                return True
        if not (in_quota or borrow) or self.res.count >= self.cfg.backfill_reservations:
            return False
        t = (in_quota or borrow)[0]
        got = self.res.reserve(job, t, protected=True)
        if got is None:
            return False
        start, nodes = got
        since = job.submitted_at + self.cfg.protect_gang_after_s
        self.waits[job.job_id] = self.ex.resources(job, t, start, protected=(nodes, since))
        return True

    def _consider(self, job: PendingJob, types: tuple[str, ...]) -> tuple[str, ...]:
        """Pass 1 for one job: start it in quota, reclaim, reserve, or say why it waits.

        Returns the types it may borrow on in pass 2 (empty when it is settled here).
        """
        books = self.books
        org_id = job.org_id
        n = job.gpus_per_node * job.nodes
        may_borrow = self.cfg.borrowing and job.preemptible
        in_quota: list[str] = []
        borrow: list[str] = []
        # The first type's quota cause (type, org whose limit blocks or None for the guarantee),
        # turned into a Wait only if the job ends up waiting for it.
        blocked: tuple[str, int | None] | None = None
        limited = books.limited[org_id]
        for t in types:
            lim = books.limit_block(org_id, t, n) if limited else None
            if lim is not None:
                blocked = blocked or (t, lim)
            elif books.in_quota(org_id, t, n):
                in_quota.append(t)
            elif may_borrow:
                borrow.append(t)
            else:
                blocked = blocked or (t, None)
        if in_quota and self._admit(job, in_quota, borrow):
            return ()
        if borrow:
            return tuple(borrow) if len(borrow) < len(types) else types
        if in_quota or not self._bump(job, types):
            assert blocked is not None
            t, lim = blocked
            self.waits[job.job_id] = (
                self.ex.guarantee(job, t)
                if lim is None
                else self.ex.limit(job, t, lim, never=False)
            )
        return ()

    def _decisions(self, order: list[tuple[PendingJob, float]] | None) -> Decisions:
        """The cycle's decisions; full explanations are built when `pending` is first read.

        `order`: the priority order, or None when the passes did not need it whole: it is then
        made when an explanation is first read (from inputs that no longer change).
        """
        waits = self.waits
        running = self.snap.running
        chosen, starts = self.pre.chosen, self.starts
        ex = self.ex
        ordered = self._order_on_read(order)
        return Decisions(
            starts=tuple(s for s, _, _ in self.starts),
            preemptions=tuple(self.preemptions),
            pending=BuiltOnRead(
                lambda: ex.explain(
                    ordered(), waits, Ended(running, gpu_counts(running), chosen, starts)
                )
            ),
            standings=self.standings(),
            reasons=BuiltOnRead(lambda: ex.codes(ordered(), waits)),
            blocked_by=self.blocked_by,
            reserved={nid: holder for nid, (_start, holder) in self.res.reserved.items()},
        )

    def _order_on_read(
        self, order: list[tuple[PendingJob, float]] | None
    ) -> Callable[[], list[tuple[PendingJob, float]]]:
        if order is not None:
            known = order
            return lambda: known
        made: list[list[tuple[PendingJob, float]]] = []
        snap, cfg, now, factor = self.snap, self.cfg, self.now, self.factor
        total = sum(self.index.capacity.values())

        def ordered() -> list[tuple[PendingJob, float]]:
            if not made:
                made.append(priority_order(snap.pending, cfg, now, factor, total))
            return made[0]

        return ordered

    def _admit(self, job: PendingJob, in_quota: list[str], borrow: list[str]) -> bool:
        """Try an in-quota start; else reclaim or reserve. True when the job is settled."""
        for t in in_quota:
            nodes = self.place(job, t)
            if nodes is not None:
                self.start(job, t, nodes, borrowed=False)
                return True
        if not in_quota:
            return False
        t = in_quota[0]
        if self.cfg.preemption:
            plan = self.pre.plan(job, t, in_quota=True)
            if plan is not None:
                self._commit(job, t, plan)
                return True
        if borrow:
            return False
        if not self.cfg.backfill:
            self.blocked_by = job.job_id
            self.waits[job.job_id] = self.ex.resources(job, t, None)
            return True
        if self.res.count < self.cfg.backfill_reservations:
            got = self.res.reserve(job, t)
            self.waits[job.job_id] = self.ex.resources(job, t, got[0] if got else None)
        else:
            self.waits[job.job_id] = self.ex.queued(job, t, None)
        return True

    def _bump(self, job: PendingJob, types: tuple[str, ...]) -> bool:
        """Priority-class preemption inside the job's own org, for a job beyond its guarantee.

        The org's allocation does not grow, so this is allowed whenever the job would be in quota
        (or may borrow) once its own lower-class jobs are gone.
        """
        if not self.cfg.preemption:
            return False
        cls = self.cfg.priority_classes.get(job.priority_class, 0)
        may_borrow = self.cfg.borrowing and job.preemptible
        # Victims only get fewer and allocations only grow in a cycle: a failure stays one.
        memo = (
            job.org_id,
            types,
            cls,
            job.site,
            job.gpus_per_node,
            job.nodes,
            may_borrow,
            job.needs_isolation,
            job.capabilities,
            job.memory_bytes,
        )
        if memo in self._bump_failed:
            return False
        if not self.pre.has_lower(job.org_id, types, cls):
            self._bump_failed.add(memo)
            return False
        books = self.books
        n = job.gpus_per_node * job.nodes
        for t in types:
            most = self.pre.own_lower_gpus(job.org_id, t, cls)
            if most == 0 or books.limit_block(job.org_id, t, n) is not None:
                continue
            if not may_borrow:
                # Not even all its own lower-class jobs gone would bring it into quota; a larger
                # job of the same org and class will not fare better this cycle.
                floor = (job.org_id, t, cls)
                if n >= self._quota_floor.get(floor, n + 1):
                    continue
                if not books.in_quota_after(job.org_id, t, n, most):
                    self._quota_floor[floor] = n
                    continue
            plan = self.pre.plan(job, t, in_quota=False)
            if plan is None:
                continue
            freed = sum(self.pre.gpus_of(v) for v in plan.victims)
            if not may_borrow and not books.in_quota_after(job.org_id, t, n, freed):
                continue
            self._commit(job, t, plan)
            return True
        self._bump_failed.add(memo)
        return False

    def _consolidate(self, job: PendingJob, types: tuple[str, ...]) -> bool:
        """A borrower that fits nowhere gathers a mostly idle node from a few small borrowers.

        Fragmentation leaves GPUs idle that no waiting gang can use; moving the few jobs that
        keep such a node from being whole puts more GPUs to work than it stops (see `plan`).
        """
        if not (self.cfg.preemption and self.cfg.consolidate):
            return False
        if self.now - job.submitted_at < self.cfg.consolidate_after_s:
            return False
        if self._longest_waiting is None:
            self._longest_waiting = self._org_waiting_longest()
        half = (job.gpus_per_node + 1) // 2
        for t in types:
            # Victims hold no more than lies idle, so every node of the gang has at least half
            # its GPUs free, unless its own org's GPUs are leaving: a count decides most cases
            # before a plan reads every candidate.
            lvl = self.index.levels.get((t,))
            if not self.pre.own_incoming.get((job.org_id, t)) and (
                lvl is None or lvl.count_ge(half) < job.nodes
            ):
                continue
            plan = self.pre.plan(
                job, t, in_quota=False, consolidate=True, spare_org=self._longest_waiting
            )
            if plan is not None:
                self._commit(job, t, plan, PreemptionReason.CONSOLIDATE)
                return True
        return False

    def _org_waiting_longest(self) -> int:
        """The org of the runnable pending job submitted first (-1: none): consolidation takes
        none of its jobs for another org's, so the tenant whose work already waits longest does
        not also pay for the moves (a job of it moved waits again from the queue's back)."""
        first: tuple[float, int, int] | None = None
        now = self.now
        for job in self.snap.pending:
            if (
                job.held
                or job.array_throttled
                or job.dependency not in _RUNNABLE
                or (job.not_before is not None and job.not_before > now)
            ):
                continue
            key = (job.submitted_at, job.job_id, job.org_id)
            if first is None or key < first:
                first = key
        return -1 if first is None else first[2]

    def _commit(
        self, job: PendingJob, t: str, plan: Plan, reason: PreemptionReason | None = None
    ) -> None:
        ready_at = self.pre.commit(job, t, plan)
        deadline = self.now + self.cfg.preemption_grace_s
        for v in plan.victims:
            why = reason or (
                PreemptionReason.PRIORITY if v.org_id == job.org_id else PreemptionReason.RECLAIM
            )
            self.preemptions.append(Preemption(v.job_id, why, job.job_id, deadline))
        self.waits[job.job_id] = self.ex.preempting(job, t, plan, ready_at)

    def _lend(self, deferred: dict[int, deque[tuple[PendingJob, tuple[str, ...]]]]) -> None:
        """Pass 2: idle GPUs to borrowers, lowest weighted share first (Kueue fair sharing)."""
        books = self.books
        heap = [(books.dominant_share(oid), oid) for oid in deferred]
        heapq.heapify(heap)
        while heap:
            _share, oid = heapq.heappop(heap)
            queue = deferred[oid]
            # The org stays the lowest share until one of its jobs starts: no heap work till then.
            while queue:
                job, types = queue.popleft()
                if self._borrow(job, types):
                    break
            if queue:
                heapq.heappush(heap, (books.dominant_share(oid), oid))

    def _lend_runs(
        self, deferred: dict[int, list[_Run]], prio: Callable[[PendingJob], float]
    ) -> None:
        """`_lend` over stretches of classes: each org's borrowers in the order `_lend` takes
        them (a heap by their place in the priority order), a stretch settled whole where its
        first job found nothing to borrow (`_run_by_class`)."""
        books = self.books
        waits = self.waits
        heap = [(books.dominant_share(oid), oid) for oid in deferred]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _share, oid = pop(heap)
            queue = deferred[oid]
            while queue:
                _negp, _sub, jid, i, end, c, types = pop(queue)
                job = c.jobs[i]
                if self._borrow(job, types):
                    i += 1
                    if i < end:
                        j = c.jobs[i]
                        push(queue, (-prio(j), j.submitted_at, j.job_id, i, end, c, types))
                    break
                if i + 1 < end:
                    waits.update(zip(c.ids[i + 1 : end], repeat(waits[jid])))
            if queue:
                push(heap, (books.dominant_share(oid), oid))

    def _borrow(self, job: PendingJob, types: tuple[str, ...]) -> bool:
        """Start a borrower if idle GPUs fit it (or its own lower classes make room)."""
        # In strict order only jobs ahead of the blocked one were deferred: they may go.
        books = self.books
        n = job.gpus_per_node * job.nodes
        if books.limited[job.org_id]:
            for t in types:
                lim = books.limit_block(job.org_id, t, n)
                if lim is not None:
                    self.waits[job.job_id] = self.ex.limit(job, t, lim, never=False)
                    return False
        # The same shape of the same org failed before: capacity and victims only shrank since.
        # The time limit matters only where a short job may use reserved GPUs.
        key = (
            job.org_id,
            types,
            job.site,
            job.gpus_per_node,
            job.nodes,
            job.priority_class,
            job.time_limit_s if self.res.reserved else 0.0,
            job.needs_isolation,
            job.capabilities,
            job.memory_bytes,
        )
        failed = self._borrow_failed.get(key)
        if failed is not None:
            self.waits[job.job_id] = failed
            return False
        for t in types:
            nodes = self.place(job, t)
            if nodes is not None:
                self.start(job, t, nodes, borrowed=True)
                return True
        if self._bump(job, types) or self._consolidate(job, types):
            return True
        wait = self.ex.queued(job, types[0], None, borrowing=True)
        self._borrow_failed[key] = self.waits[job.job_id] = wait
        return False

    def standings(self) -> dict[int, OrgStanding]:
        """GPUs held after this cycle's starts (claims of waiting preemptors not counted)."""
        c = self
        books = c.books
        claimed: dict[tuple[int, str], int] = {}
        for org_id, t, n in c.pre.claims:
            for a in books.path.get(org_id, ()):
                claimed[(a, t)] = claimed.get((a, t), 0) + n
        out: dict[int, OrgStanding] = {}
        for oid, org in books.orgs.items():
            # GPU types in name order: the books' own order follows whichever running job of
            # the org came first, which a kept `Scheduler` does not keep.
            alloc = {
                t: a - claimed.get((oid, t), 0)
                for t, a in sorted(books.alloc[oid].items())
                if a - claimed.get((oid, t), 0) > 0
            }
            borrowed = {
                t: a - org.guaranteed.get(t, 0)
                for t, a in alloc.items()
                if a > org.guaranteed.get(t, 0)
            }
            out[oid] = OrgStanding(
                oid,
                c.factor.get(oid, 0.0),
                c.shares_norm.get(oid, 0.0),
                c.usage_norm.get(oid, 0.0),
                alloc,
                borrowed,
            )
        return out


def reason_codes(decisions: Decisions, job_id: int) -> list[ReasonCode]:
    """The reason codes of a pending job (a convenience for callers and tests)."""
    info = decisions.pending.get(job_id)
    return [r.code for r in info.reasons] if info is not None else []


__all__ = ["Cycle", "reason_codes"]
