"""Looking back at jobs: `fairgpu logs` (with follow) and `fairgpu history` (like sacct)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from cli.client import connect
from cli.jobs import TERMINAL_STATES, JobArg, gpus_text, iter_jobs, org_of, user_of
from cli.output import (
    Column,
    Format,
    NoHeadersOption,
    OutputOption,
    elapsed,
    local_time,
    render,
)
from cli.parse import parse_since

FOLLOW_WAIT_S = 20.0
PAGE_BYTES = 256 * 1024


def logs(
    job_id: JobArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
    rank: Annotated[int, typer.Option("--rank", min=0, help="Which node of a gang.")] = 0,
    tail: Annotated[
        int | None, typer.Option("--tail", min=0, help="Start with the last N bytes.")
    ] = None,
) -> None:
    """A job's output (stdout and stderr), as its node shipped it to the server."""
    out = sys.stdout
    with connect() as client:
        params: dict[str, Any] = {"rank": rank, "max_bytes": PAGE_BYTES}
        if tail is not None:
            params["tail"] = tail
        while True:
            piece = client.request(
                "GET",
                f"/v1/jobs/{job_id}/logs",
                params=params,
                timeout_s=FOLLOW_WAIT_S + 15.0,
            )
            if piece["data"]:
                out.write(piece["data"])
                out.flush()
            params.pop("tail", None)
            moved = piece["next_offset"] != params.get("offset")
            params["offset"] = piece["next_offset"]
            if piece["eof"] and not piece["data"]:
                return
            if not follow and (not piece["data"] or not moved):
                return
            if follow and not piece["data"]:
                params["wait_s"] = FOLLOW_WAIT_S
                if not moved:
                    time.sleep(0.5)  # an older server without long-poll: poll gently


def history(
    output: OutputOption = Format.TABLE,
    no_headers: NoHeadersOption = False,
    since: Annotated[
        str,
        typer.Option("--starttime", "-S", help="Ended since: ISO date or a duration ago (2d)."),
    ] = "1d",
    until: Annotated[
        str | None,
        typer.Option("--endtime", "-E", help="Ended before: ISO date or a duration ago."),
    ] = None,
    me: Annotated[bool, typer.Option("--me", help="Only my jobs.")] = False,
    account: Annotated[str | None, typer.Option("--account", "-A", help="Only this org.")] = None,
) -> None:
    """Finished jobs, like sacct: state, exit code, run time, GPUs.

    The server filters on end time (`ended_since` / `ended_until`): only the period's jobs
    cross the network, however long the history.
    """
    window: dict[str, Any] = {"ended_since": parse_since(since).isoformat()}
    if until is not None:
        window["ended_until"] = parse_since(until).isoformat()
    with connect("history") as client:
        rows = list(
            iter_jobs(client, state=list(TERMINAL_STATES), org=account, mine=me or None, **window)
        )
    rows.sort(key=lambda j: (j.get("ended_at") or "", j["id"]))
    render(
        rows,
        [
            Column("JOBID", lambda j: j["id"], justify="right"),
            Column("ORG", org_of),
            Column("NAME", lambda j: j["name"][:24]),
            Column("USER", user_of),
            Column("STATE", lambda j: j["state"]),
            Column("EXIT", lambda j: j.get("exit_code"), justify="right"),
            Column("ELAPSED", lambda j: elapsed(j.get("started_at"), j.get("ended_at"))),
            Column("GPUS", gpus_text, justify="right"),
            Column("SUBMIT", lambda j: local_time(j["submitted_at"]), wide_only=True),
            Column("START", lambda j: local_time(j.get("started_at")), wide_only=True),
            Column("END", lambda j: local_time(j.get("ended_at"))),
            Column("NODELIST", lambda j: ",".join(j.get("node_names") or []), wide_only=True),
            Column("REASON", lambda j: j.get("state_reason"), wide_only=True),
        ],
        output,
        no_headers=no_headers,
        empty="no finished jobs in that period",
    )
