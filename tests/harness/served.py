"""The real server on loopback for tests that speak HTTP to it (the CLI, agents, WebSockets):
`create_app` served by uvicorn on 127.0.0.1 in a thread. tests/cli's `served` fixture uses it.

Each test gets a clean database (SQLite and PostgreSQL through `database_url`), a platform admin
with a token written straight into the database (as `fairgpu admin bootstrap` would), and `cli`,
which runs `fairgpu ARGS...` through Typer's CliRunner with FAIRGPU_SERVER / FAIRGPU_TOKEN set.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from typer.testing import CliRunner, Result

from api.app import create_app
from api.routers.streams import UVICORN_WEBSOCKETS
from cli.main import app as cli_app
from scheduler.bench.procs import Fleet, Proc
from scheduler.db import User
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.services.tokens import issue_token
from scheduler.settings import Settings
from scheduler.states import Role, TokenKind
from tests.conftest import run_async


def seed_admin(database_url: str, name: str = "root") -> str:
    """A platform admin and its token, the way `fairgpu admin bootstrap` makes them."""

    async def seed() -> str:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                user = User(name=name, org_id=None, role=Role.PLATFORM_ADMIN)
                session.add(user)
                await session.flush()
                issued = await issue_token(session, kind=TokenKind.USER, name="t", user_id=user.id)
                await session.commit()
                return issued.secret
        finally:
            await engine.dispose()

    return run_async(seed)


@dataclass
class Served:
    url: str
    admin_token: str
    config_dir: Path
    runner: CliRunner = field(default_factory=CliRunner)

    def env(self, token: str | None = None, server: str | None = None) -> dict[str, str]:
        return {
            "FAIRGPU_SERVER": server or self.url,
            "FAIRGPU_TOKEN": token or self.admin_token,
            "FAIRGPU_CONFIG_DIR": str(self.config_dir),
            "COLUMNS": "200",
        }

    def run(self, *args: str, token: str | None = None, server: str | None = None) -> Result:
        return self.runner.invoke(cli_app, list(args), env=self.env(token, server))

    def ok(self, *args: str, token: str | None = None) -> str:
        result = self.run(*args, token=token)
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.stdout


def serve(database_url: str, tmp_path: Path) -> Iterator[Served]:
    """The server of `served`; settings not given here come from FAIRGPU_* variables."""
    settings = Settings(
        database_url=database_url,
        migrate_on_start=False,
        cycle_interval_s=0.5,
        # An agent whose heartbeat is held for less than its interval waits out the rest before
        # the next one: at the default 10 s interval a new task reached it up to 9 s late.
        heartbeat_interval_s=1.0,
        heartbeat_long_poll_s=1.0,
    )
    token = seed_admin(database_url)
    with serve_app(create_app(settings)) as url:
        yield Served(url=url, admin_token=token, config_dir=tmp_path / "config")


@contextmanager
def serve_app(app: Any, **config: Any) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread; yields its URL (https when
    `config` carries a certificate) and stops it on the way out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    scheme = "https" if config.get("ssl_certfile") else "http"
    url = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", **{**UVICORN_WEBSOCKETS, **config})
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "server thread died"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not callable(predicate) or not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def get_json(url: str, path: str, token: str) -> object:
    return httpx.get(url + path, headers={"Authorization": f"Bearer {token}"}).json()


@contextmanager
def simulated_agent(served: Served, tmp_path: Path, *extra: str) -> Iterator[Proc]:
    """A real `fairgpu agent` process with two simulated H100s (node `n1`, no isolation) joined
    to `served`; `extra` agent options are added. Its output goes to tmp_path/n1.log; on the way
    out it is stopped and its tasks' processes are killed."""
    join = json.loads(served.ok("join-token", "create", "-o", "json"))["token"]
    fleet = Fleet(workdir=tmp_path)
    try:
        yield fleet.agent(
            "n1", served.url, join, "2xH100", extra, log_level="warning", time_limit_grace_s=None
        )
    finally:
        fleet.close()
