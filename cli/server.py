"""`fairgpu server`: the HTTP API and the scheduling service, served by uvicorn."""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from uvicorn.supervisors import Multiprocess

from api.app import create_server_app
from api.headlimits import bounded_http
from api.routers.streams import UVICORN_WEBSOCKETS
from cli.common import DatabaseUrlOption, load_settings
from scheduler.process import SchedulerProcess


def server(
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on (default: FAIRGPU_HOST, else 127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Port to listen on (default: FAIRGPU_PORT, else 8080)."
        ),
    ] = None,
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
    settings = settings.model_copy(
        update={"host": host or settings.host, "port": settings.port if port is None else port}
    )
    if settings.metrics_token is None and not _is_loopback(settings.host):
        typer.echo(
            "fairgpu: /metrics answers only this machine's processes of this user or root: set "
            "FAIRGPU_METRICS_TOKEN and give Prometheus the same token to scrape from elsewhere",
            err=True,
        )
    separate = workers > 1 if scheduler_process is None else scheduler_process
    if settings.is_sqlite and (workers > 1 or separate):
        flag = "--workers > 1" if workers > 1 else "--scheduler-process"
        typer.echo(f"fairgpu: error: {flag} needs PostgreSQL", err=True)
        raise typer.Exit(2)
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
    if workers > 1 and settings.server_relay_url is None:
        # The workers share the users' port: each takes a loopback port of its own for the
        # interactive streams the others hand over (api/relaylisten.py).
        settings = settings.model_copy(update={"server_relay_url": "http://127.0.0.1:0"})
    scheduler: SchedulerProcess | None = None
    if separate:
        scheduler = SchedulerProcess(settings, log_level=log_level)
        scheduler.start()
        settings = settings.model_copy(update={"run_scheduler": False})
    try:
        _serve(
            uvicorn.Config(
                partial(create_server_app, settings),
                factory=True,
                host=settings.host,
                port=settings.port,
                workers=workers,
                log_level=log_level,
                access_log=access_log,
                loop="uvloop",
                http=bounded_http(read_timeout_s=settings.request_read_timeout_s),
                lifespan="on",
                timeout_graceful_shutdown=10,
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
                **UVICORN_WEBSOCKETS,
                ssl_certfile=str(tls_cert) if tls_cert else None,
                ssl_keyfile=str(tls_key) if tls_key else None,
            )
        )
    finally:
        if scheduler is not None:
            scheduler.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


WORKER_HEALTHCHECK_S = 30
"""How long uvicorn's supervisor waits for a worker's answer to its ping before it kills the
worker as hung. A new worker answers only once it has imported the app (fastapi, SQLAlchemy,
the routers): uvicorn's 5 s default killed every worker of `--workers 2`, again and again,
at load 11 on two cores, and the server never served."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(config: uvicorn.Config) -> None:
    """uvicorn.run's serving part, for an app factory bound to its settings (a partial):
    uvicorn.run takes only an import string when there are several workers, and that would
    leave the workers to read their settings from the environment."""
    if config.workers > 1:
        # The config, factory and settings included, is pickled to each worker process; the
        # supervisor handles Ctrl-C itself and returns.
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise typer.Exit(3)  # uvicorn has logged why (the port taken, the lifespan failed)
