"""`fairgpu admin ...`: administration done directly on the database (bootstrap, secret keys)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cli.common import DatabaseUrlOption, errors_as_lines, fail, load_settings
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.db.migrate import migrate_url
from scheduler.secretenv import HOW_TO_CONFIGURE, generate_key, settings_cipher
from scheduler.services.auth import bootstrap_admin
from scheduler.services.errors import DomainError
from scheduler.services.secretkeys import rotate_secret_env
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


@app.command("gen-secret-key")
def gen_secret_key() -> None:
    """Print a new key for FAIRGPU_SECRET_KEYS (it encrypts jobs' --secret-env at rest)."""
    typer.echo(generate_key())


async def _rotate(settings: Settings) -> tuple[int, list[int]]:
    secret_cipher = settings_cipher(settings)
    assert secret_cipher is not None
    engine = make_engine(settings.database_url)
    rotated, unreadable = 0, []
    try:
        after: int | None = 0
        while after is not None:
            async with make_sessionmaker(engine)() as session:
                result, after = await rotate_secret_env(
                    session, secret_cipher=secret_cipher, after_id=after
                )
                await session.commit()
            rotated += result.rotated
            unreadable += result.unreadable
    finally:
        await engine.dispose()
    return rotated, unreadable


@app.command("rotate-secrets")
def rotate_secrets(database_url: DatabaseUrlOption = None) -> None:
    """Re-encrypt every job's secret_env with the first key of FAIRGPU_SECRET_KEYS.

    Run it after putting a new key first and before dropping an old one from the list.
    """
    settings = load_settings(database_url)
    if settings.secret_keys is None:
        fail(f"no secret keys: {HOW_TO_CONFIGURE}")
    with errors_as_lines():
        rotated, unreadable = asyncio.run(_rotate(settings))
    typer.echo(f"re-encrypted the secrets of {rotated} job(s)")
    if unreadable:
        shown = ", ".join(str(i) for i in unreadable[:20])
        fail(f"{len(unreadable)} job(s) have secrets no listed key decrypts: {shown}")
