"""The scheduling core's contract: frozen snapshot types in, decision types out.

Times are float seconds (UTC epoch on a real cluster, virtual seconds in the simulator) so that
the same code runs in both. Ids are ints: database ids on a server, generated ids in the
simulator. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

DAY_S = 86_400.0

JOB_CAPABILITIES: frozenset[str] = frozenset(
    {"signal", "pty", "netns", "container", "container-netns", "image-cmd"}
)
"""Agent capabilities a job may need (protocol.agent.AGENT_CAPABILITIES names them): "signal" for
a job with `--signal`, "pty" for an interactive one, "netns" for one with `--network private`,
"container" for one with an image, "container-netns" too for a private job with an image, and
"image-cmd" too for one whose image runs its own ENTRYPOINT and CMD (no command).
Others an agent reports play no part here."""
STRICT_ISOLATION = "isolation=strict"
"""The node feature of strict isolation, placed like a capability; "=" is outside the protocol's
capability names, so no agent can claim it by reporting a capability."""
MEMORY_NEED = "memory-per-gpu>="
"""Prefix of the node feature "holds N bytes of memory per GPU": a job with `--mem` needs
`memory_need(ceil(mem / GPUs per node))`. A node's share is not a feature of its own (which
shares exist depends on the cluster): the capacity index gives each node the tiers of the
cluster's distinct shares it reaches (scheduler/core/capacity.py)."""


def memory_need(per_gpu_bytes: int) -> str:
    return f"{MEMORY_NEED}{per_gpu_bytes}"


class DependencyState(StrEnum):
    """Where a job's `afterok` dependencies stand."""

    NONE = "none"
    SATISFIED = "satisfied"
    WAITING = "waiting"
    NEVER = "never"  # a dependency ended other than COMPLETED: the job can never start


class ReasonCode(StrEnum):
    """Why a job waits, in Slurm's vocabulary where Slurm has a word for it."""

    PRIORITY = "Priority"  # jobs ahead of it take the resources it would fit in
    RESOURCES = "Resources"  # it is at the head, but no placement fits now
    RESERVATION = "Reservation"  # GPUs it could use are reserved for a higher job
    QUOTA_GUARANTEED = "QuotaGuaranteed"  # beyond its org's guarantee and not preemptible
    ORG_LIMIT = "OrgLimit"  # starting it would exceed the org's (or an ancestor's) limit
    DEPENDENCY = "Dependency"
    DEPENDENCY_NEVER_SATISFIED = "DependencyNeverSatisfied"
    JOB_HELD_USER = "JobHeldUser"
    JOB_ARRAY_TASK_LIMIT = "JobArrayTaskLimit"  # its array's `%N` elements are active already
    BEGIN_TIME = "BeginTime"  # requeued: it may not start before its `not_before`
    BAD_CONSTRAINTS = "BadConstraints"  # no node in the cluster could ever run it
    PREEMPTING = "Preempting"  # waiting for GPUs held by jobs being preempted for it


class PreemptionReason(StrEnum):
    RECLAIM = "reclaim"  # an org takes its guarantee back from a borrower
    PRIORITY = "priority"  # a higher priority class inside the same org
    CONSOLIDATE = "consolidate"  # a few small borrowers make a mostly idle node whole


@dataclass(frozen=True, slots=True)
class Node:
    """A schedulable GPU server. Nodes are homogeneous in GPU type, as in practice."""

    id: int
    name: str
    site: str
    domain: str  # topology domain (NVLink / rack / switch) inside the site
    gpu_type: str
    gpus: tuple[int, ...]  # every GPU index on the node
    unhealthy_gpus: frozenset[int] = frozenset()
    schedulable: bool = True  # False when draining, drained, down or unhealthy
    strict_isolation: bool = False  # its agent confines each task (own uid, cgroup, mounts)
    capabilities: frozenset[str] = JOB_CAPABILITIES  # what its agent said it can do
    # Each GPU's share of the memory its tasks may hold together (its agent's report); a task
    # asking more than its GPUs' share is refused at start. None: not reported, fits any job.
    memory_per_gpu_bytes: int | None = None

    @property
    def features(self) -> frozenset[str]:
        """What a job may need of this node: its agent's capabilities, and strict isolation."""
        caps = self.capabilities & JOB_CAPABILITIES
        return caps | {STRICT_ISOLATION} if self.strict_isolation else caps


