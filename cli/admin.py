"""`fairgpu admin ...`: administration done directly on the database (bootstrap)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cli.common import DatabaseUrlOption, errors_as_lines, fail, load_settings
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.db.migrate import migrate_url
from scheduler.services.auth import bootstrap_admin
from scheduler.services.errors import DomainError
from scheduler.settings import Settings

app = typer.Typer(help="Administration directly on the database.", no_args_is_help=True)


async def _bootstrap(settings: Settings, name: str, force: bool) -> str:
    await migrate_url(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            issued = await bootstrap_admin(
                session, name=name, ttl_s=settings.token_ttl_s, force=force
            )
            await session.commit()
            return issued.secret
    finally:
        await engine.dispose()


@app.command()
def bootstrap(
    database_url: DatabaseUrlOption = None,
    name: Annotated[str, typer.Option(help="Name of the platform-admin user.")] = "admin",
    force: Annotated[
        bool, typer.Option("--force", help="Issue a token even if a platform admin exists.")
    ] = False,
) -> None:
    """Create the first platform-admin user and print its API token (shown once)."""
    settings = load_settings(database_url)
    with errors_as_lines():
        try:
            secret = asyncio.run(_bootstrap(settings, name, force))
        except DomainError as exc:
            fail(exc.detail)
    typer.echo(secret)
