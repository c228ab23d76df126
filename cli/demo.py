"""`fairgpu demo`: the whole system on this machine, in about a minute and a half.

A server on a temporary SQLite file, four agents with simulated GPUs in two sites, three
organisations with quotas, and a time-compressed Philly-shaped workload; the scenario in
`cli/demo_run.py` makes sure a gang, a backfill and a reclaim preemption happen. Every process
it starts is stopped in `finally`, also on Ctrl-C, and their children with them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail
from scheduler.bench.cluster import QUICK_SERVER_ENV, cluster
from scheduler.bench.procs import HarnessError

# The demo's cluster: two sites, two nodes each.
NODES = (
    ("h100-a1", "site-a", "8xH100"),
    ("h100-a2", "site-a", "8xH100"),
    ("a100-b1", "site-b", "8xA100-80GB"),
    ("a100-b2", "site-b", "8xA100-80GB"),
)


def demo(
    seed: Annotated[int, typer.Option(help="Seed of the generated workload.")] = 3,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temporary directory (database, logs).")
    ] = False,
    live: Annotated[
        bool, typer.Option(help="Live queue display (off: a line per event, for logs).")
    ] = True,
    workload_s: Annotated[
        float, typer.Option(min=20, max=90, help="Seconds of submissions (compressed trace).")
    ] = 45.0,
) -> None:
    """Run the whole system here: a server, four simulated GPU nodes, three orgs, a workload."""
    from cli.demo_run import run_scenario

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-demo-"))
    typer.echo(f"fairgpu demo: starting a server and 4 agents (work dir {workdir})")
    isolation = "strict" if os.geteuid() == 0 else "none"
    if isolation == "none":
        typer.echo(
            "warning: not root, so the agents run with --isolation none: tasks are not "
            "confined (docs/ISOLATION.md)"
        )
    try:
        with cluster(workdir, nodes=NODES, server_env=QUICK_SERVER_ENV, isolation=isolation) as c:
            typer.echo(f"server ready in {c.server_ready_s:.1f} s at {c.url}; agents starting")
            run_scenario(c, seed=seed, live=live, workload_s=workload_s, started=started)
    except HarnessError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: everything the demo started has been stopped", err=True)
        raise typer.Exit(130) from None
    finally:
        if keep:
            typer.echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    typer.echo(f"demo finished in {time.monotonic() - started:.0f} s; nothing left running")
