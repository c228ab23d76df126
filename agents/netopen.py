"""Opening a node's task namespaces: whether this node can build them (tried once, walled), and
removing all of an agent's namespaces for whoever ends its tasks without it.

agents/netns.py makes and removes one task's namespace; this module decides whether the node can
make any (root, the tools, a cgroup v2 hierarchy, a kernel that lets it) by making a probe
namespace and checking its wall, as the agent does once at start.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from agents.netns import Namespaces, NetnsError
from agents.netwall import FLOWS_MAX, NODE_SERVICE_PORTS, Wall, cgroup2_mount
from agents.state import agent_tag


def open_namespaces(
    state_root: Path,
    cgroup_parent: str = "fairgpu",
    *,
    flows_max: int = FLOWS_MAX,
    task_uids: Sequence[tuple[int, int]] = (),
    service_ports: Sequence[int] = NODE_SERVICE_PORTS,
) -> tuple[Namespaces | None, str]:
    """This node's namespaces if it can build them, walled (root, `ip`, `pasta`, `nft`, a cgroup
    v2 hierarchy, a kernel that lets it: tried once with a namespace made and removed), else
    None and why not. The wall is installed anew, with the rules of the pastas still running,
    bounding each pasta and each of `task_uids` to `flows_max` flows and closing
    `service_ports` to `task_uids` (agents/netwall.py)."""
    if os.geteuid() != 0:
        return None, "the agent does not run as root"
    tools = {"pasta": "pasta (package passt)", "ip": "ip (iproute2)", "nft": "nft (nftables)"}
    found = {tool: shutil.which(tool) for tool in tools}
    missing = [package for tool, package in tools.items() if found[tool] is None]
    if missing:
        return None, f"{', '.join(missing)} not found"
    cgroup2 = cgroup2_mount()
    if cgroup2 is None:
        return None, (
            "no cgroup v2 hierarchy is mounted, which the wall between pasta and the node needs "
            "(mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified)"
        )
    pasta, ip, nft = (str(found[tool]) for tool in tools)
    wall = Wall(
        _table(state_root),
        nft=nft,
        cgroup2=cgroup2,
        flows_max=flows_max,
        task_uids=task_uids,
        service_ports=service_ports,
    )
    namespaces = Namespaces(state_root, pasta=pasta, ip=ip, wall=wall, cgroup_parent=cgroup_parent)
    probe = 0  # never a task id: the server's ids start at 1
    try:
        namespaces.build_wall()
        namespaces.create(probe)
        _check_walled(namespaces, probe)
        namespaces.call_inside(probe, _loopback_works)
    except (NetnsError, OSError) as exc:
        namespaces.remove(probe)
        namespaces.close_if_idle()  # no table left for a node that cannot use it
        return None, str(exc)
    namespaces.remove(probe)
    return namespaces, ""


def _check_walled(namespaces: Namespaces, task_id: int) -> None:
    """The probe's pasta runs in the cgroup its wall rule names, and the rule is there."""
    pid = namespaces.pasta_pid(task_id)
    expected = namespaces.pasta_cgroups / namespaces.name(task_id)
    try:
        members = (expected / "cgroup.procs").read_text().split()
    except OSError:
        members = []
    if pid is None or str(pid) not in members:
        raise NetnsError(f"pasta did not start in its cgroup {expected}")
    wall = namespaces.wall
    wall.list_error = ""
    if task_id not in wall.walled():
        why = f" (listing {wall.list_error})" if wall.list_error else ""
        raise NetnsError(f"nft: table inet {wall.table} has no rule for pasta{why}")


def _loopback_works() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def remove_all(state_root: Path, cgroup_parent: str = "fairgpu") -> list[int]:
    """Remove every network namespace (and pasta), and the wall, of the agent with this state
    directory: for whoever ends its tasks without it (a test harness, an operator retiring a
    node)."""
    ip, nft, cgroup2 = shutil.which("ip"), shutil.which("nft"), cgroup2_mount()
    if ip is None or os.geteuid() != 0:
        return []
    wall = Wall(_table(state_root), nft=nft or "nft", cgroup2=cgroup2 or Path("/sys/fs/cgroup"))
    namespaces = Namespaces(
        state_root,
        pasta=shutil.which("pasta") or "pasta",
        ip=ip,
        wall=wall,
        cgroup_parent=cgroup_parent,
    )
    removed = namespaces.sweep(set())
    namespaces.close()
    return removed


def _table(state_root: Path) -> str:
    return f"fairgpu-{agent_tag(state_root)}"
