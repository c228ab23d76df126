"""Simulation settings and the three policies it compares, as variants of one PolicyConfig."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum

from scheduler.core.types import DAY_S, PolicyConfig

HOUR_S = 3_600.0


class TimeLimitModel(StrEnum):
    """What a user would have asked for as the walltime of a job that ran `duration_s`."""

    EXACT = "exact"  # the duration itself: a perfect estimate
    FACTOR = "factor"  # duration x factor (below 1 makes jobs end as TIMEOUT)
    HOUR = "hour"  # rounded up to a whole hour, as people type limits


POLICIES: dict[str, PolicyConfig] = {
    # The default policy: multifactor fair share, backfill, borrowing with reclaim.
    "fairgpu": PolicyConfig(),
    # Strict submit order, no backfill, no borrowing (guarantees act as limits); best fit.
    "fifo": PolicyConfig(
        ordering="fifo", backfill=False, borrowing=False, preemption=False, pack_by_end=False
    ),
    # Slurm's multifactor plugin plus EASY backfill; hard guarantees as limits, no borrowing;
    # best fit, as Slurm's node selection.
    "slurm-like": PolicyConfig(
        ordering="multifactor",
        backfill=True,
        borrowing=False,
        preemption=False,
        pack_by_end=False,
    ),
}
POLICY_NAMES = tuple(POLICIES)


def policy_config(name: str, *, half_life_s: float | None = None) -> PolicyConfig:
    try:
        config = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    if half_life_s is not None:
        config = dataclasses.replace(config, half_life_s=half_life_s)
    return config


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How jobs and cycles behave in virtual time; defaults are what `fairgpu simulate` uses."""

    time_limit_model: TimeLimitModel = TimeLimitModel.HOUR
    time_limit_factor: float = 1.5
    checkpoint_interval_s: float = 1_800.0
    # A cycle runs only when something changed, and at most once per interval (start to
    # start). The server cycles on every event, no closer than four times its last cycle's
    # duration: about 1 s at Philly's size (docs/SIMULATION.md, "Cycle timing").
    cycle_interval_s: float = 1.0
    # While jobs wait, a cycle also runs at least this often so that ageing, decayed usage and
    # the end of preemption-protected runtime are noticed without any event.
    idle_cycle_interval_s: float = 600.0
    # Skip a cycle when the core provably could neither start nor preempt anything (see
    # Simulator._worth_cycling); False runs one after every change.
    gate_cycles: bool = True
    preemptible: bool = True  # trace jobs may borrow (and so be reclaimed)
    half_life_s: float = 7 * DAY_S
    bucket_s: float = 300.0  # resolution of the recorded timelines
    gpus_per_node: int = 8  # for gang shapes when the cluster mixes node sizes

    def time_limit_s(self, duration_s: float) -> float:
        if self.time_limit_model is TimeLimitModel.EXACT:
            return max(duration_s, 1.0)
        if self.time_limit_model is TimeLimitModel.FACTOR:
            return max(duration_s * self.time_limit_factor, 1.0)
        return max(math.ceil(duration_s / HOUR_S), 1) * HOUR_S
