"""`fairgpu simulate`: replay a job trace through the scheduling core under several policies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.common import DatabaseUrlOption
from scheduler.sim.config import POLICY_NAMES, SimConfig, TimeLimitModel

if TYPE_CHECKING:
    from scheduler.sim.engine import ProgressFn


def simulate(
    trace: Annotated[
        Path | None, typer.Option(help="Trace CSV: job_id, submit_time_s, duration_s, ...")
    ] = None,
    quotas: Annotated[
        Path | None, typer.Option(help="Quotas CSV: tenant, gpus (guaranteed GPUs per tenant).")
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Node groups, comma-separated, as SITE:NODESxGPUSxTYPE/DOMAINS (site, type and "
            "domains optional), e.g. a:176x8xH100/2; default: one 8-GPU node per 8 guaranteed GPUs."
        ),
    ] = None,
    time_scale: Annotated[
        float, typer.Option(help="Divide submit times by K to add contention.", min=0.001)
    ] = 1.0,
    big_gangs: Annotated[
        int | None,
        typer.Option(
            help="Add 64- and 128-GPU gangs to the trace at the Philly README's rates, drawn "
            "with this seed (the same seed gives the same gangs)."
        ),
    ] = None,
    big_gang_rate_factor: Annotated[
        float, typer.Option(help="With --big-gangs: multiply their rates by F.", min=0.0)
    ] = 1.0,
    fit_guarantees: Annotated[
        bool,
        typer.Option(
            "--fit-guarantees",
            help="Scale each GPU type's guarantees down in proportion when they add up to more "
            "than the cluster holds (shares unchanged); the report says by what factor.",
        ),
    ] = False,
    policy: Annotated[
        list[str] | None,
        typer.Option(help=f"Policy to run (repeatable): {', '.join(POLICY_NAMES)}; default all."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for summary.json, report.md, plots.")] = Path(
        "sim-out"
    ),
    time_limit: Annotated[
        TimeLimitModel, typer.Option(help="Time limit users ask: exact, factor or hour.")
    ] = TimeLimitModel.HOUR,
    time_limit_factor: Annotated[
        float, typer.Option(help="Duration x this with --time-limit factor.", min=0.01)
    ] = 1.5,
    checkpoint_interval_s: Annotated[
        float, typer.Option(help="A preempted job keeps the work up to its last checkpoint.", min=1)
    ] = 1_800.0,
    cycle_interval_s: Annotated[
        float | None,
        typer.Option(
            help="Least virtual time between scheduling cycles, start to start (default 1 s: "
            "the server cycles on every event, no closer than 4x its last cycle's duration).",
            min=0.001,
        ),
    ] = None,
    half_life_s: Annotated[
        float, typer.Option(help="Half-life of decayed usage for fair share.", min=1)
    ] = 7 * 86_400.0,
    from_db_: Annotated[
        bool,
        typer.Option(
            "--from-db",
            help="Replay the jobs recorded in the server's database under the proposed --quotas "
            "(org, gpu_type, guaranteed, limit[, shares]) and compare with what happened.",
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(help="With --from-db: replay jobs submitted since, e.g. 30d or 2026-11-01."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="With --from-db: ... and before this time (default: now)."),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Simulate a trace (or the server's own history) under each policy and write a report."""
    # Imported here: numpy and matplotlib would slow every other `fairgpu` command's start.
    from scheduler.sim.report import headline_rows
    from scheduler.sim.runner import BigGangs, compare, load_workload, write_outputs
    from scheduler.sim.trace import TraceError

    console = Console(stderr=True)
    policies = policy or list(POLICY_NAMES)
    unknown = sorted(set(policies) - set(POLICY_NAMES))
    if unknown:
        raise typer.BadParameter(f"unknown policy {', '.join(unknown)}", param_hint="--policy")
    if from_db_:
        from cli.simulate_db import simulate_from_db

        if trace is not None or time_scale != 1.0 or big_gangs is not None or fit_guarantees:
            raise typer.BadParameter(
                "--from-db replays recorded jobs: no --trace, --time-scale, --big-gangs, "
                "--fit-guarantees"
            )
        if quotas is None or since is None:
            raise typer.BadParameter("--from-db needs --since and --quotas (the proposed set)")
        simulate_from_db(
            database_url=database_url,
            since=since,
            until=until,
            quotas=quotas,
            cluster=cluster,
            policies=policies,
            out=out,
            config=_config(checkpoint_interval_s, cycle_interval_s, half_life_s),
        )
        return
    if trace is None or quotas is None:
        raise typer.BadParameter("--trace and --quotas are both required")
    config = SimConfig(
        time_limit_model=time_limit,
        time_limit_factor=time_limit_factor,
        checkpoint_interval_s=checkpoint_interval_s,
        half_life_s=half_life_s,
    )
    if cycle_interval_s is not None:
        config = dataclasses.replace(config, cycle_interval_s=cycle_interval_s)
    try:
        gangs = None if big_gangs is None else BigGangs(big_gangs, big_gang_rate_factor)
        workload = load_workload(trace, quotas, cluster, time_scale, gangs, fit_guarantees)
    except (TraceError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    for warning in workload.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    with progress_bars(console, len(workload.trace)) as track:
        comparison = compare(workload, policies, config, progress=track)
    inputs = {**workload.description, "policies": policies, **_config_inputs(config)}
    write_outputs(out, inputs, comparison, workload)
    table = Table(title=f"{trace.name} x{time_scale:g} on {workload.description['gpus']:,} GPUs")
    table.add_column("figure")
    for name in policies:
        table.add_column(name, justify="right")
    for row in headline_rows(comparison.summaries):
        table.add_row(*row)
    Console().print(table)
    console.print(f"wrote {out}/summary.json, report.md and plots")


def _config_inputs(config: SimConfig) -> dict[str, object]:
    return {
        "time_limit": str(config.time_limit_model),
        "time_limit_factor": config.time_limit_factor,
        "checkpoint_interval_s": config.checkpoint_interval_s,
        "cycle_interval_s": config.cycle_interval_s,
        "half_life_s": config.half_life_s,
    }


def _config(
    checkpoint_interval_s: float, cycle_interval_s: float | None, half_life_s: float
) -> SimConfig:
    """`--from-db` jobs carry their own time limits; the time-limit model does not apply."""
    config = SimConfig(checkpoint_interval_s=checkpoint_interval_s, half_life_s=half_life_s)
    if cycle_interval_s is not None:
        config = dataclasses.replace(config, cycle_interval_s=cycle_interval_s)
    return config


@contextmanager
def progress_bars(console: Console, total_jobs: int) -> Iterator[Callable[[str], ProgressFn]]:
    """One bar per policy: jobs finished and the simulated day."""
    with Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} jobs · day {task.fields[day]:.1f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:

        def track(name: str) -> ProgressFn:
            task = progress.add_task(name, total=total_jobs, day=0.0)

            def update(now_s: float, finished: int) -> None:
                progress.update(task, completed=finished, day=now_s / 86_400)

            return update

        yield track
