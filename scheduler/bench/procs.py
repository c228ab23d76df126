"""Real processes for fault tests and the soak: a throwaway PostgreSQL, fairgpu servers, agents.

Everything runs on loopback. The PostgreSQL instance is our own (`initdb` + `pg_ctl` on a free
port, as the postgres user when we are root), so restarting it never disturbs the shared
server other tests use. Process start/stop reuses `cli.demo`'s helpers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from cli.demo import fairgpu_command, free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
READY_TIMEOUT_S = 60.0

# Fast clocks so that a fault shows within seconds, not minutes.
FAST_SERVER_ENV = {
    "FAIRGPU_CYCLE_INTERVAL_S": "0.5",
    "FAIRGPU_CYCLE_MIN_GAP_S": "0.1",
    "FAIRGPU_HEARTBEAT_INTERVAL_S": "1",
    "FAIRGPU_HEARTBEAT_LONG_POLL_S": "1",
    "FAIRGPU_LONG_POLL_RECHECK_S": "0.5",
    "FAIRGPU_POLICY_PREEMPTION_GRACE_S": "2",
    "FAIRGPU_POLICY_MIN_RUNTIME_S": "2",
    "FAIRGPU_NODE_TIMEOUT_S": "5",
    "FAIRGPU_LEASE_TIMEOUT_S": "5",
}


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError) as exc:
            last_error = exc
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last error: {last_error})")


class PgInstance:
    """A private PostgreSQL 15 cluster in a temporary directory, on a free loopback port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fairgpu-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._pg(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])

    def _pg(self, args: list[str]) -> None:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._pg(["pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._pg(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self._pg(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name])
        return self.url(name)

    def destroy(self) -> None:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Proc:
    """A started child with its log file; restartable under the same name."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process only (not its children): a crash, not a shutdown."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def terminate(self, timeout_s: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Fleet:
    """The processes of one test: servers and agents; `close` ends them and their children."""

    workdir: Path
    database_url: str
    server_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRGPU_")}
        return {**env, **extra}

    def bootstrap(self) -> str:
        """Migrate and create the first platform admin; returns its token."""
        env = self._env({"FAIRGPU_DATABASE_URL": self.database_url})
        out = subprocess.run(
            [*fairgpu_command(), "admin", "bootstrap", "--name", "admin"],
            env=env,
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def server(
        self, name: str = "server", port: int | None = None, log_level: str = "info", **env: str
    ) -> str:
        """Start (or restart) a server; returns its base URL once it is ready."""
        port = port or free_port()
        extra = {**FAST_SERVER_ENV, **self.server_env, **env}
        extra["FAIRGPU_DATABASE_URL"] = self.database_url
        args = [*fairgpu_command(), "server", "--host", "127.0.0.1", "--port", str(port)]
        proc = Proc(name, [*args, "--log-level", log_level], self._env(extra), self._log(name))
        self.procs[name] = proc
        proc.start()
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{name} ready", lambda: self._ready(url, proc), READY_TIMEOUT_S)
        return url

    def _ready(self, url: str, proc: Proc) -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

    def agent(
        self,
        name: str,
        server_url: str,
        join_token: str,
        gpus: str = "4xH100",
        extra: tuple[str, ...] = (),
    ) -> Proc:
        state = self.workdir / f"{name}-state"
        args = [
            *fairgpu_command(), "agent", "--server", server_url, "--join-token", join_token,
            "--simulate", gpus, "--name", name, "--state-dir", str(state),
            "--time-limit-grace-s", "1", "--log-level", "info", "--isolation", "none", *extra,
        ]  # fmt: skip
        proc = Proc(name, args, self._env({}), self._log(name))
        self.procs[name] = proc
        proc.start()
        return proc

    def _log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def close(self) -> None:
        everyone: list[psutil.Process] = []
        for proc in self.procs.values():
            if proc.alive():
                with suppress(psutil.Error):
                    everyone.extend(psutil.Process(proc.pid).children(recursive=True))
        for proc in reversed(list(self.procs.values())):
            proc.terminate(timeout_s=8)
        for child in everyone:  # job processes live in their own process groups
            with suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(everyone, timeout=3)
