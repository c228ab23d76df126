"""Job schemas: what a submission may contain (with its limits) and what the API shows back."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from api.schemas.common import (
    DurationS,
    GpuType,
    InputModel,
    Name,
    OutputModel,
    Printable,
    SiteName,
)
from protocol.limits import (
    MAX_GPUS_PER_NODE,
    MAX_TIME_LIMIT_S,
    Environment,
    Image,
    ImageCommand,
    Workdir,
    check_env_with_secrets,
)
from protocol.script import check_script, script_command
from protocol.signals import parse_signal
from protocol.states import JobState
from scheduler.services.arrays import parse_array
from scheduler.services.dependencies import AFTEROK, Dependencies, parse_dependency

MAX_NODES = 512
MAX_DEPENDENCIES = 64
MAX_IDEMPOTENCY_KEY_CHARS = 128
MIN_MEMORY_BYTES = 1 << 20  # 1 MiB
MAX_MEMORY_BYTES = 1 << 46  # 64 TiB per node
MAX_PRIORITY_CLASS_CHARS = 64
# A priority class by name. Which names exist is the server's policy
# (FAIRGPU_POLICY_PRIORITY_CLASSES), checked by the service (SubmitLimits.check_class).
PriorityClass = Annotated[str, Field(min_length=1, max_length=MAX_PRIORITY_CLASS_CHARS)]
RESERVED_ENV_PREFIX = "FAIRGPU_"
RESERVED_ENV = frozenset(
    {"CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK"}
)


class JobCreate(InputModel):
    """A job: `nodes` tasks × `gpus_per_node` GPUs, started all at once or not at all."""

    name: Name = "job"
    image: Annotated[Image, Printable] | None = None
    """Container image. Without `command`, the image's ENTRYPOINT and CMD run (as `docker run
    IMAGE` does); with one, its ENTRYPOINT and `command`."""
    command: ImageCommand = Field(default_factory=list, validate_default=True)
    """argv; the first element is the program. With `script`: the script's name and its
    arguments (the script's `$0 $1...`). Required unless `image` is given."""
    script: Annotated[str, AfterValidator(check_script)] | None = None
    """A batch script's text, starting with its `#!` line (at most 60 KiB). The node runs
    `INTERPRETER -c SCRIPT NAME ARGS...` with `command` = [NAME, *ARGS]."""
    env: Environment = Field(default_factory=dict)
    secret_env: Environment = Field(default_factory=dict, repr=False)
    """Set in the task's environment like `env`, but stored encrypted and never shown: the API
    answers with the names only, each value "***". `env` and `secret_env` together stay within
    the limits of one environment, and no name may be in both."""
    workdir: Annotated[Workdir, Printable] | None = None
    gpus_per_node: Annotated[int, Field(ge=1, le=MAX_GPUS_PER_NODE)] = 1
    nodes: Annotated[int, Field(ge=1, le=MAX_NODES)] = 1
    memory_bytes: Annotated[int, Field(ge=MIN_MEMORY_BYTES, le=MAX_MEMORY_BYTES)] | None = None
    """Memory per node, in bytes (`submit --mem 64G`); on nodes with strict isolation the task's
    cgroup is held to it. Omitted: the node's default per GPU times the GPUs asked for."""
    gpu_type: GpuType | None = None
    site: SiteName | None = None
    time_limit: Annotated[DurationS, Field(le=MAX_TIME_LIMIT_S)] | None = None
    """Walltime; the org's default when omitted. Seconds, or '1h30m'-style."""
    priority_class: PriorityClass = "normal"
    """One of the server's configured priority classes (low, normal, high by default)."""
    preemptible: bool = False
    requeue: bool | None = None
    """Put back in the queue after a preemption or a node failure (`--requeue`); null: when
    it is preemptible."""
    signal: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    """Slurm's `--signal [B:]SIG[@SECONDS]`: SIG (a name, `USR1` or `SIGUSR1`, or a number)
    SECONDS (default 60, at most the time limit and the server's `max_preemption_grace_s`)
    before the time limit, and instead of SIGTERM at a preemption, whose grace is then at least
    SECONDS. `B:` signals the batch shell only, not every process of the job."""
    hold: bool = False
    """Submit held: the job waits until released."""
    interactive: bool = False
    """Rank 0 runs its command under a pseudo-terminal that the owner attaches to
    (`fairgpu run --pty`, `fairgpu attach`); see docs/INTERACTIVE.md."""
    network: Literal["private", "host"] | None = None
    """`private`: the job's task in a network namespace of its own (only nodes that can give
    one), where no other job reaches what it listens on and it reaches the outside but not
    the node's own loopback; `host`: the node's network, shared with every job there (what
    NCCL across nodes needs). Omitted: private for a one-node job without an image on nodes
    that can, else host. A job over several nodes cannot be private. See docs/ISOLATION.md."""
    depends_on: Annotated[list[int], Field(max_length=MAX_DEPENDENCIES)] = Field(
        default_factory=list
    )
    """`afterok`: job ids (of the same org) that must complete first."""
    dependency: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    """Slurm's `--dependency`: `afterok:12:13,afterany:14,afternotok:15,singleton` (jobs of the
    same org). `afterany` waits for any end, `afternotok` for an end other than COMPLETED,
    `singleton` for every earlier job of the org with this job's name to end."""
    array: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """A job array, Slurm's `--array`: `0-99`, `1,3,5-11:2`, `0-99%8` (at most 8 elements
    active at once); at most 10,000 elements. Each element is a job; the reply is the first
    one, whose id names the array (`42`, and `42_7` for task 7, in every job route)."""
    org: Annotated[str, Printable, Field(min_length=1, max_length=63)] | None = None
    """Org (name or id) to submit on behalf of; the caller's own org when omitted. Another org
    needs a platform admin: org admins admit only their own org (not its child orgs, whose jobs
    they could then neither see nor cancel)."""

    @field_validator("image")
    @classmethod
    def _image_not_an_option(cls, value: str | None) -> str | None:
        """The node puts the image on the container runtime's command line: `--privileged`
        or `--user=0` there would be an option (every device of the node, root)."""
        if value is not None and value.startswith("-"):
            raise ValueError("an image cannot start with '-'")
        return value

    @field_validator("command")
    @classmethod
    def _command_unless_image(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Only an image has a program of its own to run (its ENTRYPOINT and CMD)."""
        if not value and info.data.get("image") is None:
            raise ValueError("a job without an image needs a command")
        return value

    @field_validator("env", "secret_env")
    @classmethod
    def _env_not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_ENV_PREFIX) or key in RESERVED_ENV:
                raise ValueError(f"{key[:64]} is set by fairgpu and cannot be overridden")
        return value

    @field_validator("dependency")
    @classmethod
    def _dependency(cls, value: str | None) -> str | None:
        if value is not None:
            parse_dependency(value)
        return value

    @model_validator(mode="after")
    def _network_fits(self) -> JobCreate:
        if self.network == "private" and self.nodes > 1:
            raise ValueError(
                "network private is for one-node jobs: a job over several nodes runs in its "
                "nodes' network (--network host), which NCCL across nodes needs"
            )
        return self

    def spec_fields(self) -> dict[str, Any]:
        """The keyword arguments of the job's `JobSpec` (scheduler/services/jobsubmit.py)."""
        fields = self.model_dump(exclude={"org", "array", "dependency"})
        parsed = parse_dependency(self.dependency) if self.dependency else Dependencies()
        kinds = {**dict.fromkeys(self.depends_on, AFTEROK), **parsed.kinds}
        fields["depends_on"] = sorted(kinds)
        fields["dependency_kinds"] = {i: k for i, k in kinds.items() if k != AFTEROK}
        fields["singleton"] = parsed.singleton
        return fields

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_signal(value))

    @field_validator("array")
    @classmethod
    def _array(cls, value: str | None) -> str | None:
        if value is not None:
            parse_array(value)
        return value

    @field_validator("depends_on")
    @classmethod
    def _ids(cls, value: list[int]) -> list[int]:
        if any(v <= 0 or v >= 2**63 for v in value):
            raise ValueError("job ids are positive integers")
        return sorted(set(value))

    @model_validator(mode="after")
    def _gang(self) -> JobCreate:
        if self.nodes * self.gpus_per_node > MAX_GPUS_PER_NODE * MAX_NODES:
            raise ValueError("too many GPUs")
        return self

    @model_validator(mode="after")
    def _script_fits(self) -> JobCreate:
        if self.script is not None:
            if not self.command:
                raise ValueError("a script needs a command: its name and arguments")
            script_command(self.script, self.command)
        return self

    @model_validator(mode="after")
    def _env_with_secrets(self) -> JobCreate:
        if self.secret_env:
            check_env_with_secrets(self.env, self.secret_env)
        return self


