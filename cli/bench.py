"""`fairgpu bench ...`: benchmarks that print one JSON object per measurement on stdout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail

app = typer.Typer(help="Benchmarks; each prints JSON lines on stdout.", no_args_is_help=True)


@app.command("core")
def core(
    quick: Annotated[
        bool, typer.Option("--quick", help="Only the small sizes: a few seconds in all.")
    ] = False,
    size: Annotated[
        list[str] | None,
        typer.Option(
            "--size",
            help="A size to run (repeatable): tiny, small, medium, wide, deep, hetero, large.",
        ),
    ] = None,
    policy: Annotated[
        str,
        typer.Option(help="Policy of the cycles: fairgpu, fifo or slurm-like (as `simulate`)."),
    ] = "fairgpu",
    repeats: Annotated[
        int | None,
        typer.Option(min=1, help="Cycles timed per size (default 20 small, 7 large)."),
    ] = None,
) -> None:
    """Time full scheduling cycles on synthetic snapshots; one JSON line per size."""
    from scheduler.bench import core as core_bench
    from scheduler.sim.config import POLICY_NAMES

    names = tuple(size) if size else (core_bench.QUICK if quick else core_bench.DEFAULT)
    unknown = [n for n in names if n not in core_bench.SIZES]
    if unknown:
        raise typer.BadParameter(f"unknown size(s): {', '.join(unknown)}", param_hint="--size")
    if policy not in POLICY_NAMES:
        choices = ", ".join(POLICY_NAMES)
        raise typer.BadParameter(
            f"unknown policy {policy} (choose {choices})", param_hint="--policy"
        )
    for row in core_bench.run(names, repeats, policy):
        typer.echo(json.dumps(row))


@app.command("api")
def api(
    database_url: Annotated[
        str | None,
        typer.Option(help="Use this PostgreSQL database as is (default: create and drop one)."),
    ] = None,
    postgres_url: Annotated[
        str,
        typer.Option(help="PostgreSQL server in which to create the throwaway database."),
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    workers: Annotated[int, typer.Option(min=1, max=32, help="Server processes.")] = 2,
    connections: Annotated[int, typer.Option(min=1, max=1024, help="Client connections.")] = 32,
    submit_s: Annotated[float, typer.Option(min=0, help="Seconds of job submissions.")] = 10.0,
    heartbeat_s: Annotated[float, typer.Option(min=0, help="Seconds of heartbeats.")] = 10.0,
    nodes: Annotated[int, typer.Option(min=1, help="Registered nodes sending heartbeats.")] = 1000,
    server_log: Annotated[
        Path | None, typer.Option(help="Write the server's output to this file.")
    ] = None,
) -> None:
    """Submissions/s and heartbeats/s with p50/p99 latency of a real server; one JSON line."""
    from scheduler.bench.api import run_api_bench

    result = run_api_bench(
        database_url=database_url,
        postgres_url=postgres_url,
        workers=workers,
        concurrency=connections,
        submit_s=submit_s,
        heartbeat_s=heartbeat_s,
        nodes=nodes,
        server_log=server_log,
    )
    typer.echo(json.dumps(result))


@app.command("latency")
def latency(
    jobs: Annotated[int, typer.Option(min=1, help="Jobs measured (after the warm-up).")] = 100,
    warmup: Annotated[int, typer.Option(min=0, help="Jobs run first and not measured.")] = 3,
    nodes: Annotated[int, typer.Option(min=1, max=16, help="Simulated agents.")] = 2,
    database_url: Annotated[
        str | None,
        typer.Option(help="An EMPTY database to use (PostgreSQL); default: a temporary SQLite."),
    ] = None,
    isolation: Annotated[
        str,
        typer.Option(
            help="The agents' --isolation: strict (as root: uid, cgroup, namespaces) or none."
        ),
    ] = "strict" if os.geteuid() == 0 else "none",
) -> None:
    """Submit → process start of 1-GPU jobs, one at a time, on an idle simulated cluster."""
    from scheduler.bench.latency import run_latency_bench

    if isolation not in ("strict", "none"):
        fail("--isolation must be strict or none", 2)
    result = run_latency_bench(
        jobs=jobs, warmup=warmup, nodes=nodes, database_url=database_url, isolation=isolation
    )
    typer.echo(json.dumps(result))


@app.command("interactive")
def interactive(
    sessions: Annotated[int, typer.Option(min=1, help="`run --pty` sessions measured.")] = 10,
    megabytes: Annotated[
        int, typer.Option(min=1, help="Megabytes sent each way through a port-forward.")
    ] = 200,
    database_url: Annotated[
        str | None,
        typer.Option(help="An EMPTY database to use (PostgreSQL); default: a temporary SQLite."),
    ] = None,
    replicas: Annotated[
        int,
        typer.Option(
            min=1,
            max=2,
            help="2: the agent reports to a second server replica, so every stream is relayed "
            "from one replica to the other (needs --database-url).",
        ),
    ] = 1,
) -> None:
    """Attach latency (`run --pty` start → the job's prompt) and relay throughput through one
    server process (`port-forward`), or across two replicas, on an idle simulated cluster; one
    JSON line."""
    from scheduler.bench.interactive import run_interactive_bench

    if replicas > 1 and database_url is None:
        fail("--replicas 2 needs --database-url (PostgreSQL: replicas share one database)", 2)
    result = run_interactive_bench(
        sessions=sessions, megabytes=megabytes, database_url=database_url, replicas=replicas
    )
    typer.echo(json.dumps(result))


@app.command("cli")
def cli_bench(
    runs: Annotated[int, typer.Option(min=1, help="Runs of each command.")] = 10,
    queue_jobs: Annotated[int, typer.Option(min=10, help="Held jobs in the queue.")] = 100,
) -> None:
    """Wall time of `fairgpu --help`, `submit --hold` and `queue` as fresh processes."""
    from scheduler.bench.cli import run_cli_bench

    typer.echo(json.dumps(run_cli_bench(runs=runs, queue_jobs=queue_jobs)))


@app.command("array")
def array(
    tasks: Annotated[int, typer.Option(min=1, max=10_000, help="Tasks in the array.")] = 10_000,
    runs: Annotated[int, typer.Option(min=1, help="Arrays submitted and cancelled.")] = 3,
    database_url: Annotated[
        str | None,
        typer.Option(help="An EMPTY database to use (PostgreSQL); default: a temporary SQLite."),
    ] = None,
) -> None:
    """Submit and cancel an array of 10,000 tasks on a real server, one request each."""
    from scheduler.bench.arrays import run_array_bench

    typer.echo(json.dumps(run_array_bench(tasks=tasks, runs=runs, database_url=database_url)))


@app.command("soak")
def soak(
    duration: Annotated[str, typer.Option(help="How long to run, with a unit: 90s, 10m.")] = "10m",
    nodes: Annotated[int, typer.Option(min=1, help="Simulated nodes (8 H100 each).")] = 500,
    rate: Annotated[float, typer.Option(min=0.1, help="Job submissions per second.")] = 3.0,
    fault_every: Annotated[
        str, typer.Option(help="Time between injected faults (server kill, DB restart, cut).")
    ] = "1m",
    seed: Annotated[int, typer.Option(help="Seed of the workload and fault choices.")] = 1,
) -> None:
    """A real server on a private PostgreSQL under load with a fault a minute; one JSON line.

    Exits 1 when a job was lost, an invariant broke or a request failed other than by a fault.
    """
    from cli.parse import parse_duration
    from scheduler.bench.soak import run_soak

    result = run_soak(
        duration_s=parse_duration(duration),
        nodes=nodes,
        rate_per_s=rate,
        fault_interval_s=parse_duration(fault_every),
        seed=seed,
    )
    typer.echo(json.dumps(result))
    if not result["ok"]:
        raise typer.Exit(1)
