"""`fairgpu run --pty` and `fairgpu attach`: a shell (or any program) on allocated GPUs.

`run --pty` submits an interactive job (rank 0 runs under a pseudo-terminal), shows its queue
standing live while it waits (explain's figures), then attaches this terminal to it and exits
with the remote program's status. `attach` joins a running interactive job's terminal again.
See docs/INTERACTIVE.md.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, Any

import typer

from cli.client import ApiError, Client, Patience, connect, report
from cli.common import NetworkOption, fail
from cli.parse import parse_duration, parse_env, parse_gpus, parse_memory

POLL_S = 0.2
EXPLAIN_EVERY_S = 2.0
START_GRACE_S = 30.0
"""How long a job that has started may take before its terminal can be attached to."""


def run(
    command: Annotated[
        list[str] | None, typer.Argument(help="The program and its arguments (bash).")
    ] = None,
    pty: Annotated[
        bool, typer.Option("--pty", help="Run rank 0 under a terminal and attach to it.")
    ] = False,
    jupyter: Annotated[
        bool,
        typer.Option(
            "--jupyter",
            help="Start a notebook server (jupyter lab or notebook, from the job's "
            "environment) with a random token, forward a local port to it and print its URL.",
        ),
    ] = False,
    address: Annotated[
        str, typer.Option("--address", help="With --jupyter: the local address to listen on.")
    ] = "127.0.0.1",
    gpus: Annotated[
        str, typer.Option("--gpus", "-G", help="GPUs per node: N or TYPE:N (e.g. H100:1).")
    ] = "1",
    nodes: Annotated[
        int, typer.Option("--nodes", "-N", min=1, help="Nodes; the terminal is on rank 0.")
    ] = 1,
    time_limit: Annotated[
        str | None,
        typer.Option("--time", "-t", help="Time limit: 2h, 90m, 1-00:00:00 (bare N = minutes)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--job-name", "-J", help="Job name.")] = None,
    account: Annotated[
        str | None, typer.Option("--account", "-A", help="Org to run in (platform admins).")
    ] = None,
    priority: Annotated[str, typer.Option("--priority", help="Priority class.")] = "normal",
    preemptible: Annotated[
        bool,
        typer.Option("--preemptible", help="May be preempted (interactive jobs are not, unless)."),
    ] = False,
    mem: Annotated[str | None, typer.Option("--mem", help="Memory per node: 64G.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE in the job's environment.")
    ] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", help="Working directory.")] = None,
    site: Annotated[str | None, typer.Option("--site", help="Run only at this site.")] = None,
    network: NetworkOption = None,
) -> None:
    """Run a program on allocated GPUs with this terminal attached: `run --pty -- bash`.

    Like `srun --pty`: waits in the queue (showing why and until when), then attaches. Ctrl-]
    then d detaches and leaves the job running; the exit status is the remote program's.
    `run --jupyter` starts a notebook server instead and prints its local URL."""
    if not pty and not jupyter:
        fail("`fairgpu run` is for interactive jobs: add --pty (batch jobs: `fairgpu submit`)", 2)
    if pty and jupyter:
        fail("`fairgpu run`: --pty or --jupyter, not both", 2)
    if not command and not jupyter:
        fail("`fairgpu run --pty` needs a program: `fairgpu run --pty -- bash`", 2)
    command = command or []
    request = parse_gpus(gpus)
    job_env = parse_env(env or [])
    if "TERM" in os.environ and "TERM" not in job_env:
        job_env["TERM"] = os.environ["TERM"]  # the remote programs draw for this terminal
    body: dict[str, Any] = {
        "command": command,
        "name": name or (command[0].rsplit("/", 1)[-1][:128] if command else "jupyter"),
        "gpus_per_node": request.count,
        "gpu_type": request.gpu_type,
        "nodes": nodes,
        "priority_class": priority,
        "preemptible": preemptible,
        "interactive": True,
        "env": job_env,
    }
    if time_limit is not None:
        body["time_limit"] = parse_duration(time_limit)
    if mem is not None:
        body["memory_bytes"] = parse_memory(mem)
    if network is not None and network not in ("private", "host"):
        fail(f"--network {network!r}: private or host", 2)
    for key, value in (
        ("workdir", workdir),
        ("site", site),
        ("org", account),
        ("network", network),
    ):
        if value is not None:
            body[key] = value
    if jupyter:
        from cli import notebook

    with connect("run") as client:
        if jupyter:
            job_id, token = notebook.submit_notebook(client, body)
        else:
            job_id = str(client.post("/v1/jobs", body)["id"])
        _say(f"job {job_id} submitted; waiting for it to start (Ctrl-C cancels it)")
        try:
            _wait_running(client, job_id)
            if jupyter:
                kind, port = notebook.wait_ready(client, job_id)
        except KeyboardInterrupt:
            _end_line()
            client.post(f"/v1/jobs/{job_id}/cancel")
            fail(f"interrupted: job {job_id} cancelled", 130)
    if jupyter:
        notebook.serve_notebook(job_id, token, kind, port, address)
        return
    raise typer.Exit(_attach_when_ready(job_id, 0))


def attach(
    job: Annotated[str, typer.Argument(help="The job's id.")],
    rank: Annotated[
        int, typer.Option("--rank", min=0, help="The node rank (0: the terminal).")
    ] = 0,
    new: Annotated[
        bool,
        typer.Option(
            "--new",
            help="Open a new shell in the task's sandbox (any running job, any rank) beside "
            "its own terminal; it ends when this connection does.",
        ),
    ] = False,
) -> None:
    """Attach to a running interactive job's terminal again, or open a new shell in a job.

    With --new: a shell in any running job's sandbox (its uid, cgroup, namespaces, GPUs and
    directory). Ctrl-] then d detaches (a new shell ends then); the exit status is the remote
    program's."""
    raise typer.Exit(_attach_when_ready(job, rank, retry=False, new=new))


