"""`fairgpu server`: the HTTP API and the scheduling service, served by uvicorn."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from cli.common import DatabaseUrlOption, load_settings
from scheduler.process import SchedulerProcess


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
            help="HTTP worker processes (PostgreSQL only).",
        ),
    ] = 1,
    scheduler_process: Annotated[
        bool | None,
        typer.Option(
            "--scheduler-process/--no-scheduler-process",
            help="Run the scheduler in a process of its own beside the HTTP workers "
            "(PostgreSQL; default: on when --workers > 1).",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="Serve HTTPS with this certificate (PEM, chain included).",
            envvar="FAIRGPU_TLS_CERT",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(help="The private key of --tls-cert.", envvar="FAIRGPU_TLS_KEY"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
) -> None:
    """Serve the API (and run the scheduler) until interrupted."""
    if (tls_cert is None) != (tls_key is None):
        typer.echo("fairgpu: error: --tls-cert and --tls-key go together", err=True)
        raise typer.Exit(2)
    settings = load_settings(database_url)
    separate = workers > 1 if scheduler_process is None else scheduler_process
    if settings.is_sqlite and (workers > 1 or separate):
        flag = "--workers > 1" if workers > 1 else "--scheduler-process"
        typer.echo(f"fairgpu: error: {flag} needs PostgreSQL", err=True)
        raise typer.Exit(2)
    # Workers build their own app from FAIRGPU_* variables: pass the URL on through them.
    os.environ["FAIRGPU_DATABASE_URL"] = settings.database_url
    metrics_dir: str | None = None
    if workers > 1 or separate:
        # Set before any worker starts (they read it on import): each scrape, whichever worker
        # answers it, sums every process's instruments. A directory of the operator's choosing
        # is emptied first: values of an earlier run would be added to this one's.
        given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if given:
            for stale in Path(given).glob("*.db"):
                stale.unlink(missing_ok=True)
        else:
            metrics_dir = tempfile.mkdtemp(prefix="fairgpu-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    scheduler: SchedulerProcess | None = None
    if separate:
        scheduler = SchedulerProcess(log_level=log_level)
        scheduler.start()
        os.environ["FAIRGPU_RUN_SCHEDULER"] = "false"  # read by the HTTP workers only
    try:
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
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
        )
    finally:
        if scheduler is not None:
            scheduler.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
