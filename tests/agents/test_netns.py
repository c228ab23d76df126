"""The network wall between tasks (agents/netns.py), with real processes, namespaces and pasta,
as root: two orgs' tasks on one node, under strict isolation and under none.

An "outside" network namespace joined to the host by a veth pair stands in for the internet (no
real one here): a task in its own namespace must reach it through pasta, and reach nothing that
another task, or the node itself on loopback, listens on.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from agents import cgroups
from agents.forward import _connect
from agents.isolation import Confinement, IsolationConfig
from agents.netns import DNS_ADDRESS, Namespaces
from agents.netopen import open_namespaces
from agents.netwall import Wall
from agents.ports import PortRefused
from agents.runner import Runner, RunnerConfig
from agents.state import StateDir
from tests.agents.helpers import spec, wait_for
from tests.agents.test_isolation import ACME, PY, RIVAL, UID_BASE
from tests.harness.netns import remove_idle_walls, remove_orphans

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# TEST-NET-2: the "internet" stand-in's address, in a /30 of its own per test process, so that
# two runs on one host (other worktrees') route each to its own outside.
_NET = random.randrange(64) * 4
OUTSIDE, HOST_SIDE = f"198.51.100.{_NET + 2}", f"198.51.100.{_NET + 1}"

# Listens on TCP and UDP, on 127.0.0.1 and 0.0.0.0, at the ports in argv; answers each TCP
# connection and UDP datagram with its NAME; then writes READY ("-": $HOME/ready).
LISTENER = """
import socket, sys, threading
import os
name, ready, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
ready = ready if ready != "-" else os.path.join(os.environ["HOME"], "ready")
def tcp(host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen()
    return lambda: [(c := s.accept()[0]).sendall(name.encode()) or c.close() for _ in iter(int, 1)]
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port))
    def serve():
        while True:
            _, peer = s.recvfrom(100); s.sendto(name.encode(), peer)
    return serve
loops = [tcp("127.0.0.1", ports[0]), tcp("0.0.0.0", ports[1]),
         udp("127.0.0.1", ports[2]), udp("0.0.0.0", ports[3])]
for loop in loops:
    threading.Thread(target=loop, daemon=True).start()
open(ready, "w").close()
threading.Event().wait()
"""

# Tries each "tcp|udp HOST PORT" of argv and prints {target: what answered, or the error}.
PROBE = """
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    kind, host, port = target.split()
    try:
        if kind == "tcp":
            with socket.create_connection((host, int(port)), timeout=2) as c:
                out[target] = c.recv(100).decode()
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2); s.sendto(b"?", (host, int(port)))
                out[target] = s.recv(100).decode()
    except OSError as exc:
        out[target] = type(exc).__name__
