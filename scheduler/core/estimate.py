"""Estimated starts from release profiles: cheap, shared per GPU type and per org.

Per GPU type the free GPUs over time form a step function (now free, plus each running job's GPUs
at its expected end, which the time limit bounds). A waiting job is estimated to start once the
GPU-seconds available since now cover the work (GPUs x time limit) of every waiting job ahead of
it of that type, and no earlier than the moment enough GPUs are free at once. That is a fluid
approximation: exact for the head job, pessimistic-but-cheap deeper in the queue (time limits
overstate work, as Slurm's estimates do).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from itertools import accumulate
from operator import itemgetter, mul, sub

_time = itemgetter(0)
_gpus = itemgetter(1)


class Profile:
    """Free GPUs of one type (or all types) from now on, and their running integral."""

    __slots__ = ("cum", "levels", "times")

    def __init__(self, now: float, free_now: int, releases: Iterable[tuple[float, int]]) -> None:
        rel = sorted(releases)
        # Releases due by now add to the first level; later ones each open a step. Equal times
        # make zero-width steps, which `start_for` answers exactly as if they were merged.
        k = bisect.bisect_right(rel, now, key=_time)
        first = free_now
        for _t, g in rel[:k]:
            first += g
        later = rel[k:]
        times: list[float] = [now, *map(_time, later)]
        levels: list[int] = list(accumulate(map(_gpus, later), initial=first))
        self.times = times
        self.levels = levels
        self.cum: list[float] = list(
            accumulate(map(mul, levels, map(sub, times[1:], times)), initial=0.0)
        )

    def start_for(self, work_gpu_s: float, gpus: int) -> float | None:
        """Earliest time with `work_gpu_s` GPU-seconds gone by and `gpus` free at once."""
        times, levels, cum = self.times, self.levels, self.cum
        j = bisect.bisect_left(levels, gpus)
        if j == len(levels):
            return None
        t_gpus = times[j]
        if work_gpu_s <= 0:
            return t_gpus
        i = bisect.bisect_left(cum, work_gpu_s)
        if i == len(cum):
            rate = levels[-1]
            if rate <= 0:
                return None
            t_work = times[-1] + (work_gpu_s - cum[-1]) / rate
        else:
            t_work = times[i - 1] + (work_gpu_s - cum[i - 1]) / levels[i - 1]
        return max(t_gpus, t_work)


class OrgReleases:
    """When an org's subtree will have handed back enough GPUs of a type (quota and limit waits).

    Ends are kept per org and gathered over a subtree only when a wait asks for it.
    """

    def __init__(self, children: Mapping[int, list[int]]) -> None:
        self._children = children
        self.own: dict[tuple[int, str], list[tuple[float, int]]] = {}  # (org, type) → (end, GPUs)
        self._cum: dict[tuple[int, str], tuple[list[float], list[int]]] = {}

    def add(self, org_id: int, gpu_type: str, gpus: int, end: float) -> None:
        lst = self.own.get((org_id, gpu_type))
        if lst is None:
            lst = self.own[(org_id, gpu_type)] = []
        lst.append((end, gpus))

    def _subtree(self, org_id: int, gpu_type: str) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        stack = [org_id]
        seen: set[int] = set()
        while stack:
            o = stack.pop()
            if o in seen:
                continue
            seen.add(o)
            out.extend(self.own.get((o, gpu_type), ()))
            stack.extend(self._children.get(o, ()))
        return out

    def when(self, org_id: int, gpu_type: str, gpus_needed: int, now: float) -> float | None:
        if gpus_needed <= 0:
            return now
        key = (org_id, gpu_type)
        cached = self._cum.get(key)
        if cached is None:
            ends = sorted(self._subtree(org_id, gpu_type))
            times: list[float] = []
            cums: list[int] = []
            total = 0
            for t, g in ends:
                total += g
                times.append(t)
                cums.append(total)
            cached = self._cum[key] = (times, cums)
        times, cums = cached
        i = bisect.bisect_left(cums, gpus_needed)
        if i == len(cums):
            return None
        return max(now, times[i])
