"""What a cycle reads from the running jobs: built in one pass, or kept and corrected by delta.

The free index needs the GPUs held per node, packing by end each node's drain time, the books
the GPUs booked and leaving per (org, GPU type), the preemptor the jobs already leaving and the
victim candidates (preemptible jobs past the minimum runtime) per (org, GPU type). None of them
depends on the order of the running jobs: the index treats a node's GPUs as a set, drains are
maxima, the books sums (the standings list their GPU types sorted), and the preemptor orders
candidates by start time and job id. That is what lets a `Scheduler` keep them across cycles and
correct them with the jobs that started, ended or changed (`RunningChanges`), so that a cycle's
set-up costs what changed rather than what runs.
"""

from __future__ import annotations

import heapq

from scheduler.core.types import RunningChanges, RunningJob

Key = tuple[int, str]  # (org id, GPU type)


class RunningTables:
    """Per node and per (org, GPU type) aggregates of the running jobs at `now`."""

    def __init__(self, running: tuple[RunningJob, ...], now: float, min_runtime_s: float) -> None:
        self.running = running  # the tuple these tables describe
        self.now = now
        self.min_runtime_s = min_runtime_s
        held: dict[int, tuple[int, ...]] = {}  # node → GPUs running jobs hold (a few each)
        # node → when its last running job ends (time limit or preemption deadline), which
        # `pack_by_end` asks of every partly used node: spares building every release profile.
        drains: dict[int, float] = {}
        booked: dict[Key, int] = {}
        leaving: dict[Key, int] = {}
        preempting: dict[int, RunningJob] = {}
        # Preemptible jobs past the minimum runtime, with their GPUs, grouped per (org, type):
        # the victim candidates, scanned per type only when asked about.
        aged: dict[Key, list[tuple[RunningJob, int]]] = {}
        # Candidates per priority class name: which classes any victim could have.
        aged_classes: dict[str, int] = {}
        oldest = now - min_runtime_s
        for r in running:
            n = 0
            # `expected_end` inlined: a property call per running job is a tenth of this pass.
            if r.preempting and r.preempt_deadline:
                end = r.preempt_deadline
            else:
                end = r.started_at + r.time_limit_s
            for p in r.placements:
                g = p.gpus
                nid = p.node_id
                had = held.get(nid)
                if had is None:
                    held[nid] = g
                    drains[nid] = end
                else:
                    held[nid] = had + g
                    if end > drains[nid]:
                        drains[nid] = end
                n += len(g)
            key = (r.org_id, r.gpu_type)
            booked[key] = booked.get(key, 0) + n
            if r.preempting:
                leaving[key] = leaving.get(key, 0) + n
                preempting[r.job_id] = r
            elif r.preemptible and r.started_at <= oldest:
                group = aged.get(key)
                if group is None:
                    aged[key] = [(r, n)]
                else:
                    group.append((r, n))
                aged_classes[r.priority_class] = aged_classes.get(r.priority_class, 0) + 1
        self.held = held
        self.drains = drains
        self.booked = booked
        self.leaving = leaving
        self.preempting = preempting
        self.aged = aged
        self.aged_classes = aged_classes
        # What correcting by delta needs, made at the first correction (a cycle that keeps
        # nothing never pays for it): job id → (job, GPUs, end); node → job id → (GPUs, end);
        # candidate job id → its group; preemptible jobs not yet past the minimum runtime.
        self._jobs: dict[int, tuple[RunningJob, int, float]] | None = None
        self._on_node: dict[int, dict[int, tuple[tuple[int, ...], float]]] = {}
        self._aged_in: dict[int, Key] = {}
        self._young: list[tuple[float, int]] = []  # (started_at, job id), a lazy min-heap
        self.touched: set[int] = set()  # nodes whose jobs the last correction changed

    def advance(self, running: tuple[RunningJob, ...], changes: RunningChanges, now: float) -> bool:
        """Describe `running` at `now`, given what changed since the tuple these tables describe.

        False when the changes do not follow these tables (another base, time gone backwards,
        a job that is not there): the caller builds new tables, and must drop these, which are
        then partly corrected.
        """
        if changes.base is not self.running or now < self.now:
            return False
        if self._jobs is None:
            self._index()
        jobs = self._jobs
        assert jobs is not None
        touched: set[int] = set()
        for job_id in changes.gone:
            if job_id not in jobs:
                return False
            self._remove(job_id, touched)
        for r in changes.put:
            if r.job_id in jobs:
                self._remove(r.job_id, touched)
            self._add(r, now, touched)
        if len(jobs) != len(running):
            return False
        self._refresh(touched)
        self._age(now)
        self.touched = touched
        self.running = running
        self.now = now
        return True

    def _index(self) -> None:
        jobs: dict[int, tuple[RunningJob, int, float]] = {}
        on_node = self._on_node
        oldest = self.now - self.min_runtime_s
        for r in self.running:
            end = self._end(r)
            n = 0
            for p in r.placements:
                node = on_node.setdefault(p.node_id, {})
                had = node.get(r.job_id)
                node[r.job_id] = (p.gpus if had is None else had[0] + p.gpus, end)
                n += len(p.gpus)
            jobs[r.job_id] = (r, n, end)
            if not r.preempting and r.preemptible:
                if r.started_at <= oldest:
                    self._aged_in[r.job_id] = (r.org_id, r.gpu_type)
                else:
                    self._young.append((r.started_at, r.job_id))
        heapq.heapify(self._young)
        self._jobs = jobs

    @staticmethod
    def _end(r: RunningJob) -> float:
        return r.preempt_deadline if r.preempting and r.preempt_deadline else r.expected_end

    def _add(self, r: RunningJob, now: float, touched: set[int]) -> None:
        assert self._jobs is not None
        end = self._end(r)
        n = 0
        for p in r.placements:
            node = self._on_node.setdefault(p.node_id, {})
            had = node.get(r.job_id)
            node[r.job_id] = (p.gpus if had is None else had[0] + p.gpus, end)
            n += len(p.gpus)
            touched.add(p.node_id)
        self._jobs[r.job_id] = (r, n, end)
        key = (r.org_id, r.gpu_type)
        self.booked[key] = self.booked.get(key, 0) + n
        if r.preempting:
            self.leaving[key] = self.leaving.get(key, 0) + n
            self.preempting[r.job_id] = r
        elif r.preemptible:
            if r.started_at <= now - self.min_runtime_s:
                self._candidate(r, n)
            else:
                heapq.heappush(self._young, (r.started_at, r.job_id))

    def _candidate(self, r: RunningJob, n: int) -> None:
        key = (r.org_id, r.gpu_type)
        self._aged_in[r.job_id] = key
        group = self.aged.get(key)
        if group is None:
            self.aged[key] = [(r, n)]
        else:
            group.append((r, n))
        classes = self.aged_classes
        classes[r.priority_class] = classes.get(r.priority_class, 0) + 1

    def _remove(self, job_id: int, touched: set[int]) -> None:
        assert self._jobs is not None
        r, n, _end = self._jobs.pop(job_id)
        for p in r.placements:
            node = self._on_node[p.node_id]
            node.pop(job_id, None)
            touched.add(p.node_id)
        key = (r.org_id, r.gpu_type)
        _drop(self.booked, key, n)
        if r.preempting:
            _drop(self.leaving, key, n)
            del self.preempting[job_id]
        group_key = self._aged_in.pop(job_id, None)
        if group_key is not None:
            group = self.aged[group_key]
            for i, (candidate, _n) in enumerate(group):
                if candidate.job_id == job_id:
                    del group[i]
                    break
            if not group:
                del self.aged[group_key]
            left = self.aged_classes[r.priority_class] - 1
            if left:
                self.aged_classes[r.priority_class] = left
            else:
                del self.aged_classes[r.priority_class]

    def _refresh(self, touched: set[int]) -> None:
        """Held GPUs and drain time of each node whose jobs changed."""
        for nid in touched:
            node = self._on_node.get(nid)
            if not node:
                self._on_node.pop(nid, None)
                self.held.pop(nid, None)
                self.drains.pop(nid, None)
                continue
            gpus: tuple[int, ...] = ()
            drain = float("-inf")
            for g, end in node.values():
                gpus += g
                if end > drain:
                    drain = end
            self.held[nid] = gpus
            self.drains[nid] = drain

    def _age(self, now: float) -> None:
        """Preemptible jobs that passed the minimum runtime become victim candidates."""
        assert self._jobs is not None
        young, jobs, oldest = self._young, self._jobs, now - self.min_runtime_s
        while young and young[0][0] <= oldest:
            started_at, job_id = heapq.heappop(young)
            got = jobs.get(job_id)
            if got is None or job_id in self._aged_in:
                continue  # ended, or an entry of a job replaced since
            r, n, _end = got
            if r.started_at == started_at and r.preemptible and not r.preempting:
                self._candidate(r, n)


def _drop(book: dict[Key, int], key: Key, n: int) -> None:
    left = book[key] - n
    if left:
        book[key] = left
    else:
        del book[key]


def gpu_counts(running: tuple[RunningJob, ...]) -> list[int]:
    """GPUs of each running job, in the same order (what the estimates of waiting jobs read)."""
    return [sum(len(p.gpus) for p in r.placements) for r in running]


__all__ = ["Key", "RunningTables", "gpu_counts"]