print(json.dumps(out))
"""


def _free_ports(count: int) -> list[int]:
    """Ports free for TCP and UDP on the host (for the listeners in the node's namespace)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("0.0.0.0", 0))
            port = t.getsockname()[1]
            try:
                u.bind(("0.0.0.0", port))
            except OSError:
                continue
            if port not in ports:
                ports.append(port)
    return ports


def _host_address() -> str:
    """The node's own address on its default route (pasta copies it into each namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.200", 9))
        return str(s.getsockname()[0])


class NetNode:
    """One node's runner with network namespaces, strict or unconfined."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.root = tmp_path
        self.state = StateDir(tmp_path / "state")
        self.cgroup_parent = parent = f"fairgpu-test-{uuid.uuid4().hex[:8]}"
        namespaces, why = open_namespaces(self.state.root, cgroup_parent=parent)
        if namespaces is None:
            pytest.fail(f"this host cannot build network namespaces: {why}")
        self.namespaces = namespaces
        fields: dict[str, Any] = {"mode": mode, "task_root": tmp_path / "tasks"}
        if mode == "strict":
            fields |= {
                "task_uid_base": UID_BASE,
                "memory_per_gpu_bytes": 512 * 2**20,
                "cgroup_parent": parent,
                "dev_dir": tmp_path / "dev",
                "hide": (self.state.root,),
            }
        self.confinement = Confinement(
            IsolationConfig(**fields), total_gpus=4, namespaces=namespaces
        )
        self.runner = Runner(
            self.state, RunnerConfig(pty_attach_wait_s=0.2), confinement=self.confinement
        )

    def start_listener(self, task_id: int, name: str, ports: list[int], **fields: Any) -> None:
        ready = self.confinement.task_dir(task_id) / "ready"
        argv = [PY, "-c", LISTENER, name, "-", *map(str, ports)]
        self.runner.start(spec(task_id, argv, gpus=[task_id % 4], **fields))
        wait_for(lambda: ready.exists() or self._ended(task_id), 20)
        assert ready.exists(), self.result(task_id)

    def probe(self, task_id: int, targets: list[str], **fields: Any) -> dict[str, str]:
        self.runner.start(spec(task_id, [PY, "-c", PROBE, *targets], gpus=[0], **fields))
        result = self.result(task_id)
        assert result["state"] == "exited", result
        assert result["exit_code"] == 0, result
        found: dict[str, str] = json.loads(result["log"])
        return found

    def result(self, task_id: int, timeout_s: float = 30.0) -> dict[str, Any]:
        wait_for(lambda: self._ended(task_id), timeout_s)
        record = self.runner.records[task_id]
        return {
            "state": record.state,
            "exit_code": record.exit_code,
            "reason": record.reason,
            "log": self.state.read_log(record).decode(),
        }

    def task_processes_in_namespace(self, task_id: int) -> list[int]:
        inode = os.stat(self.namespaces.path(task_id)).st_ino
        found = []
        for pid in psutil.pids():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                    found.append(pid)
        return found

    def _ended(self, task_id: int) -> bool:
        self.runner.poll()
        return self.runner.records[task_id].state not in ("starting", "running")

    def close(self) -> None:
        for task_id, record in self.runner.records.items():
            if record.state in ("starting", "running"):
                self.runner.stop(task_id, grace_s=0, reason="test over")
                self.confinement.kill(task_id)
        for child in self.runner._children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        for task_id in self.runner.records:
            self.confinement.finish(task_id)
        if self.confinement.cgroups is not None:
            self.confinement.cgroups.remove()
        assert self.namespaces.sweep(set()) == []
        assert self.namespaces.wall.walled() == set()
        self.namespaces.close()
        assert not self.namespaces.wall.exists()
        assert not self.namespaces.pasta_cgroups.exists()
        # Nor the directory above, which only this test's agent had (the test's own parent).
        assert not self.namespaces.pasta_cgroups.parent.exists()


@pytest.fixture(params=["strict", "none"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetNode]:
    n = NetNode(tmp_path, request.param)
    yield n
    n.close()


@dataclass(frozen=True)
class Outside:
    namespace: str
    ports: list[int]


@pytest.fixture
def outside(outside_network: Outside) -> list[int]:
    """The ports the internet stand-in (`outside_network`) listens on."""
    return outside_network.ports


@pytest.fixture
def outside_network() -> Iterator[Outside]:
    """A network namespace beyond the node, joined to it by a veth pair: the internet stand-in,
    listening on TCP and UDP ports."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, far_if = f"fgtest-out-{tag}", f"fgo{tag}", f"fgi{tag}"
    base = 47000 + random.randrange(500) * 4
    ports = [base, base + 1, base + 2, base + 3]
    script = f"""
set -e
ip netns add {ns}
ip link add {host_if} type veth peer name {far_if}
ip link set {far_if} netns {ns}
ip addr add {HOST_SIDE}/30 dev {host_if}
ip link set {host_if} up
ip netns exec {ns} ip addr add {OUTSIDE}/30 dev {far_if}
ip netns exec {ns} ip link set {far_if} up
ip netns exec {ns} ip link set lo up
"""
    subprocess.run(["sh", "-c", script], check=True)
    ready = Path(f"/tmp/fgtest-outside-{tag}")  # noqa: S108
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, PY, "-c", LISTENER, "outside", str(ready), *map(str, ports)]
    )
    try:
        wait_for(ready.exists, 10)
        yield Outside(ns, ports)
    finally:
        server.kill()
        server.wait()
        ready.unlink(missing_ok=True)
        subprocess.run(["ip", "link", "delete", host_if], check=False)
        subprocess.run(["ip", "netns", "delete", ns], check=True)


@pytest.fixture
def node_address() -> Iterator[str]:
    """An address the node holds on an interface other than its default route's (a second NIC,
    docker0, IPoIB stand in): one end of a veth pair of its own, in a random 10.x /32; the
    same end also holds `node_address_v6(that address)`."""
    tag = uuid.uuid4().hex[:6]
    near, far = f"fga{tag}", f"fgb{tag}"
    address = f"10.{random.randrange(100, 200)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    script = f"""
set -e
ip link add {near} type veth peer name {far}
ip addr add {address}/32 dev {near}
ip addr add {node_address_v6(address)}/128 dev {near} nodad
ip link set {near} up
ip link set {far} up
"""
    subprocess.run(["sh", "-c", script], check=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "link", "delete", near], check=False)


def node_address_v6(address: str) -> str:
    """A unique-local IPv6 address made from the IPv4 one (fd99::10:a:b:c)."""
    return "fd99::" + ":".join(address.split("."))


def _targets(host: str, ports: list[int]) -> list[str]:
    return [
        f"tcp {host} {ports[0]}",
        f"tcp {host} {ports[1]}",
        f"udp {host} {ports[2]}",
        f"udp {host} {ports[3]}",
    ]


def test_a_private_task_reaches_no_other_tasks_listener_but_reaches_outside(
    node: NetNode, outside: list[int]
) -> None:
    host = _host_address()
    ports = _free_ports(4)
    node.start_listener(1, "acme-private", ports, network="private", **ACME)
    # The node's own loopback: a service of the operator's, or of a host-network task.
    with socket.socket() as local:
        local.bind(("127.0.0.1", 0))
        local.listen()
        node_port = local.getsockname()[1]
        targets = [
            *_targets("127.0.0.1", ports),
            *_targets(host, ports),
            f"tcp 127.0.0.1 {node_port}",
            *_targets(OUTSIDE, outside),
        ]
        tried = node.probe(2, targets, network="private", **RIVAL)
    assert not any(v == "acme-private" for v in tried.values()), tried
    # Nothing answers on the node's addresses, nor its loopback (no gateway mapping).
    for target in [*_targets("127.0.0.1", ports), *_targets(host, ports)]:
        assert tried[target] in ("ConnectionRefusedError", "TimeoutError"), (target, tried)
    assert tried[f"tcp 127.0.0.1 {node_port}"] == "ConnectionRefusedError", tried
    # Outbound works, TCP and UDP, as for downloading a data set (to what listens on the
    # outside's address: its loopback listeners are its own).
    for target in _targets(OUTSIDE, outside)[1::2]:
        assert tried[target] == "outside", (target, tried)
    # The rival's host-network task cannot reach the private one's listeners either.
    from_host = node.probe(3, _targets("127.0.0.1", ports) + _targets(host, ports), **RIVAL)
    assert not any(v == "acme-private" for v in from_host.values()), from_host


def test_with_network_host_another_org_can_connect(node: NetNode) -> None:
    """The documented opening: two host-network tasks share the node's network."""
    ports = _free_ports(4)
    node.start_listener(1, "acme-host", ports, network="host", **ACME)
    tried = node.probe(2, _targets("127.0.0.1", ports), network="host", **RIVAL)
    assert set(tried.values()) == {"acme-host"}, tried


def test_a_private_task_reaches_nothing_on_the_nodes_other_addresses(
    node: NetNode, node_address: str, outside: list[int]
) -> None:
    """pasta connects from the node's namespace: the wall (agents/netwall.py) keeps what it
    sends from every address the node holds, so what listens on 0.0.0.0 there (a host-network
    task of another org, the agent's metrics port, sshd) is out of a private task's reach."""
    ports = _free_ports(4)
    node.start_listener(1, "acme-host", ports, network="host", **ACME)
    # And over IPv6, which the table (family inet) walls as well.
    with socket.socket(socket.AF_INET6) as six:
        six.bind(("::", 0))
        six.listen()
        threading.Thread(target=_answer, args=(six, b"acme-host"), daemon=True).start()
        wildcard = [
            f"tcp {node_address} {ports[1]}",
            f"udp {node_address} {ports[3]}",
            f"tcp {node_address_v6(node_address)} {six.getsockname()[1]}",
        ]
        world = _targets(OUTSIDE, outside)[1::2]
        tried = node.probe(2, [*wildcard, *world], network="private", **RIVAL)
        for target in wildcard:
            assert tried[target] in ("ConnectionRefusedError", "TimeoutError"), (target, tried)
        for target in world:
            assert tried[target] == "outside", (target, tried)
        # What the wall keeps out is there: a host-network task reaches it, at the same ports.
        assert set(node.probe(3, wildcard, **RIVAL).values()) == {"acme-host"}


def test_nothing_on_the_node_can_send_into_a_private_tasks_udp_flow(
    node: NetNode, node_address: str, outside: list[int]
) -> None:
    """pasta receives a UDP flow's replies on a socket bound to 0.0.0.0 and the task's port:
    the wall drops what reaches it there from an address of the node (a host-network task of
    another org), while the outside's reply still comes in."""
    (port,) = _free_ports(1)
    code = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", {port}))
s.settimeout(5)
s.sendto(b"?", ("{OUTSIDE}", {outside[3]}))
print("reply:", s.recv(100).decode(), flush=True)
open(sys.argv[1], "w").close()
s.settimeout(3)
try:
    while True:
        print("got:", s.recv(100).decode(), flush=True)
except OSError:
    pass
"""
    ready = node.confinement.task_dir(1) / "ready"
    node.runner.start(spec(1, [PY, "-c", code, str(ready)], network="private", **ACME))
    wait_for(lambda: ready.exists() or node._ended(1), 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
        for host in ("127.0.0.1", node_address, _host_address()):
            for _ in range(3):
                intruder.sendto(b"intruder", (host, port))
    log = node.result(1)["log"]
    assert "reply: outside" in log, log
    assert "intruder" not in log, log


def test_each_pasta_is_walled_while_it_runs(node: NetNode) -> None:
    wall = node.namespaces.wall
    assert wall.exists()
    node.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
    wait_for(lambda: node.namespaces.pasta_pid(1) is not None)
    assert wall.walled() == {1}
    node.runner.stop(1, grace_s=0, reason="cancelled")
    node.result(1)
    assert wall.walled() == set()
    assert wall.exists()


def test_a_lost_wall_comes_back_whole_and_an_idle_agent_leaves_none(node: NetNode) -> None:
    wall = node.namespaces.wall
    node.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
    wait_for(lambda: node.namespaces.pasta_pid(1) is not None)
    assert not node.namespaces.close_if_idle()  # a pasta runs: its wall stays
    assert wall.walled() == {1}
    wall.remove()  # what `nft flush ruleset` does to it
    node.runner.start(spec(2, ["sleep", "60"], network="private", **RIVAL))
    wait_for(lambda: node.namespaces.pasta_pid(2) is not None)
    assert wall.walled() == {1, 2}  # made anew, with the running pasta's rule
    for task_id in (1, 2):
        node.runner.stop(task_id, grace_s=0, reason="cancelled")
        node.result(task_id)
    assert node.namespaces.close_if_idle()
    assert not wall.exists()


def test_pasta_is_charged_to_its_task_but_signalled_with_none_of_it(tmp_path: Path) -> None:
    """pasta counts against the task's memory, pids and CPU (a task cannot grow past its limits
    through it), yet is none of the processes its stop and warning signals go to."""
    node = NetNode(tmp_path, "strict")
    try:
        node.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
        wait_for(lambda: node.namespaces.pasta_pid(1) is not None)
        pasta = node.namespaces.pasta_pid(1)
        group = node.confinement.cgroup(1)
        assert pasta is not None
        assert group is not None
        wait_for(lambda: len(group.pids()) == 1)  # the sandbox has become `sleep`
        assert pasta not in group.pids()
        memberships = dict(
            line.split(":", 2)[1:] for line in Path(f"/proc/{pasta}/cgroup").read_text().split()
        )
        if isinstance(group, cgroups._V2Task):
            assert memberships[""].endswith("/task-1/helper"), memberships
            pids_current = group.path / "pids.current"
        else:
            assert isinstance(group, cgroups._V1Task)
            for controller in ("memory", "pids", "cpu"):
                assert memberships[controller].endswith("/task-1"), memberships
            assert not memberships["freezer"].endswith("/task-1"), memberships
            pids_current = group.paths["pids"] / "pids.current"
        assert int(pids_current.read_text()) == 2  # sleep and pasta
        node.confinement.signal(1, signal.SIGTERM)
        wait_for(lambda: group.pids() == [])  # the task is gone (not yet reaped by the runner)
        assert not _zombie(pasta)
        node.result(1)
        wait_for(lambda: _zombie(pasta))  # then it goes with the task's namespace
    finally:
        node.close()


def test_another_org_cannot_read_a_private_tasks_pasta_cgroup(tmp_path: Path) -> None:
    """pasta carries all of a private task's traffic, so the CPU time in its cgroup tells how
    much the task sends and receives: another org's task read it there (and pasta's pid, and
    which tasks have one) while it ran."""
    node = NetNode(tmp_path, "strict")
    try:
        node.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
        wait_for(lambda: node.namespaces.pasta_pid(1) is not None)
        pasta = node.namespaces.walled_pastas()[1]
        probe = f"""
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return type(exc).__name__
import os
print(attempt(lambda: open({str(pasta / "cpu.stat")!r}).read()),
      attempt(lambda: open({str(pasta / "cgroup.procs")!r}).read()),
      attempt(lambda: os.listdir({str(node.namespaces.pasta_cgroups)!r})))