class JobUpdate(InputModel):
    """Changes to a pending job (every pending task of an array `42`); omitted: unchanged."""

    time_limit: Annotated[DurationS, Field(le=MAX_TIME_LIMIT_S)] | None = None
    """Members may only lower it; org and platform admins may raise it up to the maximum."""
    name: Name | None = None
    hold: bool | None = None
    """True holds it (as `POST .../hold` without a body: an admin hold for org and platform
    admins, else a user hold), False releases it (403 for a member and an admin hold)."""


class JobReason(OutputModel):
    """The first reason a pending job waits: a Slurm reason word and a short message."""

    code: str
    message: str


class JobPublic(OutputModel):
    """A job. `org_name`, `user_name`, `node_names` and `pending_reason` are filled in by the
    reads (list, get) and by cancel, hold and release; a submission's reply leaves them empty
    (it is the hot path: one statement, no joins)."""

    id: int
    org_id: int
    org_name: str | None = None
    user_id: int
    user_name: str | None = None
    name: str
    command: list[str]
    script: str | None = None
    """A batch job's script (`command` is then its name and arguments). In the reply of
    `GET /v1/jobs/{id}` only; null in listings and every other reply."""
    image: str | None
    env: dict[str, str]
    secret_env: dict[str, str] = Field(default_factory=dict)
    """The names of the job's secret variables, each value "***": values are never returned."""
    workdir: str | None
    gpus_per_node: int
    nodes: int
    memory_bytes: int | None = None
    """Memory asked for per node; null: the node's default per GPU."""
    gpu_type: str | None
    site: str | None
    time_limit_s: int
    priority_class: str
    preemptible: bool
    requeue: bool
    """Requeued after a preemption or a node failure."""
    signal: str | None = None
    """The warning signal, `[B:]NAME@SECONDS` (`--signal`); null: none."""
    held: bool
    hold_level: Literal["user", "admin"] | None = None
    """A held job's hold: "admin" only an org or platform admin may release, "user" its owner
    too; null when not held."""
    held_by: str | None = None
    """Who held it (`user:NAME`); null when not held or held at submission."""
    hold_reason: str | None = None
    interactive: bool = False
    """Rank 0 runs under a pseudo-terminal (`run --pty`); `attach` connects to it."""
    network: str | None = None
    """`private`, `host`, or null: private where the node can (see the submission's field)."""
    state: JobState
    state_reason: str | None
    exit_code: int | None
    requeue_count: int
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    estimated_start_at: datetime | None
    depends_on: list[int] = Field(default_factory=list)
    """Every job it waits for, whatever the kind (the kinds: `dependency`)."""
    dependency: str | None = None
    """Its dependencies in Slurm's words (`afterok:12,afterany:14,singleton`): in the reply of
    `GET /v1/jobs/{id}` only, null elsewhere."""
    array_job_id: int | None = None
    """The array this job is an element of (its first element's id); null: not an array."""
    array_task_id: int | None = None
    array_limit: int | None = None
    """At most this many of the array's elements active at once (`%N`); null: no limit."""
    node_names: list[str] = Field(default_factory=list)
    """Where the latest attempt runs or ran, by node rank (Slurm's NODELIST); empty if pending."""
    pending_reason: JobReason | None = None
    """Why a pending job waits, as the last scheduling cycle saw it (all of it: `explain`)."""


