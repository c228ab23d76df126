"""Everyday job commands, with Slurm's words: queue, describe, explain, cancel, hold.

Each command is a thin Typer function over `/v1/jobs`; submit lives in `cli/submit.py`, logs
and history in `cli/history.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from cli.client import ApiError, Client, connect, report
from cli.common import fail
from cli.output import (
    Column,
    Format,
    NoHeadersOption,
    OutputOption,
    cell,
    elapsed,
    human_duration,
    local_time,
    print_data,
    relative,
    render,
)
from cli.parse import format_memory, parse_duration

ACTIVE_STATES = ("PENDING", "STARTING", "RUNNING")
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED")
SHORT_STATE = {
    "PENDING": "PD",
    "STARTING": "CF",
    "RUNNING": "R",
    "COMPLETED": "CD",
    "FAILED": "F",
    "CANCELLED": "CA",
    "TIMEOUT": "TO",
    "NODE_FAIL": "NF",
    "PREEMPTED": "PR",
}
PAGE_SIZE = 500
MAX_LIST_JOBS = 10_000

_JOB_REF = re.compile(r"[1-9][0-9]{0,18}(_[0-9]{1,7})?")


def _job_refs(value: Any) -> Any:
    """Job ids as the server takes them: `42`, or `42_7` for task 7 of array 42."""
    refs = [ref.strip() for ref in (value if isinstance(value, list) else [value])]
    for ref in refs:
        if not _JOB_REF.fullmatch(ref):
            raise typer.BadParameter(f"{ref!r} is not a job id: use 42, or 42_7 for an array task")
    return refs if isinstance(value, list) else refs[0]


JobArg = Annotated[
    str,
    typer.Argument(
        help="Job id (42), or an array's task (42_7).", show_default=False, callback=_job_refs
    ),
]
JobsArg = Annotated[
    list[str],
    typer.Argument(
        help="Job ids (42), arrays (42: all their tasks) or array tasks (42_7).",
        callback=_job_refs,
    ),
]


def iter_jobs(
    client: Client, limit: int = MAX_LIST_JOBS, **filters: Any
) -> Iterator[dict[str, Any]]:
    """Every job matching `filters`, newest first, following the server's cursor."""
    cursor: str | None = None
    seen = 0
    while seen < limit:
        page = client.get("/v1/jobs", cursor=cursor, limit=min(PAGE_SIZE, limit - seen), **filters)
        for job in page["data"]:
            yield job
            seen += 1
        cursor = page.get("next_cursor")
        if not cursor:
            return


def org_of(job: dict[str, Any]) -> str:
    """The org's name as the listing gives it (its id from a server that does not)."""
    return str(job.get("org_name") or job["org_id"])


def user_of(job: dict[str, Any]) -> str:
    return str(job.get("user_name") or job["user_id"])


def gpus_text(job: dict[str, Any]) -> str:
    """`H100:16` for a 2x8 H100 gang; `8` when any type will do."""
    total = int(job["gpus_per_node"]) * int(job["nodes"])
    return f"{job['gpu_type']}:{total}" if job.get("gpu_type") else str(total)


def job_ref(job: dict[str, Any]) -> str:
    """`42`, or `42_7` for task 7 of array 42, as Slurm writes them."""
    if job.get("array_job_id") is not None:
        return f"{job['array_job_id']}_{job['array_task_id']}"
    return str(job["id"])


def task_ranges(task_ids: list[int]) -> str:
    """`0-3,7,9-11` for sorted task ids."""
    parts: list[str] = []
    start = previous = task_ids[0]
    for task_id in [*task_ids[1:], None]:
        if task_id is not None and task_id == previous + 1:
            previous = task_id
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if task_id is not None:
            start = previous = task_id
    return ",".join(parts)


