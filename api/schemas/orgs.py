"""Organisation, quota and fair-share schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BeforeValidator, Field, model_validator

from api.schemas.common import (
    DurationS,
    InputModel,
    OrgName,
    OutputModel,
    Printable,
    parse_duration_s,
)
from api.schemas.jobs import PriorityClass
from protocol.limits import MAX_TIME_LIMIT_S

MAX_SHARES = 1_000_000.0
MAX_QUOTA_GPUS = 1_000_000
MAX_IMAGE_PATTERNS = 64
MAX_PENDING_JOBS = 10_000_000

# An image reference never holds whitespace: a pattern with some could never match.
ImagePattern = Annotated[str, Printable, Field(min_length=1, max_length=512, pattern=r"^\S+$")]

Shares = Annotated[float, Field(gt=0, le=MAX_SHARES, allow_inf_nan=False)]
TimeLimit = Annotated[DurationS, Field(le=MAX_TIME_LIMIT_S)]  # an INTEGER column
IdleTimeoutS = Annotated[
    int,
    BeforeValidator(parse_duration_s),
    Field(ge=0, le=MAX_TIME_LIMIT_S, description="Seconds or a duration such as '30m'; 0: never."),
]
GpuCount = Annotated[int, Field(ge=0, le=MAX_QUOTA_GPUS)]


class OrgCreate(InputModel):
    name: OrgName
    parent: OrgName | None = None
    """Name of the parent organisation (a programme pooling its members); none for a root."""
    shares: Shares = 1.0
    default_time_limit: TimeLimit | None = None
    tenant: bool = True
    """True (the default): a tenant of its own, a company: the orgs above it (a programme)
    see it only in aggregates: usage by org and GPU type, standing, counts, never its users'
    names. False: a group of its parent's tenant, whose members and admins see it in full."""


class OrgUpdate(InputModel):
    shares: Shares | None = None
    default_time_limit: TimeLimit | None = None
    tenant: bool | None = None
    """True: a tenant of its own; false: a group of its parent's tenant (see OrgCreate's)."""
    require_isolation: bool | None = None
    """True: the org's jobs, and those of every org below it, run only on nodes whose agent
    confines tasks (strict isolation)."""
    require_private_network: bool | None = None
    """True: every one-node job of the org, and of every org below it, runs in a network of
    its own (`private`, only on nodes that can make one) and `network: host` for one is refused
    (422); multi-node jobs still run in their nodes' network."""
    image_patterns: Annotated[list[ImagePattern], Field(max_length=MAX_IMAGE_PATTERNS)] | None = (
        None
    )
    """Shell-style patterns (fnmatch: `*`, `?`, `[...]`) a submitted job's image must match,
    e.g. `registry.example/acme/*`; an empty list allows any image. The orgs below it are bound
    too (an image must pass every list from the job's org up). Checked at submission: narrowing
    the list stops no job already accepted."""
    max_priority_class: PriorityClass | None = None
    """The highest priority class its members may submit at; null: the server's default
    (`default_max_priority_class`, normal unless configured)."""
    max_pending_jobs: Annotated[int, Field(ge=0, le=MAX_PENDING_JOBS)] | None = None
    """The most pending jobs it may have at once; null: the server's `max_pending_jobs_per_org`."""
    interactive_max_time: DurationS | None = None
    """The longest time limit of its interactive jobs (`fairgpu run --pty`, `--jupyter`), and of
    those of the orgs below it that set none; null: its parent's, or the server's
    `interactive_max_time_s`."""
    interactive_idle_timeout: IdleTimeoutS | None = None
    """How long its interactive jobs may go without input from their clients and without use
    of their GPUs before they end (0: never), for the orgs below it that set none too; null:
    its parent's, or the server's `interactive_idle_timeout_s`."""


class QuotaSet(InputModel):
    guaranteed: GpuCount
    """GPUs of this type the org gets back within the grace period when it asks for them."""
    limit: GpuCount | None = None
    """The most GPUs of this type it may hold, borrowing included; null: no limit."""

    @model_validator(mode="after")
    def _limit_covers_guarantee(self) -> QuotaSet:
        if self.limit is not None and self.limit < self.guaranteed:
            raise ValueError("limit must be at least guaranteed")
        return self


class QuotaPublic(OutputModel):
    gpu_type: str
    guaranteed: int
    limit: int | None


class OrgPublic(OutputModel):
    """An org of the caller's view. Past the caller's tenant wall (an org of another company
    below the caller's programme: `settings_hidden`), its name, place in the tree, shares,
    quotas and `tenant` only: the fields from `default_time_limit_s` to
    `interactive_idle_timeout_s` are null there, a company's configuration being its own
    (docs/OPERATIONS.md, Tenant walls). Platform admins and the company's people see all."""

    id: int
    name: str
    parent_id: int | None
    path: str
    """Names from the root down, joined by '/'."""
    depth: int
    shares: float
    default_time_limit_s: int | None = None
    """Its jobs' default time limit; null: the server's (or hidden: `settings_hidden`)."""
    require_isolation: bool | None = None
    """Whether its jobs run only on nodes with strict isolation (set here or on an ancestor:
    see `isolation_required`)."""
    isolation_required: bool | None = None
    """Whether its jobs need strict isolation: set on it or on an org above it."""
    require_private_network: bool | None = None
    """Whether its one-node jobs must run in a network of their own (set here or on an
    ancestor: see `private_network_required`)."""
    private_network_required: bool | None = None
    """Whether its one-node jobs run in a network of their own: set on it or on an org above."""
    image_patterns: list[str] | None = None
    """Images its jobs may use (fnmatch patterns); empty: any."""
    max_priority_class: str | None = None
    """The highest priority class its members may submit at (its own or the server's)."""
    max_pending_jobs: int | None = None
    """The most pending jobs it may have at once (its own or the server's)."""
    interactive_max_time_s: int | None = None
    """The longest time limit of its interactive jobs: its own, an org above it's, or the
    server's."""
    interactive_idle_timeout_s: int | None = None
    """Idle time that ends its interactive jobs (its own, an org above it's, or the server's);
    0: never."""
    settings_hidden: bool = False
    """True past the caller's tenant wall: the settings above are null (not shown), and only
    name, parent, shares, quotas and `tenant` are the org's."""
    tenant: bool = True
    """A tenant of its own (a company), which the orgs above it see only in aggregates; false:
    a group of its parent's tenant."""
    created_at: datetime
    quotas: list[QuotaPublic] = Field(default_factory=list)


class OrgsPublic(OutputModel):
    data: list[OrgPublic]
    count: int


class SharePublic(OutputModel):
    org_id: int
    org: str
    parent_id: int | None
    shares: float
    shares_norm: float
    """Shares ÷ siblings' shares, multiplied down the tree: the fraction of the cluster owed."""
    decayed_usage_gpu_s: float
    """Billing-weighted GPU-seconds, decayed with the configured half-life, as of now."""
    usage_norm: float
    fairshare_factor: float
    """The configured algorithm's factor: classic, 2^(-usage_norm/shares_norm) (1 unused, 0.5 at
    its share); fairtree, Slurm's Fair Tree rank (1 for the org furthest below its share)."""
    recovers_at: datetime | None
    """When the classic factor climbs back to 0.5 if the org uses nothing more; null if it is
    there already, never can, or the algorithm is fairtree (a rank moves with other orgs too)."""
    recover_s: float | None


class SharesPublic(OutputModel):
    data: list[SharePublic]
    half_life_s: float
    as_of: datetime
