"""Choosing victims: reclaim of guarantees from borrowers, and priority classes inside an org.

A plan is all or nothing: nothing is preempted unless the preemptor's whole gang then fits.
GPUs of jobs already being preempted count first, so one need never causes two rounds of
preemption. Victims are chosen by the least work lost: the GPU-seconds each would lose at its
kill (since its last checkpoint, or its start when none is known), so a job that just started
or just checkpointed goes first; on each node, of the sets of victims that make the gang's task
fit, the one that loses the least (then holds the fewest GPUs), so none is preempted for GPUs
the task would not use. Among nodes, the fewest GPUs taken
still comes first and the work lost breaks ties: ranking nodes by work lost alone took more
GPUs from more jobs, and on Philly ×12 cost 3 points of allocation while work waits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from scheduler.core.capacity import FreeIndex, Level
from scheduler.core.quota import OrgBooks
from scheduler.core.types import PendingJob, PolicyConfig, RunningJob


@dataclass(slots=True)
class Incoming:
    """GPUs on a node that become free at `deadline` (a job being preempted)."""

    gpus: int
    deadline: float
    by_org: dict[int, int]  # whose jobs are leaving: a bump may only wait for its own org's


@dataclass(slots=True)
class Plan:
    nodes: list[int]  # node rank order
    victims: list[RunningJob]
    ready_at: float  # when the last GPU it waits for is free


class _Option(NamedTuple):
    """One node a plan could free, in the order options are preferred (tuple order)."""

    beyond: bool  # some victim org would drop below its guarantee
    gpus: int  # GPUs its victims hold
    lost: float  # GPU-seconds of work its victims would lose
    node: int
    victims: list[RunningJob]


_NO_CLASS = 1 << 62  # the lowest class when there is no candidate: above every class


def _youngest_first(r: RunningJob) -> tuple[float, int]:
    return (-r.started_at, r.job_id)


def work_lost_s(r: RunningJob, kill_at: float) -> float:
    """Seconds of work a kill at `kill_at` loses: since its last checkpoint, or its start."""
    ran = max(kill_at - r.started_at, 0.0)
    interval = r.checkpoint_interval_s
    return ran % interval if interval else ran


def movable(r: RunningJob, kill_at: float, most_lost_s: float) -> bool:
    """Consolidation may move it: it checkpointed during this run and loses little since.

    Every move then leaves at least one checkpoint interval of work saved, so a job moved
    again and again still finishes; a job with no known checkpoints (the server's) is never
    moved.
    """
    interval = r.checkpoint_interval_s
    if not interval:
        return False
    return kill_at - r.started_at >= interval and work_lost_s(r, kill_at) <= most_lost_s


class Preemptor:
    def __init__(
        self,
        preempting: Iterable[RunningJob],
        aged: dict[tuple[int, str], list[tuple[RunningJob, int]]],
        index: FreeIndex,
        books: OrgBooks,
        config: PolicyConfig,
        now: float,
        avoid: set[int] | None = None,
        aged_classes: Iterable[str] | None = None,
    ) -> None:
        """`aged_classes`: the priority classes of the candidates in `aged` (None: read them
        from `aged`)."""
        if aged_classes is None:
            aged_classes = {r.priority_class for grp in aged.values() for r, _ in grp}
        self.index = index
        # Nodes reserved for protected gangs (filled as the cycle goes): no plan frees them.
        self.avoid: set[int] = avoid if avoid is not None else set()
        self.books = books
        self.config = config
        self.now = now
        self.classes = config.priority_classes
        # The lowest class of any candidate (a class not configured is 0): a question about
        # lower classes than that needs no candidate read.
        self._lowest_class = min(
            (self.classes.get(name, 0) for name in aged_classes), default=_NO_CLASS
        )
        self.incoming: dict[int, Incoming] = {}
        self.own_incoming: dict[tuple[int, str], int] = {}  # (org, type) → GPUs of its leaving
        self._inc_by_org: dict[tuple[int, str], set[int]] = {}  # (org, type) → nodes
        self._inc_sorted: dict[str, list[int]] = {}  # type → nodes with leaving GPUs, by id
        for r in preempting:
            self._add_incoming(r, r.preempt_deadline if r.preempt_deadline else now)
        self.chosen: set[int] = set()
        # GPUs booked to preemptors that have not started: not held yet, so not in standings.
        self.claims: list[tuple[int, str, int]] = []
        self._candidates: dict[str, list[RunningJob]] = {}
        # Per (org, type): running jobs not leaving, preemptible and past the minimum runtime,
        # with their GPUs, in running order (gathered in the cycle's one pass over running jobs).
        # What a question needs is derived from them per org, when first asked.
        self._aged = aged
        self._count: dict[int, int] = {}  # id() of a candidate → GPUs it holds
        self._lost: dict[int, float] = {}  # id() of a candidate → GPU-seconds a kill loses
        self._counted: set[tuple[int, str]] = set()  # groups whose candidates are in both
        self.failed: dict[tuple[str, str | None, int, int, int, int], int] = {}
        # Per (org, type), on demand: its candidates youngest first, and [lowest class, GPUs,
        # candidates not yet chosen].
        self._own: dict[tuple[int, str], list[RunningJob]] = {}
        self._stats: dict[tuple[int, str], list[int]] = {}
        self._victims: set[int] = set()  # id() of every victim committed this cycle
        self._shares: dict[str, dict[int, float]] = {}  # weighted shares when a type was scanned

    def _add_incoming(self, r: RunningJob, deadline: float) -> None:
        for p in r.placements:
            if p.node_id not in self.index.nodes:
                continue
            inc = self.incoming.get(p.node_id)
            g = len(p.gpus)
            if inc is None:
                self.incoming[p.node_id] = Incoming(g, deadline, {r.org_id: g})
            else:
                inc.gpus += g
                inc.deadline = max(inc.deadline, deadline)
                inc.by_org[r.org_id] = inc.by_org.get(r.org_id, 0) + g
            key = (r.org_id, r.gpu_type)
            self.own_incoming[key] = self.own_incoming.get(key, 0) + g
            nodes = self._inc_by_org.get(key)
            if nodes is None:
                self._inc_by_org[key] = {p.node_id}
            else:
                nodes.add(p.node_id)
            self._inc_sorted.pop(r.gpu_type, None)

    def _consume(self, inc: Incoming, used: int, org_id: int, gpu_type: str) -> None:
        """A claim takes leaving GPUs: its own org's first, then others' in org id order."""
        used = min(used, inc.gpus)
        inc.gpus -= used
        for o in [org_id, *sorted(x for x in inc.by_org if x != org_id)]:
            if used <= 0:
                break
            take = min(used, inc.by_org.get(o, 0))
            if take:
                inc.by_org[o] -= take
                self.own_incoming[(o, gpu_type)] -= take
                used -= take

    def _stat(self, key: tuple[int, str]) -> list[int] | None:
        st = self._stats.get(key)
        if st is None:
            grp = self._aged.get(key)
            if grp is None or key[0] not in self.books.orgs:
                return None
            classes, victims = self.classes, self._victims
            st = self._stats[key] = [
                min(classes.get(r.priority_class, 0) for r, _ in grp),
                sum(n for _, n in grp),
                sum(1 for r, _ in grp if id(r) not in victims),
            ]
        return st

    def has_lower(self, org_id: int, types: tuple[str, ...], cls: int) -> bool:
        """Whether the org runs a preemptible lower-class job, or has jobs leaving, on a type."""
        shares, stats, own_incoming = self._shares, self._stats, self.own_incoming
        # No candidate's class is below `cls`: then only leaving GPUs count, and the org's
        # candidates need not be read (where all jobs have one class, every borrower that
        # finds no idle GPUs asks this, every cycle).
        lowest = cls <= self._lowest_class
        for t in types:
            if t not in shares:
                self._scan(t)
            key = (org_id, t)
            if own_incoming.get(key):
                return True
            if lowest:
                continue
            st = stats.get(key)
            if st is None:
                st = self._stat(key)
            if st is not None and st[0] < cls and st[2]:
                return True
        return False

    def own_lower_gpus(self, org_id: int, gpu_type: str, cls: int) -> int:
        """At most this many GPUs could its own lower-class jobs free (an upper bound)."""
        if gpu_type not in self._shares:
            self._scan(gpu_type)
        key = (org_id, gpu_type)
        leaving = self.own_incoming.get(key, 0)
        st = self._stats.get(key)
        if st is None:
            st = self._stat(key)
        if st is None or st[0] >= cls:
            return leaving
        return st[1] + leaving

    def _incoming_of(self, gpu_type: str, org_id: int | None = None) -> list[int]:
        """Nodes with leaving GPUs of the type (of one org's jobs when given)."""
        if org_id is not None:  # callers do not depend on the order
            return list(self._inc_by_org.get((org_id, gpu_type), ()))
        out = self._inc_sorted.get(gpu_type)
        if out is None:
            nodes = self.index.nodes
            out = self._inc_sorted[gpu_type] = sorted(
                n for n in self.incoming if nodes[n].gpu_type == gpu_type
            )
        return out

    def _scan(self, gpu_type: str) -> None:
        """Take the weighted shares that order the type's candidates, at the first question.

        Nothing per job is done here: a group's facts are derived when its org is asked about.
        """
        if gpu_type in self._shares:
            return
        orgs, books = self.books.orgs, self.books
        self._shares[gpu_type] = {
            o: books.weighted_share(o, gpu_type)
            for o, t in self._aged
            if t == gpu_type and o in orgs
        }

    def _group(self, key: tuple[int, str]) -> list[tuple[RunningJob, int]]:
        """An org's candidates of a type with their GPUs; their counts and losses noted once."""
        grp = self._aged.get(key, [])
        if key not in self._counted:
            self._counted.add(key)
            count, lost = self._count, self._lost
            kill_at = self.now + self.config.preemption_grace_s
            for r, n in grp:
                count[id(r)] = n
                lost[id(r)] = n * work_lost_s(r, kill_at)
        return grp

    def _own_order(self, org_id: int, gpu_type: str) -> list[RunningJob]:
        """The org's own candidates of the type, youngest first (then job id)."""
        key = (org_id, gpu_type)
        own = self._own.get(key)
        if own is None:
            own = self._own[key] = sorted((r for r, _ in self._group(key)), key=_youngest_first)
        return own

    def gpus_of(self, r: RunningJob) -> int:
        """GPUs a candidate holds (counted once, when its org's candidates were first read)."""
        return self._count[id(r)]

    def candidates(self, gpu_type: str) -> list[RunningJob]:
        """Preemptible jobs of the type old enough to preempt, most-over-share org first."""
        out = self._candidates.get(gpu_type)
        if out is None:
            self._scan(gpu_type)
            share = self._shares[gpu_type]
            jobs = [r for o in share for r, _ in self._group((o, gpu_type))]
            # Job ids are unique, so the youngest-first order does not depend on the groups'.
            young = sorted(jobs, key=_youngest_first)
            # A stable sort of the youngest-first list: ties keep (-started_at, job_id) order.
            out = sorted(young, key=lambda r: -share[r.org_id])
            self._candidates[gpu_type] = out
        return out

    def plan(
        self,
        job: PendingJob,
        gpu_type: str,
        in_quota: bool,
        consolidate: bool = False,
        spare_org: int = -1,
    ) -> Plan | None:
        """The cheapest nodes to free for the job's gang, or None (nothing is preempted then).

        Per node: GPUs free now, then GPUs already leaving, then victims in candidate order
        until the node fits; its cost is the GPUs those victims hold. Nodes whose victims stay
        within what their orgs borrow come first, then the cheapest, then the lowest id.
        `consolidate` (a borrower that fits nowhere): victims are borrowers whose org keeps a
        weighted share at least the job's, or its own jobs of no higher class, each `movable`,
        and only on nodes where they hold no more GPUs than are idle there and no org drops
        below its guarantee; none of `spare_org`'s jobs moves for another org's.
        """
        gpn, k, site = job.gpus_per_node, job.nodes, job.site
        need = self.index.job_class(job)  # only nodes with the features it needs are freed
        cls = self.classes.get(job.priority_class, 0)
        # Beyond quota only the org's own jobs are victims: the memo is then per org.
        # Consolidation's victims depend on the org too; its memo keys are negative.
        scope = 0 if in_quota else -1 - job.org_id if consolidate else job.org_id
        memo = (gpu_type, site, gpn, cls, scope, need)
        if self.failed.get(memo, k + 1) <= k:
            return None
        if in_quota or consolidate:
            if not consolidate:
                # A reclaim that cannot free enough GPUs fails after reading, ordering and
                # costing every candidate of the type: decide that from sums first.
                self._scan(gpu_type)
                aged = self._aged
                if not any(aged.get((o, gpu_type)) for o in self._shares[gpu_type]) and (
                    not self._incoming_of(gpu_type)
                ):
                    return None  # as below: no candidate of the type and nothing leaving
                waiting = self._leaving_only(job, gpu_type, need)
                if waiting is not None:
                    return waiting
                if not self._could_free(job, gpu_type, need):
                    self.failed[memo] = min(k, self.failed.get(memo, k + 1))
                    return None
            cands = self.candidates(gpu_type)
            if not cands and not self._incoming_of(gpu_type):
                return None
        else:
            if gpu_type not in self._shares:
                self._scan(gpu_type)
            st = self._stats.get((job.org_id, gpu_type))
            if st is None:
                st = self._stat((job.org_id, gpu_type))
            if (st is None or st[0] >= cls) and not self.own_incoming.get((job.org_id, gpu_type)):
                return None  # no lower-class job of its own org to preempt, none leaving
            cands = self._own_order(job.org_id, gpu_type)
        index, books = self.index, self.books
        free = index.free
        levels = index.levels_for(need)
        count = self._count
        matches = self._matches

        # Leaving GPUs first: in quota any serve; beyond quota only the org's own (its bumps).
        leaving: dict[int, int] = {}
        for nid in self._incoming_of(gpu_type, None if in_quota else job.org_id):
            inc = self.incoming[nid]
            g = inc.gpus if in_quota else min(inc.gpus, inc.by_org.get(job.org_id, 0))
            if g > 0 and matches(nid, gpu_type, site, need, gpn):
                leaving[nid] = g
        # Eligible victims, grouped by the nodes they would free, in candidate order.
        after_share = (
            books.weighted_share(job.org_id, gpu_type, job.gpu_count)
            if in_quota or consolidate
            else 0.0
        )
        kill_at = self.now + self.config.preemption_grace_s
        most_lost = self.config.consolidate_max_lost_s
        over: dict[int, int] = {}
        # A victim org's weighted share without a candidate's GPUs, per (org, GPUs): the books do
        # not change during a plan, and a reclaim reads every candidate of the type.
        share_without: dict[tuple[int, int], float] = {}
        by_node: dict[int, list[tuple[RunningJob, int]]] = {}
        chosen, classes = self.chosen, self.classes
        for r in cands:
            if r.job_id in chosen:
                continue
            if consolidate and not movable(r, kill_at, most_lost):
                continue
            if r.org_id == job.org_id:
                # A bump takes lower classes; consolidation moves any of no higher class.
                if classes.get(r.priority_class, 0) >= cls + consolidate:
                    continue
            elif in_quota or consolidate:
                if consolidate and r.org_id == spare_org:
                    continue
                left = over.get(r.org_id)
                if left is None:
                    left = over[r.org_id] = books.over(r.org_id, gpu_type)
                if left <= 0:
                    continue
                # No-loop rule: the preemptor must not end up above the victim's share.
                sized = (r.org_id, count[id(r)])
                victim_share = share_without.get(sized)
                if victim_share is None:
                    victim_share = share_without[sized] = books.weighted_share(
                        r.org_id, gpu_type, -sized[1]
                    )
                if after_share > victim_share:
                    continue
            else:
                continue
            for p in r.placements:
                if matches(p.node_id, gpu_type, site, need, gpn):
                    by_node.setdefault(p.node_id, []).append((r, len(p.gpus)))
        # Per node: the victims it needs, whether they stay within borrowing, and their cost.
        options: list[_Option] = []
        touched = list(by_node)
        if leaving:
            touched.extend(n for n in leaving if n not in by_node)
        for nid in touched:  # any order: options are sorted below
            have = free[nid] + leaving.get(nid, 0)
            victims = self._least_lost(by_node.get(nid, []), gpn - have)
            if victims is None:
                continue
            gpus, lost = 0, 0.0
            spent: dict[int, int] = {}
            for r in victims:
                gpus += count[id(r)]
                lost += self._lost[id(r)]
                if r.org_id != job.org_id:
                    spent[r.org_id] = spent.get(r.org_id, 0) + count[id(r)]
            # Only other orgs' victims count (a bump takes its own org's jobs alone: none).
            beyond = bool(spent) and any(n > over.get(o, 0) for o, n in spent.items())
            if consolidate and (beyond or gpus > free[nid]):
                continue
            options.append(_Option(beyond, gpus, lost, nid, victims))
        got = self._pick(job, gpu_type, options, by_node, levels)
        if got is None:
            self.failed[memo] = min(k, self.failed.get(memo, k + 1))
        return got

    def _pick(
        self,
        job: PendingJob,
        gpu_type: str,
        options: list[_Option],
        by_node: dict[int, list[tuple[RunningJob, int]]],
        levels: dict[tuple[str, ...], Level],
    ) -> Plan | None:
        """The plan from the options: the best node, or the best site's nodes for a gang
        (None: no site holds the gang)."""
        gpn, k = job.gpus_per_node, job.nodes
        index = self.index
        free, nodes = index.free, index.nodes
        chosen_site: str | None = None
        picked: list[_Option] = []
        from_index: list[int] = []
        if k == 1:
            if options:
                best_one = min(options)
                picked = [best_one]
                chosen_site = nodes[best_one.node].site
        else:
            options.sort()
            best: tuple[bool, int, float, str] | None = None
            for s in sorted({nodes[o.node].site for o in options}):
                lvl = levels.get((gpu_type, s))
                base = min(k, lvl.count_ge(gpn) if lvl is not None else 0)
                here = [o for o in options if nodes[o.node].site == s][: k - base]
                if base + len(here) < k:
                    continue
                key = (
                    any(o.beyond for o in here),
                    sum(o.gpus for o in here),
                    sum(o.lost for o in here),
                    s,
                )
                if best is None or key < best:
                    best = key
            if best is not None:
                chosen_site = best[3]
                lvl = levels.get((gpu_type, chosen_site))
                base = min(k, lvl.count_ge(gpn) if lvl is not None else 0)
                picked = [o for o in options if nodes[o.node].site == chosen_site][: k - base]
                if base and lvl is not None:
                    from_index = index.take(lvl, gpn, base)
        if chosen_site is None:
            return None
        needed: list[RunningJob] = []
        seen: set[int] = set()
        ready_at = self.now
        for _, _, _, nid, victims in picked:
            ids = {r.job_id for r in victims}
            from_victims = sum(g for r, g in by_node.get(nid, ()) if r.job_id in ids)
            if free[nid] + from_victims < gpn:  # it also waits for GPUs already leaving
                ready_at = max(ready_at, self.incoming[nid].deadline)
            for r in victims:
                if r.job_id not in seen:
                    seen.add(r.job_id)
                    needed.append(r)
        return Plan(from_index + [o.node for o in picked], needed, ready_at)

    def _leaving_only(self, job: PendingJob, gpu_type: str, need: int) -> Plan | None:
        """The reclaim's plan when GPUs already leaving suffice, or None.

        A node that GPUs already leaving make whole is an option that preempts nothing, and
        such options come before every option with victims (no GPUs taken, no work lost), so
        `plan` would pick among them alone, by node id or by site: the candidates need not
        be read. A job waiting for an earlier reclaim asks this every cycle until it starts.
        """
        gpn, site = job.gpus_per_node, job.site
        free = self.index.free
        options: list[_Option] = []
        for nid in self._incoming_of(gpu_type):
            g = self.incoming[nid].gpus
            if g > 0 and self._matches(nid, gpu_type, site, need, gpn) and free[nid] + g >= gpn:
                options.append(_Option(False, 0, 0.0, nid, []))
        if not options:
            return None
        return self._pick(job, gpu_type, options, {}, self.index.levels_for(need))

    def _matches(self, nid: int, gpu_type: str, site: str | None, need: int, gpn: int) -> bool:
        """A node a plan may free for a task of `gpn` GPUs: of the type (and site) and of the
        job's feature class, not free enough already, not reserved for a protected gang."""
        node = self.index.nodes.get(nid)
        return (
            node is not None
            and node.gpu_type == gpu_type
            and (site is None or node.site == site)
            and (not need or self.index.in_class(nid, need))
            and self.index.free[nid] < gpn
            and nid not in self.avoid
        )

    def _could_free(self, job: PendingJob, gpu_type: str, need: int) -> bool:
        """Whether a reclaim for `job` could free its gang: False only when `plan` would fail.

        The plan's own test, with sums in place of ordered victims: a node is an option when
        its free GPUs, the GPUs leaving it and those of its eligible victims (the candidates
        `plan` would take for an in-quota job: other orgs' jobs while their org borrows and
        keeps a weighted share at least the job's, and the org's own lower classes, none
        chosen yet) reach the task's size; the gang fits when, on some site, those options and
        the nodes free enough already number the job's nodes. Which victims and in what order
        only decide among options, so a "no" needs no candidate list, cost or sort.
        """
        gpn, k, site = job.gpus_per_node, job.nodes, job.site
        index, books = self.index, self.books
        free, nodes = index.free, index.nodes
        cls = self.classes.get(job.priority_class, 0)
        after_share = books.weighted_share(job.org_id, gpu_type, job.gpu_count)
        chosen, classes = self.chosen, self.classes
        share_without: dict[tuple[int, int], float] = {}
        freeable: dict[int, int] = {}  # node → GPUs free, leaving or held by eligible victims
        for org_id in self._shares[gpu_type]:
            own = org_id == job.org_id
            if not own and books.over(org_id, gpu_type) <= 0:
                continue
            for r, n in self._aged.get((org_id, gpu_type), ()):
                if r.job_id in chosen:
                    continue
                if own:
                    if classes.get(r.priority_class, 0) >= cls:
                        continue
                elif after_share:  # a weighted share is never below 0: at 0 all qualify
                    victim_share = share_without.get((org_id, n))
                    if victim_share is None:
                        victim_share = share_without[(org_id, n)] = books.weighted_share(
                            org_id, gpu_type, -n
                        )
                    if after_share > victim_share:
                        continue
                for p in r.placements:
                    nid = p.node_id
                    freeable[nid] = freeable.get(nid, 0) + len(p.gpus)
        for nid in self._incoming_of(gpu_type):
            g = self.incoming[nid].gpus
            if g > 0:
                freeable[nid] = freeable.get(nid, 0) + g
        per_site: dict[str, int] = {}
        for nid, g in freeable.items():
            if not self._matches(nid, gpu_type, site, need, gpn) or free[nid] + g < gpn:
                continue
            if k == 1:
                return True
            node_site = nodes[nid].site
            per_site[node_site] = per_site.get(node_site, 0) + 1
        levels = index.levels_for(need)
        for s, options in per_site.items():
            lvl = levels.get((gpu_type, s))
            if min(k, lvl.count_ge(gpn) if lvl is not None else 0) + options >= k:
                return True
        return False

    def _least_lost(
        self, on_node: list[tuple[RunningJob, int]], short: int
    ) -> list[RunningJob] | None:
        """Victims on one node that free `short` GPUs losing the least work, or None.

        Exact: of every set of the node's candidates that frees enough, the one whose kills lose
        the fewest GPU-seconds, then holds the fewest GPUs, then has the fewest jobs (candidate
        order on ties): a cover of the shortfall, computed over the GPUs freed so far (capped at
        `short`), so a node's few jobs cost a few dozen steps. Taking the cheapest first until
        enough are free, then keeping those not needed, missed it on 1.4 % of one-node reclaims
        (two jobs killed where one, freeing as much, lost less). No job is preempted for GPUs
        the task would not use: a set with a victim it could leave out costs more.
        """
        if short <= 0:
            return []
        if len(on_node) == 1:  # the common case: one victim frees enough, or nothing does
            r, g = on_node[0]
            return [r] if g >= short else None
        lost, count = self._lost, self._count
        # best[f]: the cheapest set freeing f GPUs (short: at least short) as (lost, GPUs held,
        # jobs, candidate positions).
        best: list[tuple[float, int, int, tuple[int, ...]] | None] = [None] * (short + 1)
        best[0] = (0.0, 0, 0, ())
        for i, (r, g) in enumerate(on_node):
            cost, held = lost[id(r)], count[id(r)]
            for f in range(short - 1, -1, -1):  # from the top: each victim counted once
                have = best[f]
                if have is None:
                    continue
                to = min(f + g, short)
                cand = (have[0] + cost, have[1] + held, have[2] + 1, (*have[3], i))
                known = best[to]
                if known is None or cand[:3] < known[:3]:
                    best[to] = cand
        got = best[short]
        if got is None:
            return None
        return sorted((on_node[i][0] for i in got[3]), key=lambda r: lost[id(r)])

    def commit(self, job: PendingJob, gpu_type: str, plan: Plan) -> float:
        """Book the plan: victims leave, the job's GPUs are withheld for it. Returns ready time."""
        deadline = self.now + self.config.preemption_grace_s
        for v in plan.victims:
            self.chosen.add(v.job_id)
            self._victims.add(id(v))
            st = self._stats.get((v.org_id, v.gpu_type))
            if st is not None:
                st[2] -= 1
            self.books.add_leaving(v.org_id, v.gpu_type, self._count[id(v)])
            self._add_incoming(v, deadline)
        ready_at = plan.ready_at if not plan.victims else max(plan.ready_at, deadline)
        gpn = job.gpus_per_node
        for nid in plan.nodes:
            taken = self.index.hide(nid, gpn)
            inc = self.incoming.get(nid)
            if inc is not None and taken < gpn:
                self._consume(inc, gpn - taken, job.org_id, gpu_type)
        self.books.add(job.org_id, gpu_type, job.gpu_count)
        self.claims.append((job.org_id, gpu_type, job.gpu_count))
        return ready_at