def _attach_when_ready(job_id: str, rank: int, *, retry: bool = True, new: bool = False) -> int:
    """Attach and relay. A job that has only just started may need a moment before its
    terminal can be reached (409): `retry` waits for it up to START_GRACE_S."""
    from cli.config import resolve
    from cli.terminal import open_stream, relay

    creds = resolve()
    assert creds is not None  # api() has checked it
    deadline = time.monotonic() + START_GRACE_S
    patience = Patience()  # a 429 (too many streams) is waited as the server says, bounded
    while True:
        try:
            websocket = open_stream(creds, job_id, rank, new=new)
            break
        except ApiError as exc:
            if exc.status == 429 and patience.wait(exc, f"attach {job_id}"):
                continue
            if not (retry and exc.status == 409 and time.monotonic() < deadline):
                report(exc, f"attach {job_id}", server=creds.server)
        time.sleep(POLL_S)
    return relay(websocket, job_id, new=new)


def _wait_running(client: Client, job_id: str) -> None:
    """Until the job runs; its standing (explain's message and estimated start) meanwhile."""
    shown = ""
    explained_at = 0.0
    while True:
        job = client.get(f"/v1/jobs/{job_id}")
        state = job["state"]
        if state == "RUNNING":
            _end_line()
            return
        if state not in ("PENDING", "STARTING"):
            _end_line()
            reason = job.get("state_reason") or ""
            fail(f"job {job_id} ended {state} before it could be attached: {reason}".rstrip(": "))
        if state == "PENDING" and time.monotonic() - explained_at >= EXPLAIN_EVERY_S:
            explained_at = time.monotonic()
            info = client.get(f"/v1/jobs/{job_id}/explain")
            line = _standing(info)
            if line != shown:
                _status(line)
                shown = line
        time.sleep(POLL_S)


def _standing(info: dict[str, Any]) -> str:
    from cli.output import local_time, relative

    when = info.get("estimated_start_at")
    start = f"estimated start {relative(when)} ({local_time(when)})" if when else "start unknown"
    return f"fairgpu: waiting: {info['message']}; {start}"


_LIVE = {"line": False}


def _status(line: str) -> None:
    """A line that replaces the previous one on a terminal, one line each elsewhere."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\x1b[K{line}")
        _LIVE["line"] = True
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _end_line() -> None:
    if _LIVE["line"]:
        sys.stderr.write("\n")
        _LIVE["line"] = False


def _say(line: str) -> None:
    typer.echo(f"fairgpu: {line}", err=True)
