"""Real fairgpu processes on this machine: the one harness of the demo, the benchmarks and the
tests. A `Fleet` starts servers and agents (each a restartable `Proc` with its log) and ends
them and their tasks; `PgInstance` is a throwaway PostgreSQL.

Everything runs on loopback. The PostgreSQL instance is our own (`initdb` + `pg_ctl` on a free
port, as the postgres user when we are root), so restarting it never disturbs the shared
server other tests use.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

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


class HarnessError(RuntimeError):
    """A process of the harness exited or never became ready; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fairgpu_command() -> list[str]:
    """This very installation's `fairgpu`, whatever PATH says."""
    script = Path(sys.executable).parent / "fairgpu"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cli.main import main; main()"]


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
    stopped: bool = False  # by kill() or terminate(): its exit is no failure (Fleet.check_alive)

    def start(self) -> None:
        self.stopped = False
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

    def kill(self, sig: signal.Signals = signal.SIGKILL, timeout_s: float = 15.0) -> int:
        """Signal the process only (not its children; SIGKILL: a crash, not a shutdown) and
        wait for it; returns its exit status."""
        assert self.popen is not None
        self.stopped = True
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout=timeout_s)

    def terminate(self, timeout_s: float = 10.0) -> None:
        self.stopped = True
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

    def last_lines(self, lines: int = 3) -> str:
        return " | ".join(self.tail(64 * 1024).strip().splitlines()[-lines:])


@dataclass
class Fleet:
    """The processes of one test: servers and agents; `close` ends them and their children."""

    workdir: Path
    database_url: str = ""
    """The servers' database (agents need none)."""
    server_env: dict[str, str] = field(default_factory=lambda: dict(FAST_SERVER_ENV))
    """Every server's FAIRGPU_* settings (with the database's URL and each start's own)."""
    procs: dict[str, Proc] = field(default_factory=dict)
    agent_states: list[Path] = field(default_factory=list)
    """The state directories of the agents started: their network namespaces go at close."""

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        """This environment less its FAIRGPU_* variables, plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRGPU_")}
        return {**env, **extra}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start `args` as `name` (its log: workdir/name.log), with this environment's
        variables less FAIRGPU_* plus `env`."""
        proc = Proc(name, args, self.env(env or {}), self._log(name))
        self.procs[name] = proc
        proc.start()
        return proc

    def check_alive(self) -> None:
        for proc in self.procs.values():
            if not proc.stopped and proc.popen is not None and proc.popen.poll() is not None:
                raise HarnessError(
                    f"{proc.name} exited with status {proc.popen.returncode}: {proc.last_lines()}"
                )

    def bootstrap(self) -> str:
        """Migrate and create the first platform admin; returns its token."""
        env = self.env({"FAIRGPU_DATABASE_URL": self.database_url})
        try:
            out = subprocess.run(
                [*fairgpu_command(), "admin", "bootstrap", "--name", "admin"],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=READY_TIMEOUT_S,
                cwd=self.workdir,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"admin bootstrap took over {READY_TIMEOUT_S:.0f} s") from exc
        if out.returncode != 0 or not out.stdout.strip():
            raise HarnessError(f"admin bootstrap failed: {out.stderr.strip() or out.stdout}")
        return out.stdout.strip().splitlines()[-1]

    def server(
        self,
        name: str = "server",
        port: int | None = None,
        log_level: str = "info",
        *,
        access_log: bool = True,
        wait: bool = True,
        **env: str,
    ) -> str:
        """Start (or restart) a server; returns its base URL, once it is ready unless `wait`
        is false (then call `wait_ready`)."""
        port = port or free_port()
        extra = {**self.server_env, **env, "FAIRGPU_DATABASE_URL": self.database_url}
        args = [*fairgpu_command(), "server", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--log-level", log_level, *([] if access_log else ["--no-access-log"])]
        self.start(name, args, extra)
        url = f"http://127.0.0.1:{port}"
        if wait:
            self.wait_ready(url, name)
        return url

    def wait_ready(self, url: str, name: str = "server") -> None:
        """Until the server `name` at `url` answers /readyz; HarnessError if it exits first."""
        proc = self.procs[name]

        def ready() -> bool:
            if not proc.alive():
                raise HarnessError(f"{proc.name} exited: {proc.tail()}")
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

        try:
            wait_for(f"{name} ready", ready, READY_TIMEOUT_S)
        except TimeoutError as exc:
            raise HarnessError(f"{exc}: {proc.last_lines()}") from exc

    def agent(
        self,
        name: str,
        server_url: str,
        join_token: str,
        gpus: str = "4xH100",
        extra: tuple[str, ...] = (),
        *,
        site: str | None = None,
        metrics_port: int | None = None,
        isolation: str = "none",
        log_level: str = "info",
        time_limit_grace_s: float | None = 1.0,
    ) -> Proc:
        """Start `fairgpu agent` with simulated GPUs (its state: workdir/NAME-state unless
        `extra` names another --state-dir); `site` also names its domain SITE-rack1;
        `time_limit_grace_s` None leaves the agent's default."""
        state = self.workdir / f"{name}-state"
        self.agent_states.append(state)
        args = [
            *fairgpu_command(), "agent", "--server", server_url, "--join-token", join_token,
            "--simulate", gpus, "--name", name, "--state-dir", str(state),
            "--log-level", log_level, "--isolation", isolation,
        ]  # fmt: skip
        if time_limit_grace_s is not None:
            args += ["--time-limit-grace-s", f"{time_limit_grace_s:g}"]
        if site is not None:
            args += ["--site", site, "--domain", f"{site}-rack1"]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port), "--metrics-addr", "127.0.0.1"]
        return self.start(name, [*args, *extra])

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
        # An agent killed earlier (a test of its death) left its tasks re-parented to init, out
        # of reach of `children`: they still name their agent's state directory.
        everyone.extend(_started_under(self.agent_states))
        for child in everyone:  # job processes live in their own process groups
            with suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(everyone, timeout=3)
        from agents.netopen import remove_all

        for state in self.agent_states:  # their network namespaces, as the agent would
            remove_all(state)


def _started_under(roots: list[Path]) -> list[psutil.Process]:
    """The processes whose command line names a path under one of `roots`, and their
    descendants."""
    prefixes = tuple(str(root.resolve()) + os.sep for root in roots)
    if not prefixes:
        return []
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid():
            continue
        if any(arg.startswith(prefixes) for arg in proc.info["cmdline"] or ()):
            found[proc.pid] = proc
            with suppress(psutil.Error):
                found.update((child.pid, child) for child in proc.children(recursive=True))
    return list(found.values())
