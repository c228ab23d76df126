"""The agent protocol: what a node agent and the server say to each other over HTTP.

Agents *pull*: they sit behind NAT and firewalls in other data centres, so they only ever make
outbound requests, and the server answers each heartbeat with the work for that node.

    POST /v1/agent/register   Authorization: Bearer <join token>   AgentRegister -> AgentRegistered
    POST /v1/agent/heartbeat  Authorization: Bearer <node credential>  Heartbeat -> HeartbeatReply

Contract (both sides rely on it):

- A join token only creates new nodes. Registering an existing (site, name) needs the node's
  current credential as the bearer (it returns the same `node_id` and a *new* credential; the
  old one is revoked), or a platform admin's `fairgpu node approve NAME`, after which one join
  token registration of that name takes the node over. A join token alone for an existing name
  is 409. A bad join token or credential is 401.
- Node credentials expire (`node_credential_ttl_s`); a heartbeat reply carries a renewed one
  in `credential` when less than half the lifetime is left. A revoked node's credential is 401
  at once, held long-polls included.
- A heartbeat with an unknown or revoked credential is 401; the agent then stops heartbeating and
  says so (it re-registers only if it still has a join token).
- Every heartbeat reports every task the agent knows that is not yet acknowledged as ended: live
  tasks with their current state, ended ones with their final state. A 2xx reply acknowledges
  every report and log chunk in the request; the agent drops them then, not before. So the server
  must apply reports idempotently (the same final report may arrive twice if a reply is lost).
- The server puts a task in `start` on every reply until the agent has reported it in any state;
  the agent ignores a `start` for a task id it already knows (a task never starts twice). The
  server puts a task in `stop` on every reply until the agent reports it ended; stopping is
  idempotent on the agent too. The agent ignores a stop for a task it does not know and never
  starts a task that is in `stop` of the same reply, so the server may end a task the agent has
  never reported on its own; if such a task is later reported live, the server answers with a
  stop for it.
- `wait_s` makes a heartbeat a long-poll: when the request carries nothing urgent (no task state
  changed) the server may hold it up to `wait_s` seconds and answer as soon as it has a task to
  start or stop for this node. This is what makes a job start quickly on an idle cluster.
- Task states map to job states on the server: `exited` with exit code 0 -> COMPLETED, `exited`
  otherwise -> FAILED, `timeout` -> TIMEOUT, `stopped` -> whatever the server asked the stop for
  (CANCELLED, PREEMPTED), `failed_to_start` -> FAILED, `lost` -> NODE_FAIL.

Ids are the server's database ids (ints). Sizes are bytes, durations seconds, times timezone-aware.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from protocol.limits import (
    MAX_GPUS_PER_NODE as MAX_GPUS_PER_NODE,
)
from protocol.limits import (
    MAX_TIME_LIMIT_S,
    Image,
    ImageCommand,
    TaskEnvironment,
    Workdir,
)
from protocol.states import GpuHealth, TaskState

Capability = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9.-]*$")]
"""Something an agent can do beyond what every agent of the protocol does; the server gives a
node only the work its agent can carry out (and stores names it does not know yet, for a
server upgraded after its agents)."""
AGENT_CAPABILITIES: tuple[str, ...] = ("signal", "pty", "port-forward", "new-shell", "image-cmd")
"""What this agent can do. "signal": it takes `TaskSpec.signal` and `TaskStop.signal` (a job's
`--signal`) and delivers them; an agent that does not say so may refuse a reply that has them.
"pty": it runs `TaskSpec.pty` tasks under a terminal and opens `HeartbeatReply.streams`.
"port-forward": it opens `StreamOpen` of kind "port" (to a port its task listens on).
"new-shell": it opens `StreamOpen` of kind "new" (a new shell in a running task's sandbox).
"image-cmd": it takes a `TaskSpec` with an image and no command, and runs the image's ENTRYPOINT
and CMD (an agent that does not say so refuses the reply that has one).
"netns" (not in this tuple: an agent adds it only where it can build the namespace, see
agents/netns.py): it runs `TaskSpec.network="private"` tasks in a network namespace of their own.
"container-netns" (nor this one: an agent adds it only beside "netns", where its container
runtime can put a container in the task's namespace: podman and apptainer, and docker given a
pod image, agents/container.py): it runs such a task with an image too.
"container" (nor this one: an agent adds it only where a container runtime is configured and
answers, agents/container.py `runtime_problem`): it runs `TaskSpec.image` tasks; "container-netns"
comes only beside it."""
NETNS_CAPABILITY = "netns"
CONTAINER_CAPABILITY = "container"
CONTAINER_NETNS_CAPABILITY = "container-netns"
MAX_CAPABILITIES = 32

Isolation = Literal["strict", "none"]
"""How an agent confines its tasks (docs/ISOLATION.md). "strict": each task as its org's uid, in
its own cgroup and mount namespace, with only its own GPUs' device files. "none": tasks run as the
agent's user, unconfined; only for a single-tenant or demo node, and never given the jobs of an
org that requires isolation."""

# Bounds shared by both sides: the agent splits its reports to fit, the server rejects larger.
# A job's payload (command, environment...) is bounded in protocol/limits.py, which the submit
# schema shares.
MAX_TASKS_PER_HEARTBEAT = 256
MAX_LOG_CHUNKS_PER_HEARTBEAT = 64
MAX_LOG_CHUNK_CHARS = 64 * 1024
MAX_PROCESSES_PER_GPU = 64
MAX_XID_EVENTS_PER_SAMPLE = 64
MAX_WAIT_S = 60.0


def _without_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _nul_replaced(value: str) -> str:
    return value.replace("\x00", "\ufffd")


# PostgreSQL's text holds no NUL character, and one in a statement would fail the whole
# heartbeat, every time the agent sent it again, until the node was declared down with every
# org's tasks on it. What a task writes (its output, and reasons that quote it) keeps NUL as
# U+FFFD, as invalid UTF-8 already is; what names the node or its GPUs must not hold one (422).
NoNul = AfterValidator(_without_nul)
TaskText = AfterValidator(_nul_replaced)
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
ShortText = Annotated[str, Field(max_length=1024), TaskText]
# Integers are bounded by the columns that store them (BIGINT, INTEGER): a larger number is a
# 422, not a driver overflow (500).
NonNegInt = Annotated[int, Field(ge=0, le=2**63 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
NonNegFloat = Annotated[float, Field(ge=0)]
GpuIndex = Annotated[int, Field(ge=0, lt=MAX_GPUS_PER_NODE)]
Uuid = Annotated[str, Field(min_length=1, max_length=96), NoNul]


class _Model(BaseModel):
    # Unknown fields are an error so that a typo or a version skew is loud, not silently dropped.
    # NaN and infinities are refused: they are not JSON, and a stored sample must be.
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


class _Reply(_Model):
    # What the server sends the agent: fields this agent does not know are left out rather than
    # refused, so that a server newer than its agents (a rolling upgrade) still reaches them.
    # What the agent sends stays strict: the server refuses what it does not know.
    model_config = ConfigDict(extra="ignore")


class GpuInfo(_Model):
    """One GPU as the agent found it at start-up; the scheduler places jobs from this."""

    index: GpuIndex
    uuid: Uuid
    model: Annotated[str, Field(min_length=1, max_length=64), NoNul]
    """Normalised type the scheduler matches jobs against: "H100", "A100-80GB", "L40S"."""
    name: ShortText = ""
    """The raw product name NVML reports ("NVIDIA H100 80GB HBM3"), for operators."""
    memory_bytes: NonNegInt
    mig_enabled: bool = False
    nvlink_peers: Annotated[list[GpuIndex], Field(max_length=MAX_GPUS_PER_NODE)] = Field(
        default_factory=list
    )
    """Indices of GPUs on this node reachable over NVLink; placement prefers such groups."""


class AgentRegister(_Model):
    """First call of an agent, authorised by a join token an administrator handed out."""

    name: Name
    site: Name
    domain: Name
    """Topology domain inside the site (rack, NVLink or switch group) for gang placement."""
    hostname: Annotated[str, Field(min_length=1, max_length=255), NoNul]
    address: Annotated[str, Field(min_length=1, max_length=255), NoNul]
    """Address other nodes reach this one at; used as MASTER_ADDR when it holds rank 0."""
    agent_version: Annotated[str, Field(min_length=1, max_length=64), NoNul]
    gpus: Annotated[list[GpuInfo], Field(max_length=MAX_GPUS_PER_NODE)]
    isolation: Isolation = "none"
    """How this agent confines tasks; an agent that does not say is taken as unconfined."""
    capabilities: Annotated[list[Capability], Field(max_length=MAX_CAPABILITIES)] | None = None
    """What the agent can do (`AGENT_CAPABILITIES`); None: an agent older than the field, which
    can do none of them."""
    memory_per_gpu_bytes: NonNegInt | None = None
    """Each GPU's share of the memory the node's tasks may hold together (the tasks' memory ÷
    its GPUs, at most the agent's `--mem-per-gpu`): a task asking more is refused at start, so
    the server places a job's `--mem` only where its GPUs' share holds it. None: unknown (an
    agent older than the field, or one that sets no memory limit), placed as any node."""


class AgentRegistered(_Reply):
    node_id: int
    node_name: Name
    credential: Annotated[str, Field(min_length=16, max_length=512)]
    """The node's bearer token for heartbeats; shown once, the server keeps only a hash."""
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=3600)]