@dataclass(frozen=True, slots=True)
class Placement:
    """GPUs of one node given to one task of a job."""

    node_id: int
    gpus: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Org:
    """A node of the organisation tree.

    `usage` is this org's own decayed, billing-weighted GPU-seconds (children not included: the
    core sums along the tree). `guaranteed` and `limit` are per GPU type; a type missing from
    `limit` means no limit beyond the cluster, a type missing from `guaranteed` means 0.
    """

    id: int
    name: str
    parent_id: int | None = None
    shares: float = 1.0
    guaranteed: Mapping[str, int] = field(default_factory=dict)
    limit: Mapping[str, int] = field(default_factory=dict)
    usage: float = 0.0


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job holding GPUs now (STARTING or RUNNING, or being preempted)."""

    job_id: int
    org_id: int
    user_id: int
    gpu_type: str
    placements: tuple[Placement, ...]
    started_at: float
    time_limit_s: float
    priority_class: str = "normal"
    preemptible: bool = False
    preempting: bool = False  # a preemption was already sent; its GPUs free by `preempt_deadline`
    preempt_deadline: float | None = None
    # It checkpoints this often from its start (the simulator's model); None: no checkpoint is
    # known, so a preemption would lose everything since its start. Victims lose the least.
    checkpoint_interval_s: float | None = None

    @property
    def gpu_count(self) -> int:
        return sum(len(p.gpus) for p in self.placements)

    @property
    def expected_end(self) -> float:
        return self.started_at + self.time_limit_s


@dataclass(frozen=True, slots=True)
class PendingJob:
    job_id: int
    org_id: int
    user_id: int
    gpus_per_node: int
    nodes: int
    time_limit_s: float
    submitted_at: float
    gpu_type: str | None = None  # None: any type
    site: str | None = None  # None: any site
    priority_class: str = "normal"
    preemptible: bool = False
    held: bool = False
    dependency: DependencyState = DependencyState.NONE
    needs_isolation: bool = False  # its org (or one above) runs only on strict-isolation nodes
    capabilities: frozenset[str] = frozenset()  # agent capabilities it needs (JOB_CAPABILITIES)
    not_before: float | None = None
    """It may not start before this time (a requeued job's backoff); None: at once."""
    array_throttled: bool = False
    """An array element beyond the room its array's `%N` limit leaves (the load counts it)."""
    memory_bytes: int | None = None
    """Memory per node (`--mem`); None: whatever the node gives its GPUs, which always fits."""

    @property
    def gpu_count(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def memory_per_gpu_bytes(self) -> int | None:
        """What each of its GPUs' nodes must give a GPU for its `--mem` to fit, rounded up."""
        if self.memory_bytes is None:
            return None
        return -(-self.memory_bytes // max(self.gpus_per_node, 1))

    @property
    def needs(self) -> frozenset[str]:
        """Node features it may only run on (`Node.features`): capabilities, isolation, and
        its memory per GPU (`memory_need`)."""
        needs = self.capabilities
        if self.needs_isolation:
            needs = needs | {STRICT_ISOLATION}
        per_gpu = self.memory_per_gpu_bytes
        return needs if per_gpu is None else needs | {memory_need(per_gpu)}


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Every tunable of the policy, with its default; docs/SCHEDULING.md says why each."""

    half_life_s: float = 7 * DAY_S
    gpu_weights: Mapping[str, float] = field(default_factory=dict)  # missing type: 1.0
    priority_classes: Mapping[str, int] = field(
        default_factory=lambda: {"low": 0, "normal": 1, "high": 2}
    )
    weight_fairshare: float = 10_000.0
    weight_class: float = 5_000.0
    weight_age: float = 1_000.0
    weight_size: float = 500.0
    age_max_s: float = 7 * DAY_S
    min_runtime_s: float = 600.0
    preemption_grace_s: float = 30.0
    # A job with `--signal SIG@SECONDS` is given max(preemption_grace_s, SECONDS) capped by this.
    max_preemption_grace_s: float = 600.0
    backfill_reservations: int = 8  # blocked jobs at the head that hold a reservation
    backfill_depth: int = 50_000  # pending jobs examined per cycle
    # Big gangs are protected once they have waited: a job of at least `protect_gang_gpus`
    # GPUs pending for `protect_gang_after_s` is settled before the rest of the queue (started,
    # reclaiming, or holding a reservation that later jobs cannot push back), one per org, in
    # submit order; 0 GPUs turns it off. docs/SCHEDULING.md section 6 gives the bound.
    protect_gang_gpus: int = 33
    protect_gang_after_s: float = 6 * 3_600.0
    # A one-node job goes on a partly used node whose running jobs end after it (the tightest
    # such node), so that a node's jobs end together and the node frees whole for 8-GPU jobs
    # and gangs; False: the tightest node (best fit) whatever its jobs' ends.
    pack_by_end: bool = True
    # A borrowing job that fits nowhere may preempt borrowers (its own org's, or of orgs whose
    # weighted share stays at least its own) on a node where they hold no more GPUs than lie
    # idle there, each losing at most `consolidate_max_lost_s` of work: the scattered free GPUs
    # come together for it, and the victims restart on the free GPUs left elsewhere. The org
    # whose pending work waits longest gives no job to another org's. Off: on the #19 window
    # it costs no JCT, but on the whole Philly trace (x12) it cost mean JCT 9.6 % and the
    # 1-GPU jobs' wait p99 42 % (docs/SIMULATION.md, "Consolidation's default").
    consolidate: bool = False
    consolidate_max_lost_s: float = 900.0
    # ... and only once it has waited this long since its submission: a node often frees whole
    # by itself within the hour, and moving small jobs for a job that would soon have started
    # anyway costs them more than it gains (docs/SIMULATION.md, "Consolidation after an hour").
    consolidate_after_s: float = 3_600.0
    # Switches that turn the fairgpu policy into the baselines the simulator compares with:
    # `fifo` = ordering "fifo", no backfill, no borrowing, no preemption;
    # `slurm-like` = ordering "multifactor", backfill, no borrowing (guarantees act as limits).
    ordering: str = "multifactor"  # "multifactor" | "fifo"
    backfill: bool = True
    borrowing: bool = True
    preemption: bool = True
    # False: waiting jobs get their reasons but no estimated start (the simulator's fast path).
    explain: bool = True
    # "classic": Slurm's 2^(-U/S) along the tree; "fairtree": Slurm's Fair Tree ranks.
    fairshare_algorithm: str = "classic"


@dataclass(frozen=True, slots=True)
class RunningChanges:
    """How a snapshot's running jobs differ from an earlier snapshot's (`base`, the same tuple
    object): the jobs that started or changed (a preemption sent: the new object), and the ids
    of those that are gone. A caller that knows them (the simulator) lets a kept `Scheduler`
    correct what it knows of the running jobs instead of reading them all again."""

    base: tuple[RunningJob, ...]
    put: tuple[RunningJob, ...] = ()
    gone: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    nodes: tuple[Node, ...]
    orgs: tuple[Org, ...]
    running: tuple[RunningJob, ...] = ()
    pending: tuple[PendingJob, ...] = ()
    config: PolicyConfig = field(default_factory=PolicyConfig)
    # What changed in `running` since an earlier snapshot, if the caller knows: read only by a
    # kept `Scheduler` whose last cycle was that snapshot's; not part of what the snapshot is.
    running_changes: RunningChanges | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Start:
    job_id: int
    placements: tuple[Placement, ...]  # one per task, node rank = position
    borrowed: bool = False  # beyond the org's guarantee: may be reclaimed


@dataclass(frozen=True, slots=True)
class Preemption:
    job_id: int
    reason: PreemptionReason
    preemptor_job_id: int
    deadline: float  # SIGKILL after this (now + grace)


@dataclass(frozen=True, slots=True)
class Reason:
    """One machine-readable reason a job waits, with the numbers behind it."""

    code: ReasonCode
    message: str
    details: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PendingInfo:
    job_id: int
    priority: float
    reasons: tuple[Reason, ...]
    estimated_start: float | None  # None: cannot be estimated (held, dependency, never fits)


@dataclass(frozen=True, slots=True)
class OrgStanding:
    """An org's fair-share position this cycle, for `shares` and the metrics."""

    org_id: int
    fairshare_factor: float
    shares_norm: float
    usage_norm: float
    allocated: Mapping[str, int]  # GPUs held now, per GPU type (this org and its subtree)
    borrowed: Mapping[str, int]  # of those, beyond the guarantee


@dataclass(frozen=True, slots=True)
class Decisions:
    """What one cycle decided.

    `pending` holds every waiting job's full explanation (reasons with numbers, estimated start)
    in priority order; the core builds it the first time it is read, so a caller that only acts
    on the decisions (the simulator) never pays for it. `reasons` (the first reason code of each
    waiting job, in priority order) and `blocked_by` are computed by the cycle itself and cheap.
    """

    starts: tuple[Start, ...] = ()
    preemptions: tuple[Preemption, ...] = ()
    pending: Mapping[int, PendingInfo] = field(default_factory=dict)
    standings: Mapping[int, OrgStanding] = field(default_factory=dict)
    reasons: Mapping[int, ReasonCode] = field(default_factory=dict)
    blocked_by: int | None = None  # strict order (no backfill): the job every other waits behind
    # Node → the waiting job holding a reservation on it (EASY backfill, protected gangs): its
    # free GPUs are held for that job while the rest of the node or the gang's nodes free up.
    reserved: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UsageInterval:
    """GPUs an org held from `start` to `end` (a finished allocation, or a running one up to now).

    `decay_usage` folds these into an org's decayed usage; only the part after the previous fold
    counts, so callers may pass a running allocation again every cycle.
    """

    org_id: int
    gpu_type: str
    gpus: int
    start: float
    end: float
