"""Two companies on one strict node: a real server, a `fairgpu agent --isolation strict` process
as root with mknod GPU device files, and jobs submitted through the CLI. What one org's job tries
against the other's comes back through `fairgpu logs`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from scheduler.bench.procs import fairgpu_command
from tests.harness.served import Served, wait_for
from tests.harness.strict_agent import end_strict_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")
PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
# A range of 1,000 uids of this test process's own (its clean-up kills every process in it):
# runs from two checkouts, or two xdist workers, never share one.
UID_BASE = 2_000_000 + (os.getpid() % 10_000) * 1_000
RIVAL_UID = UID_BASE + 900
DISK_MAX_BYTES = 32 * 2**20


class Pool:
    def __init__(self, served: Served, tmp_path: Path) -> None:
        self.served = served
        self.tmp = tmp_path
        self.dev = tmp_path / "dev"
        self.dev.mkdir()
        for minor in range(4):
            os.mknod(self.dev / f"nvidia{minor}", 0o666 | stat.S_IFCHR, os.makedev(195, minor))
            os.chmod(self.dev / f"nvidia{minor}", 0o666)
        self.state = tmp_path / "state"
        self.tokens: dict[str, str] = {}
        self.org_ids: dict[str, int] = {}
        for org in ("acme", "rival"):
            created = _one(served.ok("org", "create", org, "-o", "json"))
            self.org_ids[org] = created["id"]
            served.ok("quota", "set", org, "--gpu-type", "H100", "--guaranteed", "2")
            user = _one(
                served.ok("user", "create", f"{org}-eng", "--org", org, "--token", "-o", "json")
            )
            self.tokens[org] = user["token"]
            (tmp_path / "data" / org).mkdir(parents=True)
        self.cgroup_parent = f"fairgpu-e2e-{uuid.uuid4().hex[:8]}"
        join = _one(served.ok("join-token", "create", "-o", "json"))["token"]
        self.log = (tmp_path / "agent.log").open("wb")
        self.agent = subprocess.Popen(
            [
                *fairgpu_command(), "agent", "--server", served.url, "--join-token", join,
                "--simulate", "4xH100", "--name", "shared-node", "--state-dir", str(self.state),
                "--isolation", "strict", "--gpu-dev-dir", str(self.dev),
                "--org-root", str(tmp_path / "data" / "{org}"),
                # acme's uid from the base and its id (in the task spec), rival's from a map.
                "--task-uid-base", str(UID_BASE), "--org-uid", f"rival={RIVAL_UID}",
                "--task-pids-max", "128", "--cgroup-parent", self.cgroup_parent,
                "--task-disk-max-bytes", str(DISK_MAX_BYTES), "--disk-check-interval-s", "0.5",
                "--log-level", "warning",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FAIRGPU_SERVER": "", "FAIRGPU_TOKEN": ""},
        )  # fmt: skip

    def submit(self, org: str, *args: str) -> str:
        return self.served.ok(
            "submit", "--parsable", "-G", "H100:1", "-t", "5m", *args, token=self.tokens[org]
        ).strip()

    def job(self, org: str, job_id: str) -> dict[str, object]:
        return _one(self.served.ok("describe", job_id, "-o", "json", token=self.tokens[org]))

    def wait_state(self, org: str, job_id: str, states: set[str], timeout_s: float = 30) -> None:
        wait_for(lambda: self.job(org, job_id)["state"] in states, timeout_s)

    def close(self) -> None:
        end_strict_agent(
            self.agent,
            self.log,
            uids=range(UID_BASE, UID_BASE + 1000),
            state=self.state,
            cgroup_parent=self.cgroup_parent,
        )


@pytest.fixture
def pool(served: Served, tmp_path: Path) -> Iterator[Pool]:
    p = Pool(served, tmp_path)
    yield p
    p.close()


def test_two_orgs_on_one_strict_node(pool: Pool) -> None:
    secret = f"acme-secret-{uuid.uuid4().hex}"
    acme = pool.submit(
        "acme", "-e", f"ACME_KEY={secret}", "--", "sh", "-c", "echo up > $HOME/notes; sleep 120"
    )
    pool.wait_state("acme", acme, {"RUNNING"})
    acme_uid = UID_BASE + pool.org_ids["acme"]

    def acme_sleeps() -> list[int]:
        return [
            p.pid for p in psutil.process_iter(["uids", "name"])
            if p.info["uids"] and p.info["uids"].real == acme_uid and p.info["name"] == "sleep"
        ]  # fmt: skip

    # RUNNING is reported once the task's first process runs: its `sh` may not have started
    # `sleep` yet.
    wait_for(acme_sleeps)
    [victim] = acme_sleeps()
    probe = f"""