class GpuProcess(_Model):
    pid: NonNegInt
    used_memory_bytes: NonNegInt | None = None


class GpuSample(_Model):
    """One GPU's state at `sampled_at`. A field the device cannot report is None, not zero."""

    index: GpuIndex
    uuid: Uuid
    sampled_at: AwareDatetime
    utilization_ratio: Annotated[float, Field(ge=0, le=1)] | None = None
    memory_used_bytes: NonNegInt | None = None
    memory_total_bytes: NonNegInt | None = None
    temperature_c: float | None = None
    power_w: NonNegFloat | None = None
    energy_joules: NonNegFloat | None = None
    """Monotonic counter since the driver loaded; the server takes differences for accounting."""
    ecc_uncorrected_total: NonNegInt | None = None
    ecc_corrected_total: NonNegInt | None = None
    xid_events: Annotated[list[NonNegInt], Field(max_length=MAX_XID_EVENTS_PER_SAMPLE)] = Field(
        default_factory=list
    )
    """XID error codes seen since the previous sample (an XID is a driver-reported GPU fault)."""
    health: GpuHealth = GpuHealth.HEALTHY
    health_reason: ShortText = ""
    processes: Annotated[list[GpuProcess], Field(max_length=MAX_PROCESSES_PER_GPU)] = Field(
        default_factory=list
    )