def fold_arrays(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An array's pending tasks as one row, at the place of its first: `42_[3-99%8]`."""
    pending: dict[int, list[dict[str, Any]]] = {}
    for job in jobs:
        if job["state"] == "PENDING" and job.get("array_job_id") is not None:
            pending.setdefault(job["array_job_id"], []).append(job)
    out: list[dict[str, Any]] = []
    for job in jobs:
        group = pending.get(job.get("array_job_id") or 0) if job["state"] == "PENDING" else None
        if group is None or len(group) == 1:
            out.append(job)
        elif group[0] is job:
            ids = sorted(j["array_task_id"] for j in group)
            limit = f"%{job['array_limit']}" if job.get("array_limit") else ""
            out.append({**job, "ref": f"{job['array_job_id']}_[{task_ranges(ids)}{limit}]"})
    return out


def _hold(job: dict[str, Any]) -> str | bool:
    """`False`, or the hold: its level, who held it and why (an admin hold: only an admin
    releases it)."""
    if not job.get("held"):
        return False
    level = job.get("hold_level") or "user"
    by = f" by {job['held_by']}" if job.get("held_by") else ""
    why = f": {job['hold_reason']}" if job.get("hold_reason") else ""
    return f"{level} hold{by}{why}"


def reason_of(job: dict[str, Any]) -> str:
    """A pending job's first reason word as the last cycle saw it; Slurm's `None` when no
    cycle has given one yet."""
    reason = job.get("pending_reason")
    if isinstance(reason, dict) and reason.get("code"):
        return str(reason["code"])
    if job.get("held"):
        return "JobHeldAdmin" if job.get("hold_level") == "admin" else "JobHeldUser"
    return "None"


def queue(
    output: OutputOption = Format.TABLE,
    no_headers: NoHeadersOption = False,
    me: Annotated[bool, typer.Option("--me", help="Only my jobs.")] = False,
    account: Annotated[str | None, typer.Option("--account", "-A", help="Only this org.")] = None,
    states: Annotated[
        str | None,
        typer.Option("--states", "-t", help="Comma-separated states (default: active ones)."),
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Show the estimated START.")] = False,
) -> None:
    """The queue, like squeue: running and pending jobs with why each waits.

    One list call per page: the listing carries names, nodes and each job's first reason.
    """
    wanted = [s.strip().upper() for s in states.split(",")] if states else list(ACTIVE_STATES)
    wanted = [{v: k for k, v in SHORT_STATE.items()}.get(s, s) for s in wanted]
    with connect("queue") as client:
        jobs = list(iter_jobs(client, state=wanted, org=account, mine=me or None))
    jobs.reverse()  # oldest first, as squeue
    if output in (Format.TABLE, Format.WIDE):
        jobs = fold_arrays(jobs)
    now = datetime.now(UTC)
    columns = [
        Column("JOBID", lambda j: j.get("ref") or job_ref(j), justify="right"),
        Column("ORG", org_of),
        Column("NAME", lambda j: j["name"][:24]),
        Column("USER", user_of),
        Column("ST", lambda j: SHORT_STATE.get(j["state"], j["state"])),
        Column("TIME", lambda j: elapsed(j["started_at"], j["ended_at"], now)),
        Column("TIME_LIMIT", lambda j: human_duration(j["time_limit_s"]), wide_only=True),
        Column("GPUS", gpus_text, justify="right"),
        Column("NODES", lambda j: j["nodes"], wide_only=True, justify="right"),
        Column("PRIO", lambda j: j.get("priority_class"), wide_only=True),
        Column("NODELIST(REASON)", _where),
        Column("WHY", _why, wide_only=True),
    ]
    if start:
        columns.insert(6, Column("START", lambda j: _start(j, now)))
    render(jobs, columns, output, no_headers=no_headers, empty="no jobs")


def _where(job: dict[str, Any]) -> str:
    if job["state"] == "PENDING":
        return f"({reason_of(job)})"
    nodes = job.get("node_names")
    if nodes:
        return ",".join(str(n) for n in nodes)
    return f"{job['nodes']} node(s)"


def _why(job: dict[str, Any]) -> str | None:
    reason = job.get("pending_reason")
    if not isinstance(reason, dict) or not reason.get("message"):
        return None
    return str(reason["message"])


def _start(job: dict[str, Any], now: datetime) -> str:
    if job["state"] != "PENDING":
        return local_time(job.get("started_at"))
    return relative(job.get("estimated_start_at"), now) if job.get("estimated_start_at") else "-"


def _memory(memory_bytes: int | None) -> str:
    if memory_bytes is None:
        return "node default per GPU"
    return f"{format_memory(memory_bytes)} per node"


def describe(
    job_id: JobArg,
    output: OutputOption = Format.TABLE,
    script: Annotated[
        bool, typer.Option("--script", help="Print only the job's batch script.")
    ] = False,
) -> None:
    """Everything about one job: its request, its state and its history."""
    with connect() as client:
        job = client.get(f"/v1/jobs/{job_id}")
        if script:
            if job.get("script") is None:
                fail(f"job {job_id} was not submitted as a batch script")
            typer.echo(job["script"], nl=not job["script"].endswith("\n"))
            return
        events = client.get(f"/v1/jobs/{job_id}/events", limit=500)["data"]
    org, user = org_of(job), user_of(job)
    if output in (Format.JSON, Format.YAML):
        print_data({**job, "events": events}, output)
        return
    now = datetime.now(UTC)
    fields = [
        ("JobId", job["id"]),
        ("ArrayTask", job_ref(job) if job.get("array_job_id") is not None else None),
        ("ArrayLimit", job.get("array_limit")),
        ("Name", job["name"]),
        ("Org", org),
        ("User", user),
        ("State", job["state"] + (f" ({job['state_reason']})" if job.get("state_reason") else "")),
        ("GPUs", f"{job['nodes']} node(s) x {job['gpus_per_node']} {job.get('gpu_type') or 'any'}"),
        ("Memory", _memory(job.get("memory_bytes"))),
        ("Site", job.get("site") or "any"),
        ("TimeLimit", human_duration(job["time_limit_s"])),
        ("Priority", job["priority_class"] + (" preemptible" if job["preemptible"] else "")),
        ("Requeue", job.get("requeue")),
        ("Signal", job.get("signal")),
        ("Network", job.get("network") or "private where the node can (one node, no image)"),
        ("Held", _hold(job)),
        ("Submitted", f"{local_time(job['submitted_at'])} ({relative(job['submitted_at'], now)})"),
        ("Started", local_time(job.get("started_at"))),
        ("Ended", local_time(job.get("ended_at"))),
        ("NodeList", ",".join(job.get("node_names") or []) or None),
        ("RunTime", elapsed(job.get("started_at"), job.get("ended_at"), now)),
        ("ExitCode", job.get("exit_code")),
        ("Restarts", _restarts(job, events)),
        (
            "Dependency",
            job.get("dependency") or ",".join(str(d) for d in job.get("depends_on") or []) or None,
        ),
        ("Command", " ".join(job["command"]) or "(the image's ENTRYPOINT and CMD)"),
        ("Script", "yes (fairgpu describe --script)" if job.get("script") else None),
        ("Image", job.get("image")),
        ("WorkDir", job.get("workdir")),
        ("Env", " ".join(f"{k}={v}" for k, v in (job.get("env") or {}).items()) or None),
        # The server sends the names only; never a value, whatever it answers.
        ("SecretEnv", " ".join(f"{k}=***" for k in job.get("secret_env") or {}) or None),
    ]
    if job["state"] == "PENDING":
        fields.append(("Reason", reason_of(job) + (f": {_why(job)}" if _why(job) else "")))
        fields.append(("EstimatedStart", relative(job.get("estimated_start_at"), now)))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        typer.echo(f"{key:>{width}}: {cell(value)}")
    typer.echo("\nEvents:")
    render(
        events,
        [
            Column("AT", lambda e: local_time(e["at"])),
            Column("KIND", lambda e: e["kind"]),
            Column("FROM", lambda e: e.get("from_state")),
            Column("TO", lambda e: e.get("to_state")),
            Column("BY", lambda e: e["actor"]),
            Column("WHY", lambda e: e.get("reason")),
        ],
    )


def _restarts(job: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """`2 (after PREEMPTED, NODE_FAIL)`: how often the job was requeued, and after what."""
    after = [
        str(e["from_state"])
        for e in events
        if e["kind"] == "job.state" and e.get("to_state") == "PENDING" and e.get("from_state")
    ]
    count = int(job.get("requeue_count") or 0)
    return f"{count} (after {', '.join(after)})" if count and after else str(count)


def explain(job_id: JobArg, output: OutputOption = Format.TABLE) -> None:
    """Why a job waits, every reason with its numbers, and when it should start."""
    with connect() as client:
        info = client.get(f"/v1/jobs/{job_id}/explain")
    if output in (Format.JSON, Format.YAML):
        print_data(info, output)
        return
    typer.echo(f"Job {job_id}: {info['message']}")
    if info.get("priority") is not None:
        typer.echo(f"Priority: {info['priority']:.1f}")
    for reason in info.get("reasons") or []:
        typer.echo(f"  {reason['code']}: {reason['message']}")
        for key, value in (reason.get("details") or {}).items():
            typer.echo(f"      {key} = {cell(value)}")
    if info["state"] == "PENDING":
        when = info.get("estimated_start_at")
        est = f"{relative(when)} ({local_time(when)})" if when else "unknown"
        typer.echo(f"Estimated start: {est}")


def _act(
    verb: str,
    path: str,
    job_ids: list[str],
    done: str | Callable[[dict[str, Any], str], str],
    body: dict[str, Any] | None = None,
) -> None:
    """POST `path` (with `body`) for each job; a failure for one job is reported and the rest
    go on."""
    failed = 0
    with connect() as client:
        for job_id in job_ids:
            try:
                job = client.post(f"/v1/jobs/{job_id}/{path}", body)
            except ApiError as exc:
                failed += 1
                if exc.status in (401, 403) and len(job_ids) == 1:
                    report(exc, f"{verb} {job_id}", server=client.server)
                typer.echo(f"fairgpu: error: {verb} {job_id}: {exc.detail}", err=True)
                continue
            typer.echo(done(job, job_id) if callable(done) else done.format(id=job_id))
    if failed:
        raise typer.Exit(1)


def cancel(job_ids: JobsArg) -> None:
    """Cancel jobs: pending ones at once, running ones after SIGTERM and the grace period."""
    _act("cancel", "cancel", job_ids, _cancelled)


def _cancelled(job: dict[str, Any], ref: str) -> str:
    if "_" not in ref and job.get("array_job_id") == job["id"]:
        return f"Cancelled array {ref}: its pending tasks at once, running ones once stopped"
    if job["state"] == "CANCELLED":
        return f"Cancelled job {ref}"
    return f"Cancelling job {ref}: stopping its tasks ({job['state']})"


def hold(
    job_ids: JobsArg,
    reason: Annotated[
        str | None,
        typer.Option("--reason", help="Why: shown by describe and explain, kept in the events."),
    ] = None,
    user_hold: Annotated[
        bool,
        typer.Option(
            "--user",
            help="For admins: a user hold, which the job's owner may release (an admin's "
            "hold is an admin hold by default, which only an admin releases).",
        ),
    ] = False,
) -> None:
    """Keep pending jobs from starting until released.

    An org admin's or a platform admin's hold is an admin hold (Slurm's `scontrol hold`): the
    job's owner cannot release it. Anybody else's is a user hold (`scontrol uhold`)."""
    body: dict[str, Any] = {}
    if reason is not None:
        body["reason"] = reason
    if user_hold:
        body["level"] = "user"
    _act("hold", "hold", job_ids, _held, body or None)


def _held(job: dict[str, Any], ref: str) -> str:
    return f"Held job {ref} ({job.get('hold_level') or 'user'} hold)"


def release(job_ids: JobsArg) -> None:
    """Let held jobs be scheduled again."""
    _act("release", "release", job_ids, "Released job {id}")


def update(
    job_id: JobArg,
    time_limit: Annotated[
        str | None,
        typer.Option("--time", "-t", help="New time limit (members may only lower it)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--job-name", "-J", help="New name.")] = None,
    hold: Annotated[
        bool | None, typer.Option("--hold/--release", help="Hold it, or release it.")
    ] = None,
) -> None:
    """Change a pending job (or every pending task of an array): time limit, name, hold."""
    body: dict[str, Any] = {}
    if time_limit is not None:
        body["time_limit"] = parse_duration(time_limit)
    if name is not None:
        body["name"] = name
    if hold is not None:
        body["hold"] = hold
    if not body:
        fail("nothing to change: give --time, --job-name, --hold or --release", 2)
    with connect() as client:
        job = client.patch(f"/v1/jobs/{job_id}", body)
    typer.echo(f"Updated job {job_id} (time limit {human_duration(job['time_limit_s'])})")
