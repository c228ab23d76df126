"""`fairgpu server`: the HTTP API and the scheduling service, served by uvicorn."""

from __future__ import annotations

import os
from typing import Annotated

import typer
import uvicorn

from cli.common import DatabaseUrlOption, load_settings


def server(
    host: Annotated[
        str, typer.Option(help="Address to listen on.", envvar="FAIRGPU_HOST")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", envvar="FAIRGPU_PORT")] = 8080,
    database_url: DatabaseUrlOption = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Server processes (PostgreSQL only; one of them holds the scheduler lease).",
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
) -> None:
    """Serve the API (and run the scheduler) until interrupted."""
    settings = load_settings(database_url)
    if workers > 1 and settings.is_sqlite:
        typer.echo("fairgpu: error: --workers > 1 needs PostgreSQL", err=True)
        raise typer.Exit(2)
    # Workers build their own app from FAIRGPU_* variables: pass the URL on through them.
    os.environ["FAIRGPU_DATABASE_URL"] = settings.database_url
    uvicorn.run(
        "api.app:create_server_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=access_log,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