class TaskReport(_Model):
    """Where one task stands. Sent every heartbeat until a final state has been acknowledged."""

    task_id: Int64
    job_id: Int64
    state: TaskState
    pid: NonNegInt | None = None
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime | None = None
    exit_code: Int32 | None = None
    signal: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    """Signal number that ended the process, when one did (exit_code is then None)."""
    reason: ShortText = ""


class LogChunk(_Model):
    """Bytes [offset, next_offset) of a task's combined stdout/stderr log, decoded as UTF-8.

    Chunks of one task arrive in order; a chunk not acknowledged is sent again with the same
    bounds. The server keeps per task the offset it holds up to: a chunk whose `next_offset` is
    not beyond it is a duplicate and dropped, any other is appended. (`data` may hold fewer
    characters than bytes: invalid UTF-8 is replaced; a gap left by the node's log size cap
    arrives as a one-line marker.)
    """

    task_id: Int64
    offset: NonNegInt
    next_offset: NonNegInt
    data: Annotated[str, Field(max_length=MAX_LOG_CHUNK_CHARS), TaskText]
    eof: bool = False
    """True on the last chunk of an ended task: the log is complete."""


class Heartbeat(_Model):
    samples: Annotated[list[GpuSample], Field(max_length=MAX_GPUS_PER_NODE)] = Field(
        default_factory=list
    )
    tasks: Annotated[list[TaskReport], Field(max_length=MAX_TASKS_PER_HEARTBEAT)] = Field(
        default_factory=list
    )
    logs: Annotated[list[LogChunk], Field(max_length=MAX_LOG_CHUNKS_PER_HEARTBEAT)] = Field(
        default_factory=list
    )
    wait_s: Annotated[float, Field(ge=0, le=MAX_WAIT_S)] = 0.0
    """Long-poll: the server may hold the request up to this long until it has work to give."""
    isolation: Isolation | None = None
    """Sent on the first heartbeat after the agent starts (it may restart with another mode
    while keeping its credential); None: unchanged since the last report."""
    capabilities: Annotated[list[Capability], Field(max_length=MAX_CAPABILITIES)] | None = None
    """Sent with `isolation` (an upgraded agent keeps its credential); None: unchanged."""
    memory_per_gpu_bytes: NonNegInt | None = None
    """As at registration; read only with `isolation` (where the agent restarted), when None
    means unknown: an agent older than the field, or one that sets no memory limit."""


