"""`fairgpu simulate --from-db`: the cluster's own history under a proposed quota set."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.common import errors_as_lines, fail, load_settings
from cli.parse import parse_since
from scheduler.sim.config import SimConfig
from scheduler.sim.history import History


async def read_window(database_url: str, since: datetime, until: datetime) -> History:
    """One short read-only transaction; the engine is gone before any simulation starts."""
    from sqlalchemy import text

    from scheduler.db.engine import make_engine, make_sessionmaker
    from scheduler.sim.fromdb import read_history

    engine = make_engine(database_url, pool_size=1)
    try:
        async with make_sessionmaker(engine)() as session:
            # The first statement begins the transaction; on PostgreSQL it makes it one
            # consistent snapshot that cannot write. SQLite (WAL) reads one snapshot anyway.
            if engine.dialect.name == "postgresql":
                await session.execute(
                    text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                )
            try:
                return await read_history(session, since=since, until=until)
            finally:
                await session.rollback()  # nothing to keep
    finally:
        await engine.dispose()


def simulate_from_db(
    *,
    database_url: str | None,
    since: str,
    until: str | None,
    quotas: Path,
    cluster: str | None,
    policies: Sequence[str],
    out: Path,
    config: SimConfig,
) -> None:
    from cli.simulate import progress_bars
    from scheduler.sim.proposed import load_proposed_quotas
    from scheduler.sim.report import headline_rows
    from scheduler.sim.runner import write_outputs
    from scheduler.sim.trace import TraceError
    from scheduler.sim.whatif import compare_whatif, whatif_workload

    now = datetime.now(UTC)
    start, end = parse_since(since, now), parse_since(until, now) if until else now
    if start >= end:
        fail(f"empty window: --since {since} is not before --until {until or 'now'}", 2)
    settings = load_settings(database_url)
    try:
        proposed = load_proposed_quotas(quotas)
    except (TraceError, OSError) as exc:
        fail(str(exc), 2)
    with errors_as_lines():
        history = asyncio.run(read_window(settings.database_url, start, end))
    try:
        workload = whatif_workload(history, proposed, quotas, cluster, config)
    except TraceError as exc:
        fail(str(exc), 2)
    console = Console(stderr=True)
    with progress_bars(console, len(workload.trace)) as track:
        comparison = compare_whatif(history, workload, policies, config, progress=track)
    inputs = {**workload.description, "policies": list(policies)}
    inputs.update(
        checkpoint_interval_s=config.checkpoint_interval_s,
        cycle_interval_s=config.cycle_interval_s,
        half_life_s=config.half_life_s,
    )
    write_outputs(out, inputs, comparison)
    table = Table(
        title=f"{len(workload.trace):,} recorded jobs from {inputs['since']} on "
        f"{inputs['gpus']:,} GPUs, under {quotas.name}"
    )
    table.add_column("figure")
    for summary in comparison.summaries:
        table.add_column(summary["policy"], justify="right")
    for row in headline_rows(comparison.summaries):
        table.add_row(*row)
    Console().print(table)
    left_out = ", ".join(f"{n} {why}" for why, n in history.left_out.items())
    if left_out:
        console.print(f"not replayed: {left_out}")
    if history.censored:
        console.print(f"{history.censored} job(s) still running: replayed as if they ended now")
    typer.echo(f"wrote {out}/summary.json, report.md and plots", err=True)
