"""Reasons with numbers and estimated starts for every waiting job, shared per shape and org.

Reasons are frozen, so one `Reason` object serves every job with the same cause (same org, GPU
type, site and gang shape): explaining 50,000 jobs builds a few thousand reasons, not 50,000.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from scheduler.core.estimate import OrgReleases, Profile
from scheduler.core.types import (
    MEMORY_NEED,
    STRICT_ISOLATION,
    PendingInfo,
    PendingJob,
    PolicyConfig,
    Reason,
    ReasonCode,
    RunningJob,
    Start,
    memory_need,
)

if TYPE_CHECKING:
    from scheduler.core.backfill import Reservations
    from scheduler.core.capacity import FreeIndex
    from scheduler.core.preempt import Plan
    from scheduler.core.quota import OrgBooks

ANY = "*"
V = TypeVar("V")

_new = object.__new__
_set_job_id = vars(PendingInfo)["job_id"].__set__  # the slot descriptor
_set_priority = vars(PendingInfo)["priority"].__set__  # the slot descriptor
_set_reasons = vars(PendingInfo)["reasons"].__set__  # the slot descriptor
_set_estimate = vars(PendingInfo)["estimated_start"].__set__  # the slot descriptor


def _info(
    job_id: int, priority: float, reasons: tuple[Reason, ...], estimate: float | None
) -> PendingInfo:
    """`PendingInfo(...)` without the frozen dataclass's `__init__` (a third of the cost).

    It sets the same slots the generated `__init__` sets with `object.__setattr__`; there is no
    `__post_init__`. One per pending job: 50,000 a cycle at national scale.
    """
    info: PendingInfo = _new(PendingInfo)
    _set_job_id(info, job_id)
    _set_priority(info, priority)
    _set_reasons(info, reasons)
    _set_estimate(info, estimate)
    return info


_FIXED_TEXT = {
    ReasonCode.JOB_HELD_USER: "held by its user",
    ReasonCode.JOB_ARRAY_TASK_LIMIT: "its array has as many elements active as its %limit allows",
    ReasonCode.DEPENDENCY: "waiting for its dependencies to complete",
    ReasonCode.DEPENDENCY_NEVER_SATISFIED: "a dependency ended without completing",
}


@dataclass(slots=True)
class Wait:
    """Why a job waits; `lazy` reasons are built at the end, once capacity is final."""

    reasons: tuple[Reason, ...] | None
    gpu_type: str | None = None  # profile the estimate reads; None: no estimate at all
    hint: float | None = None  # known lower bound (reservation, preemption deadline)
    quota: tuple[int, str, int] | None = None  # (org, type, GPUs the org must hand back first)
    lazy: tuple[int, str, str | None, int, int, bool, frozenset[str]] | None = None
    exact: bool = False  # the hint is the estimate (its GPUs are reserved or being freed for it)


@dataclass(frozen=True, slots=True)
class CycleState:
    """The part of a cycle the explainer reads; it never changes any of it.

    `index`, `books` and `reservations` are the cycle's own, so a reason built at the end sees
    the capacity, allocations and reservations the cycle ended with.
    """

    now: float
    config: PolicyConfig
    index: FreeIndex
    books: OrgBooks
    reservations: Reservations
    factor: Mapping[int, float]  # fair-share factor per org


@dataclass(frozen=True, slots=True)
class Ended:
    """What the cycle decided that estimates depend on: who is chosen to go, who starts."""

    running: Sequence[RunningJob]
    running_gpus: Sequence[int]  # GPUs of each running job, in the same order
    chosen: set[int]  # running jobs picked as victims this cycle
    starts: Sequence[tuple[Start, PendingJob, str]]


class BuiltOnRead(Mapping[int, V]):
    """A mapping built the first time any of it is read (`Decisions.pending` and `.reasons`).

    Estimates walk the whole queue in priority order, so the first read builds every entry; the
    lock makes concurrent first reads (metrics and the pending-row writer) build them once.
    """

    __slots__ = ("_build", "_built", "_lock")

    def __init__(self, build: Callable[[], dict[int, V]]) -> None:
        self._build: Callable[[], dict[int, V]] | None = build
        self._built: dict[int, V] = {}
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        """Whether the explanations have been built (read at least once)."""
        return self._build is None

    def _infos(self) -> dict[int, V]:
        if self._build is not None:
            with self._lock:
                if self._build is not None:
                    self._built = self._build()
                    self._build = None  # drops the cycle it read
        return self._built

    def __getitem__(self, job_id: int) -> V:
        return self._infos()[job_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._infos())

    def __len__(self) -> int:
        return len(self._infos())


class Explainer:
    def __init__(self, state: CycleState) -> None:
        self.c = state
        self.cache: dict[tuple[object, ...], Reason] = {}
        self.waits: dict[tuple[object, ...], Wait] = {}  # shared: a Wait is never changed
        self._rank: dict[int, int] | None = None
        self._shape: dict[
            tuple[str, str | None, int, frozenset[str]], dict[str, float | int | str]
        ] = {}
        self._free: dict[str, int] = {}
        self._share: dict[int, float] = {}
        self.any_type = False  # some wait is estimated on every type's profile (ANY)
        self.quota_waits = False  # some wait also waits for its org to hand GPUs back

    def _reason(self, key: tuple[object, ...], build: object) -> Reason:
        r = self.cache.get(key)
        if r is None:
            assert callable(build)
            r = self.cache[key] = build()
        return r

    # -- immediate reasons -------------------------------------------------------------------

    def fixed(self, code: ReasonCode) -> Wait:
        r = self._reason((code,), lambda: Reason(code, _FIXED_TEXT[code]))
        return Wait((r,))

    def begin_time(self, not_before: float) -> Wait:
        """A requeued job in its backoff: it waits until `not_before`, whatever is free."""
        wait_s = not_before - self.c.now
        r = Reason(
            ReasonCode.BEGIN_TIME,
            f"requeued; may start again in {wait_s:.0f} s",
            {"not_before": not_before},
        )
        return Wait((r,))

    def bad(self, job: PendingJob, why: str | None) -> Wait:
        idx = self.c.index
        if why is None:
            if job.time_limit_s <= 0 or job.gpus_per_node <= 0 or job.nodes <= 0:
                why = "time limit, GPUs per node and nodes must all be positive"
            elif job.gpu_type is not None and job.gpu_type not in idx.capacity:
                why = f"no {job.gpu_type} GPUs in the cluster"
            elif job.site is not None and not any((t, job.site) in idx.static for t in idx.types):
                why = f"no site named {job.site}"
            else:
                why = (
                    f"no {job.nodes} node(s) with {job.gpus_per_node} "
                    f"{job.gpu_type or 'GPUs'} each in one site"
                )
        details: dict[str, float | int | str] = {
            "gpus_per_node": job.gpus_per_node,
            "nodes": job.nodes,
            "max_gpus_per_node": idx.max_g,
            "gpu_type": job.gpu_type or "",
            "site": job.site or "",
            "available_types": ",".join(idx.types),
        }
        return Wait((Reason(ReasonCode.BAD_CONSTRAINTS, why, details),))

    def features(self, job: PendingJob) -> Wait:
        """The job would fit the cluster's nodes, but not those having the features it needs:
        strict isolation (its org requires it), agent capabilities (`--signal`, `run --pty`), or
        memory per GPU (`--mem`). It waits for agents to start (or restart) in strict mode,
        upgraded, or with more memory; where no node gives a GPU the memory it asks, it says
        so as BadConstraints (it stays pending: nodes come and go)."""
        idx = self.c.index
        needs = job.needs
        key = ("feat", job.gpu_type, job.site, job.gpus_per_node, job.nodes, needs)
        w = self.waits.get(key)
        if w is not None:
            return w
        what = f"{job.nodes}x{job.gpus_per_node} {job.gpu_type or 'GPUs'}"
        capable = idx.class_size(idx.job_class(job))
        details: dict[str, float | int | str] = _feature_details(job)
        details.update(
            gpus_per_node=job.gpus_per_node,
            nodes=job.nodes,
            gpu_type=job.gpu_type or "",
            site=job.site or "",
        )
        per_gpu = job.memory_per_gpu_bytes
        code = ReasonCode.RESOURCES
        if per_gpu is not None:
            largest = idx.largest_share() or 0
            details["largest_memory_per_gpu_bytes"] = largest
            details["memory_nodes"] = capable
            if not idx.class_size(idx.need_class(frozenset({memory_need(per_gpu)}))):
                code = ReasonCode.BAD_CONSTRAINTS
                text = (
                    f"--mem {_gib(job.memory_bytes or 0)} over {job.gpus_per_node} GPU(s) per "
                    f"node is {_gib(per_gpu)} per GPU; no node gives a GPU more than "
                    f"{_gib(largest)} of its memory: ask for less or for more GPUs per node"
                )
            else:
                text = (
                    f"needs a node {' and '.join(_node_needs(job, details))}; "
                    f"none of the {capable} such node(s) can hold {what}"
                )
        elif job.capabilities:
            caps = details["capabilities"]
            details["capable_nodes"] = capable
            extra = " and strict isolation" if job.needs_isolation else ""
            text = (
                f"needs a node whose agent can do {caps}{extra}; "
                f"none of the {capable} such node(s) can hold {what}"
            )
        else:
            details["strict_isolation_nodes"] = capable
            text = (
                f"needs a node with strict isolation (its org requires it); "
                f"none of the {capable} such node(s) can hold {what}"
            )
        w = self.waits[key] = Wait((Reason(code, text, details),))
        return w

    def limit(self, job: PendingJob, t: str, lim_org: int, never: bool) -> Wait:
        books = self.c.books
        n = job.gpus_per_node * job.nodes
        alloc = books.alloc[lim_org].get(t, 0)
        wkey = ("lim", lim_org, t, n, never, alloc)
        w = self.waits.get(wkey)
        if w is not None:
            return w
        org = books.orgs[lim_org]
        limit = org.limit.get(t, 0)
        text = (
            f"asks {n} {t} GPUs, above the limit of {limit} of org {org.name}"
            if never
            else f"org {org.name} holds {alloc} of its {limit} {t} GPU limit"
        )
        details: dict[str, float | int | str] = {
            "org_id": lim_org,
            "gpu_type": t,
            "limit": limit,
            "allocated": alloc,
            "requested": n,
        }
        r = Reason(ReasonCode.ORG_LIMIT, text, details)
        w = Wait((r,)) if never else Wait((r,), gpu_type=t, quota=(lim_org, t, alloc + n - limit))
        self.quota_waits = self.quota_waits or not never
        self.waits[wkey] = w
        return w

    def guarantee(self, job: PendingJob, t: str) -> Wait:
        books = self.c.books
        n = job.gpus_per_node * job.nodes
        oid = job.org_id
        alloc = books.alloc[oid].get(t, 0)
        wkey = ("guar", oid, t, n, alloc)
        w = self.waits.get(wkey)
        if w is not None:
            return w
        guar = books.orgs[oid].guaranteed.get(t, 0)
        never = n > guar
        if never:
            text = f"asks {n} {t} GPUs, its org's guarantee is {guar}; mark it preemptible"
        elif not self.c.config.borrowing:
            text = f"guarantees act as limits: org holds {alloc} of {guar} {t} GPUs"
        else:
            text = f"beyond its org's guarantee ({alloc} of {guar} {t}) and not preemptible"
        details: dict[str, float | int | str] = {
            "org_id": oid,
            "gpu_type": t,
            "guaranteed": guar,
            "allocated": alloc,
            "requested": n,
            "headroom": guar - alloc,
        }
        r = Reason(ReasonCode.QUOTA_GUARANTEED, text, details)
        w = Wait((r,)) if never else Wait((r,), gpu_type=t, quota=(oid, t, alloc + n - guar))
        self.quota_waits = self.quota_waits or not never
        self.waits[wkey] = w
        return w

    def resources(
        self,
        job: PendingJob,
        t: str,
        reservation_start: float | None,
        *,
        protected: tuple[list[int], float] | None = None,
    ) -> Wait:
        """`protected`: the nodes reserved for a protected gang, and since when it is protected."""
        idx = self.c.index
        largest = idx.largest_gang(t, job.site, job.gpus_per_node, idx.job_class(job))
        details: dict[str, float | int | str] = {
            "gpu_type": t,
            "gpus_per_node": job.gpus_per_node,
            "nodes": job.nodes,
            "largest_free_gang_nodes": largest,
        }
        text = f"needs {job.nodes}x{job.gpus_per_node} {t} GPUs; {largest} node(s) fit now"
        if job.needs_isolation or job.capabilities or job.memory_bytes is not None:
            details.update(_feature_details(job))
            on = []
            if job.needs_isolation:
                on.append("strict isolation")
            if job.capabilities:
                on.append(f"agents that can do {details['capabilities']}")
            if job.memory_bytes is not None:
                on.append(f"{_gib(int(details['memory_per_gpu_bytes']))} of memory per GPU")
            text = (
                f"needs {job.nodes}x{job.gpus_per_node} {t} GPUs on nodes with "
                f"{' and '.join(on)}; {largest} such node(s) fit now"
            )
        if reservation_start is not None:
            details["reservation_start"] = reservation_start
            if protected is None:
                text += "; GPUs reserved for it"
            else:
                nodes, since = protected
                names = ",".join(idx.nodes[nid].name for nid in nodes)
                details["reserved_nodes"] = names
                details["protected_since"] = since
                text += (
                    f"; protected big gang since {_utc(since)}: reserved nodes {names} "
                    f"from {_utc(reservation_start)}, which later jobs cannot push back"
                )
        return Wait(
            (Reason(ReasonCode.RESOURCES, text, details),),
            gpu_type=t,
            hint=reservation_start,
            exact=reservation_start is not None,
        )

    def preempting(self, job: PendingJob, t: str, plan: Plan, ready_at: float) -> Wait:
        details: dict[str, float | int | str] = {
            "gpu_type": t,
            "victims": len(plan.victims),
            "victim_job_ids": ",".join(str(v.job_id) for v in plan.victims),
            "ready_at": ready_at,
        }
        text = f"waiting for GPUs of {len(plan.victims)} job(s) being preempted for it"
        if not plan.victims:
            text = "waiting for GPUs of jobs already being preempted"
        reason = Reason(ReasonCode.PREEMPTING, text, details)
        return Wait((reason,), gpu_type=t, hint=ready_at, exact=True)

    def queued(
        self, job: PendingJob, t: str, blocked_by: int | None, *, borrowing: bool = False
    ) -> Wait:
        key = (
            job.org_id,
            t,
            job.site,
            job.gpus_per_node,
            blocked_by or 0,
            borrowing,
            job.needs,
        )
        untyped = job.gpu_type is None
        w = self.waits.get((key, untyped))
        if w is None:
            w = self.waits[(key, untyped)] = Wait(None, gpu_type=ANY if untyped else t, lazy=key)
            if untyped:
                self.any_type = True
        return w

    def _lazy_reason(
        self, key: tuple[int, str, str | None, int, int, bool, frozenset[str]]
    ) -> Reason:
        """Built once per (org, shape) at the end of the cycle, from shared per-shape numbers."""
        c = self.c
        oid, t, site, gpn, blocked_by, borrowing, needs = key
        shape = (t, site, gpn, needs)
        shared = self._shape.get(shape)
        if shared is None:
            if t not in self._free:
                self._free[t] = c.index.free_of_type(t)
            need = c.index.need_class(needs)
            shared = self._shape[shape] = {
                "gpu_type": t,
                "largest_free_gang_nodes": c.index.largest_gang(t, site, gpn, need),
                "free_gpus": self._free[t],
            }
            if STRICT_ISOLATION in needs:
                shared["isolation"] = "strict"
            caps = {n for n in needs if n != STRICT_ISOLATION and not n.startswith(MEMORY_NEED)}
            memory = needs.difference(caps, {STRICT_ISOLATION})
            if memory:
                shared["memory_per_gpu_bytes"] = int(min(memory).removeprefix(MEMORY_NEED))
            if caps:
                shared["capabilities"] = ",".join(sorted(caps))
        rank = self.rank()
        details = dict(shared)
        details["org_fairshare"] = round(c.factor.get(oid, 0.0), 6)
        details["org_share_rank"] = rank.get(oid, 0)
        details["orgs"] = len(rank)
        if blocked_by:
            details["behind_job_id"] = blocked_by
            text = f"strict order: behind job {blocked_by}, which cannot start yet"
            return Reason(ReasonCode.PRIORITY, text, details)
        if borrowing:
            share = self._share.get(oid)
            if share is None:
                share = self._share[oid] = round(c.books.dominant_share(oid), 6)
            details["weighted_share"] = share
            text = f"borrowing: no idle {t} GPUs left for it this cycle"
            return Reason(ReasonCode.RESOURCES, text, details)
        res_holder = c.reservations.holder.get(t)
        if res_holder is not None and c.index.hidden.get(t, 0) > 0:
            details["reserved_for_job_id"] = res_holder
            text = f"{t} GPUs it could use are reserved for job {res_holder}"
            return Reason(ReasonCode.RESERVATION, text, details)
        text = f"higher-priority jobs come first (org rank {details['org_share_rank']})"
        return Reason(ReasonCode.PRIORITY, text, details)

    def rank(self) -> dict[int, int]:
        if self._rank is None:
            f = self.c.factor
            ordered = sorted(f, key=lambda o: (-f[o], o))
            self._rank = {o: i + 1 for i, o in enumerate(ordered)}
        return self._rank

    # -- the end of the cycle ----------------------------------------------------------------

    def code(self, wait: Wait) -> ReasonCode:
        """The first reason code of a wait, without building a lazy reason's numbers."""
        if wait.reasons is not None:
            return wait.reasons[0].code
        assert wait.lazy is not None
        _oid, t, _site, _gpn, blocked_by, borrowing, _needs = wait.lazy
        if blocked_by:
            return ReasonCode.PRIORITY
        if borrowing:
            return ReasonCode.RESOURCES
        c = self.c
        if c.reservations.holder.get(t) is not None and c.index.hidden.get(t, 0) > 0:
            return ReasonCode.RESERVATION
        return ReasonCode.PRIORITY

    def codes(
        self, order: list[tuple[PendingJob, float]], waits: Mapping[int, Wait]
    ) -> dict[int, ReasonCode]:
        """The first reason code of every waiting job, in `order` (one `code` per shared wait)."""
        seen: dict[int, ReasonCode] = {}  # id() of a wait, alive in `waits` → its code
        out: dict[int, ReasonCode] = {}
        waits_get = waits.get
        for job, _ in order:
            w = waits_get(job.job_id)
            if w is None:
                continue
            c = seen.get(id(w))
            if c is None:
                c = seen[id(w)] = self.code(w)
            out[job.job_id] = c
        return out

    def explain(
        self, order: list[tuple[PendingJob, float]], waits: Mapping[int, Wait], ended: Ended
    ) -> dict[int, PendingInfo]:
        """Reasons with numbers and an estimated start for every waiting job, in `order`."""
        c = self.c
        now = c.now
        if not c.config.explain:
            return self._reasons_only(order, waits)
        events: dict[str, list[tuple[float, int]]] = {}
        org_rel = OrgReleases(c.books.children)
        chosen = ended.chosen
        grace_end = now + c.config.preemption_grace_s
        own = org_rel.own
        by_org = self.quota_waits  # org release times are read only by quota and limit waits
        for r, n in zip(ended.running, ended.running_gpus, strict=True):
            if r.job_id in chosen:
                end = grace_end
            elif r.preempting and r.preempt_deadline:
                end = r.preempt_deadline
            else:
                end = r.started_at + r.time_limit_s
            t = r.gpu_type
            e = (end, n)
            lst = events.get(t)
            if lst is None:
                events[t] = [e]
            else:
                lst.append(e)
            if by_org:
                key = (r.org_id, t)
                lst = own.get(key)
                if lst is None:
                    own[key] = [e]
                else:
                    lst.append(e)
        for _start, job, t in ended.starts:
            end = now + job.time_limit_s
            n = job.gpus_per_node * job.nodes
            events.setdefault(t, []).append((end, n))
            org_rel.add(job.org_id, t, n, end)
        profiles: dict[str, Profile] = {}

        def profile(t: str) -> Profile:
            p = profiles.get(t)
            if p is None:
                if t == ANY:
                    free = sum(c.index.free_of_type(x) for x in c.index.types)
                    free += sum(c.index.hidden.values())
                    rel = [e for lst in events.values() for e in lst]
                else:
                    free = c.index.free_of_type(t) + c.index.hidden.get(t, 0)
                    rel = events.get(t, [])
                p = profiles[t] = Profile(now, free, rel)
            return p

        work: dict[str, float] = {}
        infos: dict[int, PendingInfo] = {}
        waits_get = waits.get
        quota_at: dict[tuple[int, str, int], float | None] = {}
        # Jobs that run on any type wait behind every type's work; only then is it summed.
        any_type = self.any_type
        lazy_reason = self._lazy_reason
        info = _info
        for job, prio in order:
            jid = job.job_id
            w = waits_get(jid)
            if w is None:
                continue
            reasons = w.reasons
            if reasons is None:
                assert w.lazy is not None
                reasons = w.reasons = (lazy_reason(w.lazy),)
            wt = w.gpu_type
            if not wt:
                infos[jid] = info(jid, prio, reasons, None)
                continue
            est: float | None
            n = job.gpus_per_node * job.nodes
            done = work.get(wt, 0.0)
            if w.exact:
                est = w.hint
            else:
                prof = profiles.get(wt) or profile(wt)
                est = prof.start_for(done, n)
                if est is not None and w.hint is not None and w.hint > est:
                    est = w.hint
            job_work = n * job.time_limit_s
            work[wt] = done + job_work
            if any_type and wt != ANY:
                work[ANY] = work.get(ANY, 0.0) + job_work
            if est is not None and w.quota is not None:
                if w.quota in quota_at:
                    q = quota_at[w.quota]
                else:
                    q = quota_at[w.quota] = org_rel.when(*w.quota, now)
                est = None if q is None else (q if q > est else est)
            infos[jid] = info(jid, prio, reasons, est)
        return infos

    def _reasons_only(
        self, order: list[tuple[PendingJob, float]], waits: Mapping[int, Wait]
    ) -> dict[int, PendingInfo]:
        """`explain=False`: reasons, but no estimated starts."""
        infos: dict[int, PendingInfo] = {}
        for job, prio in order:
            w = waits.get(job.job_id)
            if w is None:
                continue
            reasons = w.reasons
            if reasons is None:
                assert w.lazy is not None
                reasons = w.reasons = (self._lazy_reason(w.lazy),)
            infos[job.job_id] = _info(job.job_id, prio, reasons, None)
        return infos


def _utc(t: float) -> str:
    """A time for a message: ISO 8601 UTC to the second (virtual seconds read as 1970 dates)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _feature_details(job: PendingJob) -> dict[str, float | int | str]:
    """The node features a job needs, as a reason's details."""
    details: dict[str, float | int | str] = {}
    if job.needs_isolation:
        details["isolation"] = "strict"
    if job.capabilities:
        details["capabilities"] = ",".join(sorted(job.capabilities))
    per_gpu = job.memory_per_gpu_bytes
    if per_gpu is not None:
        details["memory_bytes"] = job.memory_bytes or 0
        details["memory_per_gpu_bytes"] = per_gpu
    return details


def _node_needs(job: PendingJob, details: Mapping[str, float | int | str]) -> list[str]:
    """What a node must have for the job, as the words of a reason."""
    on = []
    if job.capabilities:
        on.append(f"whose agent can do {details['capabilities']}")
    if job.needs_isolation:
        on.append("with strict isolation")
    per_gpu = job.memory_per_gpu_bytes
    if per_gpu is not None:
        on.append(f"giving each GPU {_gib(per_gpu)} of memory")
    return on


def _gib(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:.1f} GiB"