class TaskSignal(_Reply):
    """Sent `lead_s` before the time limit, and instead of SIGTERM at a stop that asks for it
    (`TaskStop.signal`)."""

    name: Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[A-Z0-9+-]+$")]
    """Without SIG: "USR1". An agent that has no signal of this name leaves it unsent."""
    lead_s: Annotated[float, Field(gt=0, le=MAX_TIME_LIMIT_S)]
    batch_only: bool = False
    """Only to the process the agent started (the batch shell), not to the whole task."""


class TaskSpec(_Reply):
    """A task to start: one node's share of a job (a gang of `num_nodes` tasks).

    The agent sets CUDA_VISIBLE_DEVICES (to `gpus`, or `gpu_uuids` when configured), FAIRGPU_JOB_ID,
    FAIRGPU_TASK_ID, FAIRGPU_NODE_RANK, FAIRGPU_NUM_NODES; for num_nodes > 1 also MASTER_ADDR,
    MASTER_PORT, NODE_RANK and WORLD_SIZE = num_nodes (one launcher process per node, as
    `torchrun --nnodes=$WORLD_SIZE --node_rank=$NODE_RANK` expects).
    """

    task_id: int
    job_id: int
    org: Annotated[str, Field(max_length=128)] = ""
    """Owning organisation's name: the allocation metric label and `{org}` in the agent's
    allowed data roots."""
    org_id: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    """Owning organisation's id: under strict isolation the task's uid is the agent's
    `--task-uid-base` plus this (unless the agent maps the org's name to a uid itself)."""
    node_rank: Annotated[int, Field(ge=0)]
    num_nodes: Annotated[int, Field(ge=1)]
    gpus: Annotated[list[GpuIndex], Field(max_length=MAX_GPUS_PER_NODE)]
    gpu_uuids: Annotated[list[Uuid], Field(max_length=MAX_GPUS_PER_NODE)] = Field(
        default_factory=list
    )
    command: ImageCommand
    """argv; empty only with `image`: the image's ENTRYPOINT and CMD run (docker's `run IMAGE`).
    Only an agent with the "image-cmd" capability is given such a task."""
    env: TaskEnvironment = Field(default_factory=dict)
    workdir: Workdir | None = None
    image: Image | None = None
    """Container image; when set the agent launches through its configured container runtime."""
    time_limit_s: Annotated[float, Field(gt=0, le=MAX_TIME_LIMIT_S)]
    master_addr: Annotated[str, Field(max_length=255)] | None = None
    master_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    memory_bytes: Annotated[int, Field(gt=0, le=2**63 - 1)] | None = None
    """The job's own memory request per node (`submit --mem`); None: the agent's per-GPU default
    times the task's GPUs. Under strict isolation the task's cgroup is held to it."""
    job_secret: Annotated[str, Field(min_length=16, max_length=128)] | None = None
    """A random secret per job, the same on every node of a gang, set as FAIRGPU_JOB_SECRET for
    frameworks that can authenticate their rendezvous with one."""
    signal: TaskSignal | None = None
    """The job's warning signal (`submit --signal`); None: none. Left out of the reply when
    None, so agents older than the field (which refused unknown fields) still take the task."""
    pty: bool | None = None
    """True: run the command under a pseudo-terminal that streams attach to (rank 0 of an
    interactive job, docs/INTERACTIVE.md). Left out when None, as `signal`."""
    idle_timeout_s: Annotated[float, Field(gt=0, le=MAX_TIME_LIMIT_S)] | None = None
    """With `pty`: end the task after this long with no input from its clients and no use of
    its GPUs, warning its terminal first (agents/idle.py); None: never. Left out when None."""
    network: Literal["private", "host"] | None = None
    """"private": the task in a network namespace of its own (an agent with the "netns"
    capability), reaching the outside but no other task's listeners; "host" or None: the
    node's network namespace. Left out when None, as `signal`."""

    @model_validator(mode="after")
    def _command_or_image(self) -> TaskSpec:
        if not self.command and self.image is None:
            raise ValueError("a task without an image needs a command")
        return self


