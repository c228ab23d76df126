"""What the wall (agents/netwall.py) keeps out of a private task's pasta from other machines, as
root, with real namespaces, pasta and an "outside" network namespace behind a veth pair."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from agents.isolation import IsolationConfig, task_uid_ranges
from agents.netwall import NODE_SERVICE_PORTS, Wall, cgroup2_mount
from tests.agents.helpers import spec, wait_for
from tests.agents.test_isolation import ACME, PY, RIVAL, UID_BASE
from tests.agents.test_netns import (  # noqa: F401 - the fixtures
    HOST_SIDE,
    OUTSIDE,
    NetNode,
    Outside,
    _free_ports,
    _host_address,
    node,
    outside_network,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# In the task: a UDP flow to the outside's listener (argv: its port), then 4 s of listening on
# the flow's socket, printing what arrives.
FLOW = """
import socket, sys
port, peer_port, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
s.settimeout(5)
s.sendto(b"?", ("%s", peer_port))
print("reply:", s.recv(100).decode(), flush=True)
open(ready, "w").close()
s.settimeout(4)
try:
    while True:
        print("got:", s.recv(100).decode(), flush=True)
except OSError:
    pass
"""


def test_no_other_machine_can_send_into_a_private_tasks_udp_flow(
    node: NetNode,  # noqa: F811
    outside_network: Outside,  # noqa: F811
) -> None:
    """pasta receives the flow's replies on a socket bound to the node's addresses at the
    task's port: only the flow's peer (its address and port) gets through, not another port of
    the same machine nor another machine."""
    ports = outside_network.ports
    (port,) = _free_ports(1)
    ready = node.confinement.task_dir(1) / "ready"
    code = FLOW % OUTSIDE
    node.runner.start(
        spec(1, [PY, "-c", code, str(port), str(ports[3]), str(ready)], network="private", **ACME)
    )
    wait_for(lambda: ready.exists() or node._ended(1), 20)
    intruder = f"""
import socket
for source in (0, {ports[0]}):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("{OUTSIDE}", source))
        for _ in range(3):
            s.sendto(b"intruder", ("{HOST_SIDE}", {port}))
"""
    namespace = outside_network.namespace
    subprocess.run(["ip", "netns", "exec", namespace, PY, "-c", intruder], check=True)
    log = node.result(1)["log"]
    assert "reply: outside" in log, log
    assert "intruder" not in log, log


def test_a_released_rule_is_its_pastas_alone_whatever_happened_to_the_table(
    tmp_path: Path,
) -> None:
    """`release` deletes by the handle nft echoed when the rule was added: a table made anew
    since (new handles), or a rule removed by someone else, never costs another pasta its rule."""
    cgroup2 = cgroup2_mount()
    assert cgroup2 is not None
    wall = Wall(f"fairgpu-t{uuid.uuid4().hex[:7]}", nft="nft", cgroup2=cgroup2)
    base = cgroup2 / f"fairgpu-test-{uuid.uuid4().hex[:8]}"
    cgroups = {task: base / f"pasta-{task}" for task in (1, 2, 3, 4)}
    for cgroup in cgroups.values():
        cgroup.mkdir(parents=True)
    try:
        wall.install([], {})
        for task in (1, 2):
            wall.admit(task, cgroups[task])
        wall.install([], {2: cgroups[2], 3: cgroups[3]})  # anew: every handle is another
        wall.admit(4, cgroups[4])
        wall.release(1)  # gone with the old table
        assert wall.walled() == {2, 3, 4}
        wall.release(3)
        assert wall.walled() == {2, 4}
        for chain in ("pastas", "flows"):
            subprocess.run(["nft", "flush", "chain", "inet", wall.table, chain], check=True)
        wall.admit(2, cgroups[2])  # someone removed the rules; the check puts them back
        wall.release(4)
        assert wall.walled() == {2}
        assert wall.differences({2: cgroups[2]}) == []
    finally:
        wall.remove()
        for cgroup in cgroups.values():
            cgroup.rmdir()
        base.rmdir()


# In the task: one datagram to each of argv[1] ports of the outside (none listens there), then
# one to the outside's listener at argv[2], printing its answer or the error.
SPRAY = """
import socket, sys, time
count, listener = int(sys.argv[1]), int(sys.argv[2])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i in range(count):
        s.sendto(b"x", ("%s", 20000 + i))
        if i %% 25 == 24:
            time.sleep(0.02)  # as fast as pasta's tap queue takes them without drops