class JobsPublic(OutputModel):
    data: list[JobPublic]
    count: int
    next_cursor: str | None
    """Pass as `cursor` for the next page; null on the last page."""


class PendingReason(OutputModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class JobExplain(OutputModel):
    job_id: int
    state: JobState
    held: bool
    evaluated: bool
    """False while no scheduling cycle has looked at the job yet."""
    message: str
    priority: float | None
    reasons: list[PendingReason]
    estimated_start_at: datetime | None


class JobLogs(OutputModel):
    job_id: int
    rank: int
    attempt: int | None
    task_id: int | None
    offset: int
    next_offset: int
    """Byte offset to ask for next (follow mode: poll with offset=next_offset)."""
    data: str
    eof: bool
    """The task has ended and everything it wrote is here."""


class EventPublic(OutputModel):
    id: int
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    actor: str
    reason: str | None
    details: dict[str, Any] | None


class EventsPublic(OutputModel):
    data: list[EventPublic]
    count: int
    next_cursor: str | None


class CancelRequest(InputModel):
    reason: Annotated[str, Printable, Field(max_length=1024)] | None = None


class HoldRequest(InputModel):
    """How to hold a job (`POST /v1/jobs/{id}/hold`); the body may be omitted."""

    level: Literal["user", "admin"] | None = None
    """"admin": only an org admin of the job's org or a platform admin may release it (only
    they may ask for it); "user": its owner may. Omitted: "admin" for those admins, else
    "user"."""
    reason: Annotated[str, Printable, Field(max_length=1024)] | None = None
    """Why, shown by `describe` and `explain` and in the hold's event."""