"""
        node.runner.start(spec(2, [PY, "-c", probe], gpus=[1], network="host", **RIVAL))
        result = node.result(2)
        assert result["log"].split() == ["PermissionError"] * 3, result
    finally:
        node.close()


def test_a_private_task_gets_the_forwarded_resolver(node: NetNode) -> None:
    query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
    code = f"""
import socket
print(open("/etc/resolv.conf").read().split()[:2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(bytes.fromhex("{query.hex()}"), ("{DNS_ADDRESS}", 53))
try:
    print(s.recv(512)[:2].hex())
except OSError as exc:
    print(type(exc).__name__)
"""
    node.runner.start(spec(1, [PY, "-c", code], network="private", **ACME))
    lines = node.result(1)["log"].splitlines()
    assert lines[0] == f"['nameserver', '{DNS_ADDRESS}']", lines
    # The answer comes from the node's own resolver through pasta, when the node has one that
    # answers: asked directly, it must answer the namespace the same way.
    upstream = Path("/etc/resolv.conf").read_text().split("nameserver", 1)[-1].split()[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        try:
            s.sendto(query, (upstream, 53))
            answered = s.recv(512)[:2] == query[:2]
        except OSError:
            answered = False
    if answered:
        assert lines[1] == "abcd", lines


def test_the_namespace_and_pasta_end_with_the_task(node: NetNode) -> None:
    node.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
    wait_for(lambda: node.namespaces.pasta_pid(1) is not None)
    pasta = node.namespaces.pasta_pid(1)
    assert pasta is not None
    assert node.namespaces.exists(1)
    node.runner.stop(1, grace_s=0.2, reason="cancelled")
    assert node.result(1)["state"] == "stopped"
    assert not node.namespaces.exists(1)
    wait_for(lambda: not psutil.pid_exists(pasta) or _zombie(pasta))
    assert not (node.namespaces.etc_dir / node.namespaces.name(1)).exists()


def test_a_restarted_agent_removes_namespaces_whose_task_ended_meanwhile(node: NetNode) -> None:
    node.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
    node.runner.start(spec(2, ["sleep", "60"], network="private", **RIVAL))
    wait_for(lambda: None not in (node.namespaces.pasta_pid(1), node.namespaces.pasta_pid(2)))
    pasta_1 = node.namespaces.pasta_pid(1)
    assert pasta_1 is not None
    # The agent goes away; task 1 ends meanwhile. A namespace of a task the node never
    # recorded (a crash between making it and saving the record) is left behind too.
    record = node.runner.records[1]
    assert record.pid is not None
    node.confinement.kill(1)
    os.killpg(record.pid, signal.SIGKILL)
    node.runner._children[1].wait()
    node.namespaces.create(77)
    restarted = Runner(node.state, RunnerConfig(), confinement=node.confinement)
    restarted.recover()
    assert restarted.records[1].state not in ("starting", "running")
    assert not node.namespaces.exists(1)
    assert not node.namespaces.exists(77)
    wait_for(lambda: not psutil.pid_exists(pasta_1) or _zombie(pasta_1))
    assert node.namespaces.exists(2)
    assert node.namespaces.pasta_pid(2) is not None
    assert restarted.records[2].state == "running"
    # The restarted agent's wall is made anew, with the rule of the pasta still running.
    again, why = open_namespaces(node.state.root, cgroup_parent=node.cgroup_parent)
    assert again is not None, why
    assert again.wall.walled() == {2}


def test_port_forward_connects_inside_the_tasks_namespace(node: NetNode) -> None:
    ports = _free_ports(4)
    node.start_listener(1, "acme-private", ports, network="private", **ACME)
    # Someone else listens on the same port in the node's namespace: never the one reached.
    with socket.socket() as decoy:
        decoy.bind(("127.0.0.1", ports[0]))
        decoy.listen()
        task = node.runner.processes(1)
        assert task is not None
        assert task.netns == node.namespaces.path(1)
        conn = _connect(task, ports[0], task.pids())
        with conn:
            assert conn.recv(100) == b"acme-private"
        # A port that only the node's namespace has is not the task's.
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            with pytest.raises(PortRefused, match="nothing in job 101 listens"):
                _connect(task, other.getsockname()[1], task.pids())


# Listens on HOST:PORT, bound with IP_FREEBIND (any uid may: the address need not be the
# node's), answers each connection with "task"; then writes $HOME/ready.
FREEBIND_LISTENER = """
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
s.bind((host, port)); s.listen()
open(os.path.join(os.environ["HOME"], "ready"), "w").close()
while True:
    c = s.accept()[0]; c.sendall(b"task"); c.close()
"""


def test_port_forward_reaches_only_the_nodes_own_addresses(
    node: NetNode, outside_network: Outside, node_address: str
) -> None:
    """A host-network task that listened on another machine's address (IP_FREEBIND) had the
    agent connect there, as root from a port below 1024: the job's owner reached whatever the
    node reaches (an NFS server whose `secure` exports trust such ports, a metadata service)
    through its port-forward. Its own listener on one of the node's addresses is still reached."""
    port = outside_network.ports[1]  # the outside answers "outside" there
    argv = [PY, "-c", FREEBIND_LISTENER, OUTSIDE, str(port)]
    node.runner.start(spec(1, argv, gpus=[1], network="host", **ACME))
    wait_for(lambda: (node.confinement.task_dir(1) / "ready").exists(), 20)
    task = node.runner.processes(1)
    assert task is not None
    with (
        pytest.raises(PortRefused, match="nothing in job 101 listens"),
        _connect(task, port, task.pids()) as conn,
    ):
        pytest.fail(f"connected to {conn.getpeername()}: {conn.recv(100)!r}")
    [own] = _free_ports(1)
    argv = [PY, "-c", FREEBIND_LISTENER, node_address, str(own)]
    node.runner.start(spec(2, argv, gpus=[2], network="host", **ACME))
    wait_for(lambda: (node.confinement.task_dir(2) / "ready").exists(), 20)
    task = node.runner.processes(2)
    assert task is not None
    with _connect(task, own, task.pids()) as conn:
        assert conn.recv(100) == b"task"


def test_port_forward_finds_the_namespace_when_its_name_is_gone(node: NetNode) -> None:
    """An agent restarted in a mount namespace of its own (systemd's ProtectSystem) no longer
    sees the name's mount: it enters through one of the task's processes instead."""
    ports = _free_ports(4)
    node.start_listener(1, "acme-private", ports, network="private", **ACME)
    done = subprocess.run(
        ["umount", "--lazy", str(node.namespaces.path(1))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    task = node.runner.processes(1)
    assert task is not None
    assert task.netns is not None
    with _connect(task, ports[0], task.pids()) as conn:
        assert conn.recv(100) == b"acme-private"


def test_a_terminal_task_runs_inside_its_namespace(node: NetNode) -> None:
    host_ns = os.readlink("/proc/self/ns/net")
    node.runner.start(
        spec(1, ["sh", "-c", "readlink /proc/self/ns/net"], network="private", pty=True, **ACME)
    )
    log = node.result(1)["log"]
    assert "net:[" in log, log
    assert host_ns not in log, log


def test_a_node_without_namespaces_refuses_a_private_task_in_one_line(tmp_path: Path) -> None:
    confinement = Confinement(
        IsolationConfig(mode="none", task_root=tmp_path / "tasks"), no_namespaces="pasta missing"
    )
    runner = Runner(StateDir(tmp_path / "state"), confinement=confinement)
    runner.start(spec(1, ["true"], network="private"))
    record = runner.records[1]
    assert record.state == "failed_to_start"
    assert record.reason == (
        "this node cannot give the task a network of its own (pasta missing); submit with "
        "--network host to run in the node's network"
    )


def test_namespaces_of_two_agents_on_one_host_never_collide(tmp_path: Path) -> None:
    wall = Wall("unused", nft="nft", cgroup2=tmp_path)
    one = Namespaces(tmp_path / "a", pasta="pasta", ip="ip", wall=wall)
    two = Namespaces(tmp_path / "b", pasta="pasta", ip="ip", wall=wall)
    assert one.name(1) != two.name(1)
    assert one.name(1).startswith("fairgpu-")
    assert one.name(1).endswith("-1")


def _answer(server: socket.socket, name: bytes) -> None:
    """Answer each connection with `name` until the socket closes."""
    with contextlib.suppress(OSError):
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(name)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_session_janitor_removes_only_namespaces_without_a_process(node: NetNode) -> None:
    node.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
    wait_for(lambda: node.namespaces.pasta_pid(1) is not None)
    node.namespaces.create(2)  # made for a task that never started: nothing runs there
    orphan_pasta = node.namespaces.pasta_pid(2)
    assert orphan_pasta is not None
    wait_for(lambda: bool(node.task_processes_in_namespace(1)))
    old = time.time() - 600
    for task_id in (1, 2):
        os.utime(node.namespaces.resolv_conf(task_id).parent, (old, old))
    removed = remove_orphans()
    assert node.namespaces.name(2) in removed
    assert node.namespaces.name(1) not in removed
    assert not node.namespaces.exists(2)
    assert node.namespaces.exists(1)
    wait_for(lambda: not psutil.pid_exists(orphan_pasta) or _zombie(orphan_pasta))
    node.namespaces.remove(2)  # the agent's own record of it (its pid file) goes with the agent


def test_a_wall_just_built_is_left_by_the_session_janitor(tmp_path: Path) -> None:
    # Another test session's janitor (or this one's, in another worker) may run between an
    # agent building its wall and admitting its first pasta: the wall then has no rule and no
    # namespace, and only its agent's pasta cgroup directory, made just now, says it is in use.
    namespaces, why = open_namespaces(tmp_path / "state")
    assert namespaces is not None, why
    try:
        namespaces.close()  # as an agent that stopped idle, and now starts again
        namespaces.build_wall()
        assert namespaces.wall.table not in remove_idle_walls()
        assert namespaces.wall.exists()
    finally:
        namespaces.close()


def test_a_private_task_keeps_its_network_through_its_grace_period(
    node: NetNode, outside: list[int]
) -> None:
    """A job that uploads its checkpoint when told to stop still reaches the outside then:
    pasta is charged to the task, but none of its stop or warning signals reaches pasta."""
    code = f"""
import signal, socket, sys, time
def upload(*_):
    with socket.create_connection(("{OUTSIDE}", {outside[1]}), timeout=5) as c:
        print("after SIGTERM:", c.recv(100).decode(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, upload)
open(sys.argv[1], "w").close()
time.sleep(60)
"""
    ready = node.confinement.task_dir(1) / "ready"
    node.runner.start(spec(1, [PY, "-c", code, str(ready)], network="private", **ACME))
    wait_for(lambda: ready.exists(), 20)
    node.runner.stop(1, grace_s=20, reason="preempted")
    result = node.result(1)
    assert "after SIGTERM: outside" in result["log"], result
