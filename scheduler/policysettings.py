"""The scheduling policy's knobs as settings: every `PolicyConfig` field, from `FAIRGPU_POLICY_*`.

The defaults are `PolicyConfig`'s own (scheduler/core/types.py), so the policy has one definition;
docs/SCHEDULING.md says why each knob is what it is. `to_policy_config()` is the one conversion:
the cycle, `/v1/shares`, `/metrics` and the API's priority-class checks all use it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.core.types import PolicyConfig

_DEFAULT = PolicyConfig()

# Settings that moved into the policy, by their old variable: a server started with one of these
# set refuses to start rather than silently ignore it.
RENAMED_ENV = {
    "FAIRGPU_PREEMPTION_GRACE_S": "FAIRGPU_POLICY_PREEMPTION_GRACE_S",
    "FAIRGPU_MIN_RUNTIME_S": "FAIRGPU_POLICY_MIN_RUNTIME_S",
    "FAIRGPU_USAGE_HALF_LIFE_S": "FAIRGPU_POLICY_HALF_LIFE_S",
    "FAIRGPU_GPU_WEIGHTS": "FAIRGPU_POLICY_GPU_WEIGHTS",
}


class PolicySettings(BaseSettings):
    """The fair-share policy: how jobs are ordered, placed, backfilled and preempted."""

    model_config = SettingsConfigDict(
        env_prefix="FAIRGPU_POLICY_", extra="ignore", hide_input_in_errors=True
    )

    half_life_s: float = Field(
        _DEFAULT.half_life_s, gt=0, description="Half-life of decayed usage for fair share."
    )
    gpu_weights: dict[str, float] = Field(
        default_factory=lambda: dict(_DEFAULT.gpu_weights),
        description='Billing weight per GPU type as JSON, e.g. {"H100": 1.0, "A100": 0.5}; '
        "a type not named weighs 1.0.",
    )
    priority_classes: dict[str, int] = Field(
        default_factory=lambda: dict(_DEFAULT.priority_classes),
        description='Priority classes and their rank as JSON, e.g. {"low": 0, "normal": 1, '
        '"high": 2}; jobs and org maxima name one of them.',
    )
    weight_fairshare: float = Field(
        _DEFAULT.weight_fairshare, ge=0, description="Priority weight of the fair-share factor."
    )
    weight_class: float = Field(
        _DEFAULT.weight_class, ge=0, description="Priority weight of the priority class."
    )
    weight_age: float = Field(
        _DEFAULT.weight_age, ge=0, description="Priority weight of time spent waiting."
    )
    weight_size: float = Field(
        _DEFAULT.weight_size, ge=0, description="Priority weight of the job's size."
    )
    age_max_s: float = Field(
        _DEFAULT.age_max_s, gt=0, description="Waiting time at which the age factor is full."
    )
    min_runtime_s: float = Field(
        _DEFAULT.min_runtime_s, ge=0, description="A job that has run less is never preempted."
    )
    preemption_grace_s: float = Field(
        _DEFAULT.preemption_grace_s,
        ge=0,
        description="Time between SIGTERM and SIGKILL when a task is stopped.",
    )
    max_preemption_grace_s: float = Field(
        _DEFAULT.max_preemption_grace_s,
        ge=0,
        le=3600,
        description="The longest grace a preempted job with --signal SIG@SECONDS gets (its "
        "SECONDS if longer than preemption_grace_s); no job's SECONDS may exceed it.",
    )
    backfill_reservations: int = Field(
        _DEFAULT.backfill_reservations,
        ge=0,
        description="Blocked jobs at the head of the queue that hold a reservation.",
    )
    protect_gang_gpus: int = Field(
        _DEFAULT.protect_gang_gpus,
        ge=0,
        description="Jobs of at least this many GPUs are protected once they have waited "
        "protect_gang_after_s: settled first, with a reservation later jobs cannot push back "
        "(0: off).",
    )
    protect_gang_after_s: float = Field(
        _DEFAULT.protect_gang_after_s,
        ge=0,
        description="How long a big gang waits before it is protected.",
    )
    pack_by_end: bool = Field(
        _DEFAULT.pack_by_end,
        description="Place a one-node job on a partly used node whose jobs end after it, so "
        "that nodes free whole for big jobs (else: the tightest node).",
    )
    consolidate: bool = Field(
        _DEFAULT.consolidate,
        description="A borrower that fits nowhere may preempt small borrowers holding no more "
        "GPUs than lie idle on a node, to gather it whole; only jobs that checkpointed during "
        "their run are moved (docs/SCHEDULING.md section 7).",
    )
    consolidate_max_lost_s: float = Field(
        _DEFAULT.consolidate_max_lost_s,
        ge=0,
        description="Most work (seconds since its last checkpoint, or its start) a job moved by "
        "consolidation may lose.",
    )
    consolidate_after_s: float = Field(
        _DEFAULT.consolidate_after_s,
        ge=0,
        description="How long a borrower waits since its submission before it may consolidate.",
    )
    backfill_depth: int = Field(
        _DEFAULT.backfill_depth, ge=1, description="Pending jobs examined per cycle."
    )
    ordering: Literal["multifactor", "fifo"] = Field(
        "multifactor", description="Queue order: multifactor priority, or arrival (fifo)."
    )
    backfill: bool = Field(_DEFAULT.backfill, description="Start smaller jobs in the gaps.")
    borrowing: bool = Field(
        _DEFAULT.borrowing, description="Orgs may use idle GPUs beyond their guarantee."
    )
    preemption: bool = Field(
        _DEFAULT.preemption, description="Borrowed GPUs are reclaimed by preemption."
    )
    explain: bool = Field(
        _DEFAULT.explain, description="Waiting jobs get an estimated start besides their reasons."
    )
    fairshare_algorithm: Literal["classic", "fairtree"] = Field(
        "classic",
        description="classic: Slurm's 2^(-U/S) along the org tree; fairtree: Slurm's Fair Tree.",
    )

    @field_validator("priority_classes")
    @classmethod
    def _some_classes(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("at least one priority class is needed")
        return value

    def to_policy_config(self) -> PolicyConfig:
        return PolicyConfig(**self.model_dump())
