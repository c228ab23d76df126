"""`fairgpu demo`: the whole system on this machine, in about a minute and a half.

A server on a temporary SQLite file, four agents with simulated GPUs in two sites, three
organisations with quotas, and a time-compressed Philly-shaped workload; the scenario in
`cli/demo_run.py` makes sure a gang, a backfill and a reclaim preemption happen. Every process
it starts is stopped in `finally`, also on Ctrl-C, and their children with them.
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated

import httpx
import psutil
import typer

from cli.common import fail

SERVER_START_S = 30.0
AGENTS_READY_S = 30.0

# The demo's cluster: two sites, two nodes each.
NODES = (
    ("h100-a1", "site-a", "8xH100"),
    ("h100-a2", "site-a", "8xH100"),
    ("a100-b1", "site-b", "8xA100-80GB"),
    ("a100-b2", "site-b", "8xA100-80GB"),
)

# Short cycles, grace and minimum runtime so that preemption fits in a one-minute demo.
SERVER_ENV = {
    "FAIRGPU_CYCLE_INTERVAL_S": "1",
    "FAIRGPU_CYCLE_MIN_GAP_S": "0.2",
    "FAIRGPU_HEARTBEAT_INTERVAL_S": "2",
    "FAIRGPU_HEARTBEAT_LONG_POLL_S": "2",
    "FAIRGPU_POLICY_PREEMPTION_GRACE_S": "2",
    "FAIRGPU_POLICY_MIN_RUNTIME_S": "4",
    "FAIRGPU_NODE_TIMEOUT_S": "30",
}


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


@dataclass
class Processes:
    """Children started by the demo; `stop_all` ends them and anything they started."""

    workdir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.commands[name] = (args, env)
        log = (self.workdir / f"{name}.log").open("ab")  # a restarted process appends
        self.logs.append(log)
        proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the rest in order
        )
        self.procs.append((name, proc))
        return proc

    def proc(self, name: str) -> subprocess.Popen[bytes]:
        return next(p for n, p in reversed(self.procs) if n == name)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL, timeout_s: float = 15.0) -> int:
        """Signal one process (not its tasks) and wait for it; returns its exit status."""
        proc = self.proc(name)
        self.procs.remove((name, proc))
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=timeout_s)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start a process killed with `kill` again, with the same command and environment."""
        args, env = self.commands[name]
        return self.start(name, args, env)

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = self.tail(name)
                fail(f"{name} exited with status {proc.returncode}: {tail}")

    def tail(self, name: str, lines: int = 3) -> str:
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop_all(self, timeout_s: float = 8.0) -> None:
        """Agents first (SIGTERM stops their tasks' reports), then the server; then stragglers."""
        everyone: list[psutil.Process] = []
        for _, proc in self.procs:
            with suppress(psutil.Error):
                everyone.extend(psutil.Process(proc.pid).children(recursive=True))
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for child in everyone:  # job processes: their own process groups, so signal each
            with suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(everyone, timeout=3)
        for log in self.logs:
            log.close()