class TaskStop(_Reply):
    task_id: int
    reason: Annotated[str, Field(max_length=256)] = ""
    grace_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    """Seconds between SIGTERM and SIGKILL."""
    signal: bool | None = None
    """True: the task's warning signal (`TaskSpec.signal`) instead of SIGTERM (a preemption);
    None: SIGTERM. Left out when None, as agents older than the field refuse it."""


StreamId = Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class StreamOpen(_Reply):
    """The server asks the agent to open `WS /v1/agent/streams/{id}` (outbound, with the node's
    credential) and to join it to a task's terminal (docs/INTERACTIVE.md). Sent on every reply
    until the agent connects or the request expires; the agent opens each id once."""

    id: StreamId
    task_id: int
    kind: Literal["attach", "new", "port"] = "attach"
    """"attach": the task's own terminal; "new": a new shell in the task's sandbox on a terminal
    of its own (`fairgpu attach --new`, an agent with the "new-shell" capability); "port": a TCP
    connection to `port`, if the task itself listens there (`fairgpu port-forward`, an agent
    with the "port-forward" capability)."""
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """The task's TCP port, for a "port" stream."""


class JobGpuUse(_Reply):
    """`GET /v1/agent/tasks/{task_id}/job-gpu-use`: the busy GPU-seconds the usage ledger holds
    for the GPUs of the task's job on its other nodes, a total that only grows. Rank 0's agent
    reads it before it warns or ends a multi-node interactive session as idle (agents/idle.py):
    work on another rank is GPU use of the session."""

    busy_gpu_seconds: Annotated[float, Field(ge=0)]


class HeartbeatReply(_Reply):
    start: Annotated[list[TaskSpec], Field(max_length=MAX_TASKS_PER_HEARTBEAT)] = Field(
        default_factory=list
    )
    stop: Annotated[list[TaskStop], Field(max_length=MAX_TASKS_PER_HEARTBEAT)] = Field(
        default_factory=list
    )
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=3600)]
    server_time: AwareDatetime
    credential: Annotated[str, Field(min_length=16, max_length=512)] | None = None
    """A renewed node credential, sent when less than half of the current one's lifetime is
    left. The agent saves it (replacing the old one, atomically) and presents it from its next
    request on; the old one stays valid until the new one is first used or it expires."""
    streams: Annotated[list[StreamOpen], Field(max_length=MAX_TASKS_PER_HEARTBEAT)] = Field(
        default_factory=list
    )
    """Terminal streams to open now; left out of the reply when empty."""