import json, os, signal
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return type(exc).__name__
mine = set(os.environ["CUDA_VISIBLE_DEVICES"].split(","))
print(json.dumps({{
    "uid": os.getuid(),
    "environ": attempt(lambda: open("/proc/{victim}/environ").read()),
    "signal": attempt(lambda: os.kill({victim}, signal.SIGTERM)),
    "credential": attempt(lambda: open("{pool.state}/credential.json").read()),
    "state": attempt(lambda: os.listdir("{pool.state}/tasks")),
    "other_gpus": sorted({{attempt(lambda: os.close(os.open("{pool.dev}/nvidia" + str(i),
                                                             os.O_RDWR)))
                          for i in range(4) if str(i) not in mine}}),
    "acme_files": attempt(lambda: os.listdir("{pool.tmp}/data/acme")),
}}))
"""
    rival = pool.submit("rival", "--", PY, "-c", probe)
    pool.wait_state("rival", rival, {"COMPLETED", "FAILED"})
    out = pool.served.ok("logs", rival, token=pool.tokens["rival"])
    tried = json.loads(out.strip().splitlines()[-1])
    assert tried == {
        "uid": RIVAL_UID,
        "environ": "FileNotFoundError",  # hidden: /proc shows the task its own processes
        "signal": "PermissionError",
        "credential": "FileNotFoundError",  # the agent's state directory is hidden
        "state": "FileNotFoundError",
        "other_gpus": ["PermissionError"],
        "acme_files": tried["acme_files"],
    }
    assert tried["acme_files"] in ("PermissionError", "FileNotFoundError")
    assert secret not in out
    assert pool.job("acme", acme)["state"] == "RUNNING"
    assert psutil.pid_exists(victim)

    # A workdir outside the org's roots fails that job alone, with the reason in describe.
    refused = pool.submit("rival", "--workdir", "/etc", "--", "true")
    pool.wait_state("rival", refused, {"FAILED"})
    described = pool.served.ok("describe", refused, token=pool.tokens["rival"])
    assert "outside the data roots allowed to org rival" in described

    # A memory hog held to its --mem dies alone, FAILED with the reason.
    hog = pool.submit(
        "rival", "--mem", "96M", "--", PY, "-c",
        "x = []\nwhile True:\n    x.append(bytearray(16 * 2**20))\n",
    )  # fmt: skip
    pool.wait_state("rival", hog, {"FAILED"})
    assert "out of memory" in pool.served.ok("describe", hog, token=pool.tokens["rival"])
    assert pool.job("acme", acme)["state"] == "RUNNING"

    # A fork bomb holds its own pids limit; the node keeps heartbeating and starting work.
    bomb = pool.submit(
        "rival", "--", PY, "-c",
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork() or time.sleep(300)\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n",
    )  # fmt: skip
    pool.wait_state("rival", bomb, {"RUNNING"})
    time.sleep(2)
    beat = _last_heartbeat(pool)
    after = pool.submit("rival", "--", "echo", "still here")
    pool.wait_state("rival", after, {"COMPLETED"}, timeout_s=30)
    assert _last_heartbeat(pool) > beat
    pool.served.ok("cancel", bomb, token=pool.tokens["rival"])
    pool.wait_state("rival", bomb, {"CANCELLED"})
    rival_uid = RIVAL_UID
    wait_for(
        lambda: not [
            p for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real == rival_uid
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ]
    )  # fmt: skip


def test_a_job_filling_the_disk_fails_alone(pool: Pool) -> None:
    acme = pool.submit("acme", "--", "sleep", "120")
    pool.wait_state("acme", acme, {"RUNNING"})
    beat = _last_heartbeat(pool)
    fill = pool.submit(
        "rival", "--", PY, "-c",
        "import os\n"
        "fd = os.open('fill', os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "while True:\n"
        "    os.write(fd, os.urandom(2**20))\n"
        "    os.fsync(fd)\n",
    )  # fmt: skip
    pool.wait_state("rival", fill, {"FAILED", "COMPLETED", "CANCELLED"})
    described = pool.served.ok("describe", fill, token=pool.tokens["rival"])
    assert pool.job("rival", fill)["state"] == "FAILED"
    assert "disk limit: the task holds" in described
    assert "over its limit of 32.0 MiB" in described
    assert pool.job("acme", acme)["state"] == "RUNNING"
    wait_for(lambda: _last_heartbeat(pool) > beat)


def test_a_host_network_task_cannot_take_the_agents_source_port(pool: Pool) -> None:
    """The agent reaches its server from a port below ip_unprivileged_port_start
    (agents/srcport.py), which a task in the node's network cannot bind: holding every
    ephemeral port of the node no longer cuts the node off (tests/agents/test_srcport.py
    exhausts them in a namespace of its own)."""
    server_port = urlsplit(pool.served.url).port
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())

    def agent_ports() -> list[int]:
        return [
            conn.laddr.port for conn in psutil.Process(pool.agent.pid).net_connections("tcp")
            if conn.raddr and conn.raddr.port == server_port
        ]  # fmt: skip

    wait_for(agent_ports)
    assert all(start - 512 <= port < start for port in agent_ports()), agent_ports()
    [source, *_] = agent_ports()
    probe = f"""
import json, socket
def bind(port):
    try:
        socket.socket().bind(("0.0.0.0", port))
        return "bound"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({{"agents": bind({source}),
                   "range": sorted({{bind(port) for port in range({start - 512}, {start})}})}}))
"""
    rival = pool.submit("rival", "--network", "host", "--", PY, "-c", probe)
    pool.wait_state("rival", rival, {"COMPLETED", "FAILED"})
    out = pool.served.ok("logs", rival, token=pool.tokens["rival"])
    assert json.loads(out.strip().splitlines()[-1]) == {
        "agents": "PermissionError",
        "range": ["PermissionError"],
    }


def _one(out: str) -> dict[str, Any]:
    """The object a `-o json` command printed (alone, or as a list of one)."""
    value = json.loads(out)
    if isinstance(value, list):
        [value] = value
    return value  # type: ignore[no-any-return]


def _last_heartbeat(pool: Pool) -> str:
    nodes = json.loads(pool.served.ok("node", "list", "-o", "json"))
    [node] = nodes if isinstance(nodes, list) else nodes["data"]
    return str(node["last_heartbeat_at"])