@dataclass(frozen=True)
class Cluster:
    nodes: int
    url: str
    admin_token: str
    agent_metrics: list[str]
    workdir: Path
    server_ready_s: float
    procs: Processes

    def wait_nodes(self) -> None:
        """Block until every agent has registered its GPUs and the node is ready."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        with httpx.Client(base_url=self.url, headers=headers) as http:
            _wait_nodes(http, self.procs, self.nodes)


@contextmanager
def cluster(
    workdir: Path,
    *,
    nodes: Sequence[tuple[str, str, str]] = NODES,
    server_env: Mapping[str, str] = SERVER_ENV,
    database_url: str | None = None,
    agent_args: Sequence[str] = ("--time-limit-grace-s", "2"),
    isolation: str = "none",
) -> Iterator[Cluster]:
    """Server + bootstrap + join token + agents (name, site, --simulate), all stopped on the way
    out. The demo's cluster by default; tests and benchmarks pass their own. Under strict
    isolation (as root) tasks reach their directories beside the agents' state through
    `workdir`, which must then be traversable (0711)."""
    cgroup_parent = f"fairgpu-{workdir.name}"  # this cluster's own, removed on the way out
    if isolation == "strict":
        os.chmod(workdir, 0o711)  # noqa: S103 - traversable, not listable
        agent_args = (*agent_args, "--cgroup-parent", cgroup_parent)
    db_url = database_url or f"sqlite:///{workdir / 'fairgpu.db'}"
    env = {**os.environ, **server_env, "FAIRGPU_DATABASE_URL": db_url}
    env.pop("FAIRGPU_SERVER", None)
    env.pop("FAIRGPU_TOKEN", None)
    procs = Processes(workdir)
    cmd = fairgpu_command()
    t0 = time.monotonic()
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server_args = [*cmd, "server", "--host", "127.0.0.1", "--port", str(port)]
        procs.start("server", [*server_args, "--log-level", "warning", "--no-access-log"], env)
        # Bootstrap while the server starts: both migrate, and migrating is safe to race.
        boot = subprocess.Popen(
            [*cmd, "admin", "bootstrap", "--name", "admin"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=workdir,
        )
        try:
            out, err = boot.communicate(timeout=SERVER_START_S)
        finally:
            if boot.poll() is None:
                boot.kill()
                boot.wait()
        if boot.returncode != 0 or not out.strip():
            fail(f"admin bootstrap failed: {err.strip() or out.strip()}")
        token = out.strip().splitlines()[-1]
        _wait_healthy(url, procs)
        ready_s = time.monotonic() - t0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            join = http.post("/v1/join-tokens", json={"name": "demo", "uses": len(nodes)})
            if join.status_code != 201:
                fail(f"could not create a join token: {join.status_code} {join.text[:200]}")
            join_token = join.json()["token"]
        metrics = []
        agent_env = {k: v for k, v in env.items() if k != "FAIRGPU_DATABASE_URL"}
        for name, site, gpus in nodes:
            mport = free_port()
            metrics.append(f"http://127.0.0.1:{mport}/metrics")
            procs.start(
                name,
                [
                    *cmd, "agent", "--server", url, "--join-token", join_token,
                    "--simulate", gpus, "--name", name, "--site", site,
                    "--domain", f"{site}-rack1", "--state-dir", str(workdir / name),
                    "--metrics-port", str(mport), "--metrics-addr", "127.0.0.1",
                    "--log-level", "warning", "--isolation", isolation, *agent_args,
                ],
                agent_env,
            )  # fmt: skip
        yield Cluster(
            nodes=len(nodes),
            url=url,
            admin_token=token,
            agent_metrics=metrics,
            workdir=workdir,
            server_ready_s=ready_s,
            procs=procs,
        )
    finally:
        procs.stop_all()
        if isolation == "strict":
            from agents.cgroups import CgroupError, open_hierarchy

            with suppress(CgroupError):
                open_hierarchy(cgroup_parent).remove()


def _wait_healthy(url: str, procs: Processes) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    fail(f"the server did not become ready in {SERVER_START_S:.0f} s: {procs.tail('server')}")


def _wait_nodes(http: httpx.Client, procs: Processes, expected: int) -> None:
    deadline = time.monotonic() + AGENTS_READY_S
    ready = 0
    while time.monotonic() < deadline:
        procs.check_alive()
        nodes = http.get("/v1/nodes").json().get("data", [])
        ready = sum(1 for n in nodes if n["state"] == "ready" and n["gpus_total"] > 0)
        if ready == expected:
            return
        time.sleep(0.1)
    fail(f"only {ready} of {expected} agents registered in {AGENTS_READY_S:.0f} s")


def demo(
    seed: Annotated[int, typer.Option(help="Seed of the generated workload.")] = 3,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temporary directory (database, logs).")
    ] = False,
    live: Annotated[
        bool, typer.Option(help="Live queue display (off: a line per event, for logs).")
    ] = True,
    workload_s: Annotated[
        float, typer.Option(min=20, max=90, help="Seconds of submissions (compressed trace).")
    ] = 45.0,
) -> None:
    """Run the whole system here: a server, four simulated GPU nodes, three orgs, a workload."""
    from cli.demo_run import run_scenario

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-demo-"))
    typer.echo(f"fairgpu demo: starting a server and 4 agents (work dir {workdir})")
    isolation = "strict" if os.geteuid() == 0 else "none"
    if isolation == "none":
        typer.echo(
            "warning: not root, so the agents run with --isolation none: tasks are not "
            "confined (docs/ISOLATION.md)"
        )
    try:
        with cluster(workdir, isolation=isolation) as c:
            typer.echo(f"server ready in {c.server_ready_s:.1f} s at {c.url}; agents starting")
            run_scenario(c, seed=seed, live=live, workload_s=workload_s, started=started)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: everything the demo started has been stopped", err=True)
        raise typer.Exit(130) from None
    finally:
        if keep:
            typer.echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    typer.echo(f"demo finished in {time.monotonic() - started:.0f} s; nothing left running")
