"""A real fairgpu on loopback for the deploy tests: `fairgpu server` on SQLite and simulated agents.

Every piece is the installed `fairgpu` command in its own process, as an operator runs it; the
tests only talk HTTP to it. Timings are shortened through the same FAIRGPU_* settings an operator
would use, so that a reclaim or a node timeout happens within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

from agents.netopen import remove_all

FAST_SETTINGS = {
    "FAIRGPU_CYCLE_INTERVAL_S": "1",
    "FAIRGPU_CYCLE_MIN_GAP_S": "0.2",
    "FAIRGPU_HEARTBEAT_INTERVAL_S": "1",
    "FAIRGPU_HEARTBEAT_LONG_POLL_S": "1",
    "FAIRGPU_POLICY_PREEMPTION_GRACE_S": "1",
    "FAIRGPU_POLICY_MIN_RUNTIME_S": "2",
    "FAIRGPU_NODE_TIMEOUT_S": "30",
}
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fairgpu() -> list[str]:
    """The `fairgpu` of the interpreter running the tests."""
    script = Path(sys.executable).parent / "fairgpu"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def wait_until(what: str, check: Any, timeout_s: float, on_fail: Any = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_fail() if on_fail else ""
            raise AssertionError(f"{what} did not happen in {timeout_s:.0f} s. {detail}")
        time.sleep(0.2)


@dataclass
class Agent:
    name: str
    state_dir: Path
    metrics_url: str

    def inject(self, *faults: str) -> None:
        """Faults for the simulated GPUs: `xid INDEX CODE` or `lost INDEX` (read and consumed)."""
        (self.state_dir / "simulate-faults").write_text("".join(f"{f}\n" for f in faults))


@dataclass
class Stack:
    workdir: Path
    url: str = ""
    admin_token: str = ""
    agents: list[Agent] = field(default_factory=list)
    _procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRGPU_")}
        return {
            **env,
            **FAST_SETTINGS,
            "FAIRGPU_DATABASE_URL": f"sqlite:///{self.workdir / 'fairgpu.db'}",
        }

    def spawn(self, name: str, args: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [*fairgpu(), *args], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            cwd=self.workdir, start_new_session=True,
        )  # fmt: skip
        self._procs.append((name, proc, log))

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name} log:\n" + "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc, _ in self._procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n{self.log_tail(name)}")

    def admin(self) -> httpx.Client:
        return self.client(self.admin_token)

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10.0
        )

    def start_server(self) -> None:
        boot = subprocess.run(
            [*fairgpu(), "admin", "bootstrap", "--name", "admin"],
            env=self.env(), cwd=self.workdir, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert boot.returncode == 0, boot.stderr
        self.admin_token = boot.stdout.strip().splitlines()[-1]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.spawn(
            "server",
            ["server", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
             "--no-access-log"],
        )  # fmt: skip

        def ready() -> bool:
            self.check_alive()
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("server ready", ready, START_TIMEOUT_S, lambda: self.log_tail("server"))

    def start_agents(self, nodes: list[tuple[str, str, str]]) -> None:
        """(name, site, simulate spec) per node; returns when every node is ready."""
        with self.admin() as http:
            reply = http.post("/v1/join-tokens", json={"name": "tests", "uses": len(nodes)})
            assert reply.status_code == 201, reply.text
            join_token = reply.json()["token"]
        for name, site, spec in nodes:
            port = free_port()
            agent = Agent(name, self.workdir / name, f"http://127.0.0.1:{port}/metrics")
            agent.state_dir.mkdir()
            self.agents.append(agent)
            self.spawn(
                name,
                ["agent", "--server", self.url, "--join-token", join_token, "--simulate", spec,
                 "--name", name, "--site", site, "--state-dir", str(agent.state_dir),
                 "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
                 "--time-limit-grace-s", "1", "--log-level", "warning", "--isolation", "none"],
            )  # fmt: skip

        def all_ready() -> bool:
            self.check_alive()
            with self.admin() as http:
                nodes_now: list[dict[str, Any]] = http.get("/v1/nodes").json()["data"]
            return sum(bool(n["state"] == "ready") for n in nodes_now) == len(nodes)

        wait_until("agents registered", all_ready, START_TIMEOUT_S)

    def org(self, name: str, quotas: dict[str, tuple[int, int | None]], shares: float = 1) -> str:
        """Create an org with {gpu_type: (guaranteed, limit)} and a member; the member's token."""
        with self.admin() as http:
            created = http.post("/v1/orgs", json={"name": name, "shares": shares})
            assert created.status_code == 201, created.text
            for gpu_type, (guaranteed, limit) in quotas.items():
                body = {"guaranteed": guaranteed, "limit": limit}
                reply = http.put(f"/v1/orgs/{name}/quota/{gpu_type}", json=body)
                assert reply.status_code in (200, 201), reply.text
            user = http.post("/v1/users", json={"name": f"{name}-user", "org": name})
            assert user.status_code == 201, user.text
            token = http.post("/v1/tokens", json={"name": "t", "user_id": user.json()["id"]})
            assert token.status_code == 201, token.text
            secret: str = token.json()["token"]
            return secret

    def submit(self, token: str, **job: Any) -> int:
        with self.client(token) as http:
            reply = http.post("/v1/jobs", json=job)
            assert reply.status_code == 201, reply.text
            job_id: int = reply.json()["id"]
            return job_id

    def stop(self) -> None:
        """Agents first, then the server; job processes are their own groups: kill those too."""
        for _, proc, _ in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, log in self._procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            log.close()
        for agent in self.agents:
            _kill_recorded_tasks(agent.state_dir)
            remove_all(agent.state_dir)


def _kill_recorded_tasks(state_dir: Path) -> None:
    """Kill the job process groups an agent leaves running when it stops (it does by design)."""
    for record_file in state_dir.glob("tasks/*/record.json"):
        try:
            record = json.loads(record_file.read_text())
            pid, started = record.get("pid"), record.get("pid_create_time")
            if pid and started and abs(psutil.Process(pid).create_time() - started) < 1:
                os.killpg(pid, signal.SIGKILL)
        except (ValueError, OSError, psutil.Error):
            pass


@contextmanager
def running_stack(workdir: Path, nodes: list[tuple[str, str, str]]) -> Iterator[Stack]:
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir)
    try:
        stack.start_server()
        stack.start_agents(nodes)
        yield stack
    finally:
        stack.stop()


def scrape(url: str) -> str:
    reply = httpx.get(url, timeout=10.0)
    reply.raise_for_status()
    return reply.text