time.sleep(1)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(3)
    s.sendto(b"?", ("%s", listener))
    try:
        print("listener:", s.recv(100).decode())
    except OSError as exc:
        print("listener:", type(exc).__name__)
"""


def _received(namespace: str) -> int:
    """Packets the outside's interfaces have received (its loopback aside)."""
    dev = subprocess.run(
        ["ip", "netns", "exec", namespace, "cat", "/proc/net/dev"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(
        int(line.split(":", 1)[1].split()[1])
        for line in dev.splitlines()[2:]
        if line.split(":", 1)[0].strip() != "lo"
    )


def test_a_private_task_holds_a_bounded_share_of_the_nodes_connection_tracking(
    node: NetNode,  # noqa: F811
    outside_network: Outside,  # noqa: F811
) -> None:
    """The wall's `ct state` rule makes the kernel track every flow of the node, in a table of
    the node's (nf_conntrack_max): a task spraying datagrams at the ports of some address fills
    it in seconds, and then the kernel drops the first packet of every new flow on the node,
    every org's. Past its bound a pasta's new flows are refused; another task's are not."""
    bound = 40
    node.namespaces.wall.flows_max = bound
    listener = outside_network.ports[3]
    before = _received(outside_network.namespace)
    node.runner.start(
        spec(1, [PY, "-c", SPRAY % (OUTSIDE, OUTSIDE), "200", str(listener)],
             network="private", **ACME)
    )  # fmt: skip
    sprayer = node.result(1)
    reached = _received(outside_network.namespace) - before
    assert sprayer["exit_code"] == 0, sprayer
    # Its first flows reached the outside (a few ARP packets besides), the rest went nowhere,
    # and so did its next flow, to the listener.
    assert bound <= reached <= bound + 8, (reached, sprayer)
    assert "listener: outside" not in sprayer["log"], sprayer
    other = node.probe(2, [f"udp {OUTSIDE} {listener}"], network="private", **RIVAL)
    assert other == {f"udp {OUTSIDE} {listener}": "outside"}


# In a host-network task: one datagram to each of argv[1] ports of the outside (none listens
# there), counting those the node let out, then one to the outside's listener at argv[2].
HOST_SPRAY = """
import socket, sys
count, listener = int(sys.argv[1]), int(sys.argv[2])
sent = 0
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i in range(count):
        try:
            s.sendto(b"x", ("%s", 20000 + i))
            sent += 1
        except OSError:
            pass
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(3)
    try:
        s.sendto(b"?", ("%s", listener))
        print(sent, s.recv(100).decode())
    except OSError as exc:
        print(sent, type(exc).__name__)
"""


@pytest.mark.parametrize("node", ["strict"], indirect=True)
def test_a_host_network_org_holds_a_bounded_share_of_the_nodes_connection_tracking(
    node: NetNode,  # noqa: F811
    outside_network: Outside,  # noqa: F811
) -> None:
    """A host-network task opens its flows from the node's namespace as its org's uid, with no
    pasta to bound: past the bound its uid's new flows are refused, while another org's uid (and
    root, the node's own) still open theirs, and the wall, whose set counts them, is intact."""
    bound = 40
    wall = node.namespaces.wall
    wall.flows_max = bound
    wall.task_uids = tuple(task_uid_ranges(IsolationConfig(mode="strict", task_uid_base=UID_BASE)))
    node.namespaces.build_wall()
    listener = outside_network.ports[3]
    sprayer_org = {"org": "sprayer", "org_id": 7}  # a uid no other test here sends from
    node.runner.start(
        spec(1, [PY, "-c", HOST_SPRAY % (OUTSIDE, OUTSIDE), "200", str(listener)],
             network="host", **sprayer_org)
    )  # fmt: skip
    sprayer = node.result(1)
    assert sprayer["exit_code"] == 0, sprayer
    assert sprayer["log"].split() == [str(bound), "PermissionError"], sprayer
    other = node.probe(2, [f"udp {OUTSIDE} {listener}"], network="host", **RIVAL)
    assert other == {f"udp {OUTSIDE} {listener}": "outside"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:  # root's, the node's
        own.settimeout(3)
        own.sendto(b"?", (OUTSIDE, listener))
        assert own.recv(100) == b"outside"
    assert wall.differences(node.namespaces.walled_pastas()) == []


def test_task_uids_are_the_base_range_and_the_orgs_own_merged() -> None:
    config = IsolationConfig(
        mode="strict", task_uid_base=300_000, org_uids={"a": 5000, "b": 300_010, "c": 5001}
    )
    assert task_uid_ranges(config) == [(5000, 5001), (300_000, 300_000 + 2**31 - 1)]
    assert task_uid_ranges(IsolationConfig(mode="none", task_uid_base=300_000)) == []
    high = IsolationConfig(mode="strict", task_uid_base=2**32 - 100)
    assert task_uid_ranges(high) == [(2**32 - 100, 2**32 - 2)]


# Connects to each "HOST PORT" of argv; prints "connected", or the error's name.
CONNECT = """
import socket, sys
for host, port in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print("connected")
    except OSError as exc:
        print(type(exc).__name__)
"""


@pytest.mark.parametrize("node", ["strict"], indirect=True)
def test_no_task_reaches_the_nodes_own_gpu_services(node: NetNode) -> None:  # noqa: F811
    """DCGM's host engine listens on 127.0.0.1:5555 and asks nothing of who connects: a
    host-network task could ask it for every GPU's processes, other orgs' among them, run
    diagnostics on the node's GPUs and, with the engine as root, change their settings. The
    port stands in for it here. The node's own (root, dcgm-exporter) still reach it; the
    task's other connections to the node too."""
    wall = node.namespaces.wall
    wall.task_uids = tuple(task_uid_ranges(IsolationConfig(mode="strict", task_uid_base=UID_BASE)))
    with socket.socket() as service, socket.socket() as other:
        for listener in (service, other):
            listener.bind(("0.0.0.0", 0))
            listener.listen(8)
        closed, open_port = service.getsockname()[1], other.getsockname()[1]
        wall.service_ports = (closed,)  # a free port, not 5555: a real engine may listen there
        node.namespaces.build_wall()
        node.runner.start(
            spec(1, [PY, "-c", CONNECT, "127.0.0.1", str(closed), _host_address(), str(closed),
                     "127.0.0.1", str(open_port)], network="host", **ACME)
        )  # fmt: skip
        result = node.result(1)
        assert result["log"].split() == [
            "ConnectionRefusedError",
            "ConnectionRefusedError",
            "connected",
        ], result
        with socket.create_connection(("127.0.0.1", closed), timeout=3):  # root's, the node's
            pass
    assert wall.differences(node.namespaces.walled_pastas()) == []


def test_the_services_closed_to_tasks_are_dcgms_and_fabric_managers_unless_told() -> None:
    from cli.agent import _service_ports

    assert _service_ports(None) == NODE_SERVICE_PORTS == (5555, 6666)
    assert _service_ports([7777, 7777]) == (7777,)
    assert _service_ports([0]) == ()
    uids = [(UID_BASE, UID_BASE + 99)]
    closed = Wall("t", nft="nft", cgroup2=Path("/sys/fs/cgroup"), task_uids=uids)
    assert "tcp dport { 5555, 6666 } reject" in closed._services_closed()[0]
    none = Wall("t", nft="nft", cgroup2=Path("/sys/fs/cgroup"), task_uids=uids, service_ports=())
    assert none._services_closed() == []
