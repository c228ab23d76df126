"""`fairgpu db ...`: migrate the database and check it against the models."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cli.common import DatabaseUrlOption, errors_as_lines, fail, load_settings
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.db.migrate import check_schema, current_revision, head_revisions, migrate_url
from scheduler.services.invariants import InvariantReport, check_invariants

app = typer.Typer(help="Database schema: upgrade, downgrade, check.", no_args_is_help=True)


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    database_url: DatabaseUrlOption = None,
) -> None:
    """Migrate the database up to REVISION (default: the newest)."""
    settings = load_settings(database_url)
    with errors_as_lines():
        asyncio.run(migrate_url(settings.database_url, "upgrade", revision))
    typer.echo(f"database at {revision}")


@app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, or 'base' for empty.")],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Migrate the database down to REVISION."""
    settings = load_settings(database_url)
    with errors_as_lines():
        asyncio.run(migrate_url(settings.database_url, "downgrade", revision))
    typer.echo(f"database at {revision}")


async def _check(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        return await check_schema(engine)
    finally:
        await engine.dispose()


@app.command()
def check(database_url: DatabaseUrlOption = None) -> None:
    """Exit non-zero when the migrated schema and the models differ."""
    settings = load_settings(database_url)
    with errors_as_lines():
        problems = asyncio.run(_check(settings.database_url))
    if problems:
        for problem in problems:
            typer.echo(problem, err=True)
        fail(f"schema differs from the models in {len(problems)} place(s)")
    typer.echo(f"schema matches the models (head {', '.join(head_revisions())})")


async def _current(url: str) -> tuple[str, ...]:
    engine = make_engine(url)
    try:
        return await current_revision(engine)
    finally:
        await engine.dispose()


@app.command()
def current(database_url: DatabaseUrlOption = None) -> None:
    """Print the database's revision."""
    settings = load_settings(database_url)
    with errors_as_lines():
        revs = asyncio.run(_current(settings.database_url))
    typer.echo(", ".join(revs) or "(empty database)")


async def _invariants(url: str) -> InvariantReport:
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as session:
            return await check_invariants(session)
    finally:
        await engine.dispose()


@app.command()
def invariants(database_url: DatabaseUrlOption = None) -> None:
    """Check the stored state against fairgpu's invariants; exit non-zero on any violation."""
    settings = load_settings(database_url)
    with errors_as_lines():
        report = asyncio.run(_invariants(settings.database_url))
    checked = ", ".join(f"{n} {what}" for what, n in sorted(report.checked.items()))
    for violation in report.violations:
        typer.echo(violation, err=True)
    if not report.ok:
        fail(f"{len(report.violations)} invariant violation(s) (checked {checked})")
    typer.echo(f"all invariants hold (checked {checked})")
