"""The wall between a private task's pasta and the node itself: an nftables table of the agent's.

pasta opens a private task's outbound connections from the node's network namespace, as root, so
without a wall a connection to an address the node holds (a second NIC, docker0, IPoIB, the
loopback of another address family) reaches whatever listens there on 0.0.0.0: the agent's
metrics port, sshd, other orgs' host-network tasks. No uid, gid or mark tells pasta's traffic
apart (this pasta cannot drop to another user and set no mark), but its cgroup does: each pasta
runs in a cgroup v2 directory of its own (on a cgroup v1 host, in the unified hierarchy beside
it, which every "hybrid" host mounts), and the table `inet fairgpu-<agent>` drops

- what a pasta sends to any address of the node (`fib daddr type local`, broadcast, multicast);
- UDP that reaches a pasta's sockets from an address of the node (`fib saddr type local`: a
  host-network task sending datagrams to the port a private task's UDP flow left open; pasta
  listens on no TCP port, and its connected TCP sockets take nothing from a node address they
  were not let connect to, so TCP needs no inbound rule, and must have none: the reset that
  refuses pasta's own connection arrives from the node's address);
- UDP that reaches a pasta's sockets from anywhere but a peer the task sent to (conntrack's
  `ct state` neither established nor related): pasta receives a flow's replies on a socket
  bound to the node's addresses at the task's port, which would otherwise take a datagram from
  any machine that can reach the node, or from another port of the peer's,

except DNS to and from the node's own resolvers (pasta forwards the task's queries to the first
one, which is often 127.0.0.53). A private task has no address the node's namespace can route to,
so the node's local addresses are every other task's addresses it could otherwise reach.

The same table bounds the connections each pasta may hold in the node's connection tracking
table (`ct count over flows_max`, chain `flows`): the wall's `ct state` rule makes the kernel
track every flow of the node, and the table (`net.netfilter.nf_conntrack_max`) is the node's
alone: once full, the kernel drops the first packet of every new flow on the node, other orgs'
host-network tasks' and the agent's own included. Without the bound one task sending a datagram
to each port of some address fills it in seconds (each unanswered UDP flow stays 30 s, a
connection attempt to a silent address 120 s). Past it, a new flow of that pasta's is refused
like the rest the wall refuses (DNS to the resolvers still passes); flows already open go on.
Host-network tasks open their flows from the node's namespace themselves, each as its org's uid:
the output chain bounds each task uid (`task_uids`, the agent's `--task-uid-base` range and
`--org-uid`s) to as many new flows as a pasta (`ct count` per element of the dynamic set
`task_flows`, keyed by `meta skuid`), so one org's tasks cannot take the node's table either,
while other uids (the node's own services, root, other orgs) still open theirs.

The output chain also refuses every task uid a TCP connection to the node's own GPU services on
any of its addresses (`NODE_SERVICE_PORTS`: DCGM's host engine, which authenticates nobody).

TCP is refused with a reset, the rest with an ICMP "administratively prohibited", so a task that
tries fails at once rather than after a time-out. The table names no other table and is replaced
whole (one nft transaction) when the agent starts; a rule per pasta is added before that pasta
starts and removed after it ended. Anything else may remove or change it (`nft flush ruleset`, a
firewall reload): `differences` compares it with what the agent made, which agents/wallwatch.py
does periodically, putting it back when it differs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

NFT_CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where nft resolves a `socket cgroupv2` path (it prefixes it with this directory)."""
FLOWS_MAX = 4096
"""The connections (TCP, UDP flows) one pasta, or one task uid on the host network, may hold in
the node's connection tracking table at once (`fairgpu agent --task-flow-limit`): 8 of them hold
at most an eighth of the 262,144 a large node's kernel allows; closed TCP connections do not
count."""
NODE_SERVICE_PORTS = (5555, 6666)
"""TCP ports of the node's own services that no task uid may connect to on any of the node's
addresses (`fairgpu agent --node-service-port`). NVIDIA DCGM's host engine (`nv-hostengine`, run
by `nvidia-dcgm.service`) listens on 127.0.0.1:5555 and asks nothing of who connects, so a
host-network task could ask it for every GPU's processes (other orgs' among them), run
diagnostics across the node's GPUs and, where the engine runs as root, change their settings;
Fabric Manager's API (127.0.0.1:6666 where `FM_CMD_BIND_INTERFACE` is set) activates and
deactivates NVSwitch partitions (NVIDIA's documentation; neither tried: not on the test machine)."""
UID_MAX = 2**32 - 2
"""The largest uid (2^32 - 1 is the kernel's "no uid")."""


class WallError(RuntimeError):
    """The wall could not be built or changed; the message is one line."""


def cgroup2_mount(mounts: Path = Path("/proc/self/mounts")) -> Path | None:
    """Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup on a v2 host,
    /sys/fs/cgroup/unified on a systemd "hybrid" one; None on a host with cgroup v1 alone."""
    with contextlib.suppress(OSError):
        for line in mounts.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


class Wall:
    """The agent's nftables table and the rule of each task's pasta in it."""

    def __init__(
        self,
        table: str,
        *,
        nft: str,
        cgroup2: Path,
        flows_max: int = FLOWS_MAX,
        task_uids: Sequence[tuple[int, int]] = (),
        service_ports: Sequence[int] = NODE_SERVICE_PORTS,
    ) -> None:
        self.table, self.nft, self.cgroup2 = table, nft, cgroup2
        self.flows_max = flows_max
        self.service_ports = tuple(service_ports)
        """TCP ports of the node's own services closed to every task uid (NODE_SERVICE_PORTS)."""
        """The connections one pasta, or one task uid, may hold in the node's connection
        tracking table."""
        self.task_uids = tuple(task_uids)
        """(first, last) uid ranges the tasks run as; each uid in them is bounded on its own."""
        self._rule_handles: dict[int, list[tuple[str, int]]] = {}
        """task id → (chain, handle) of its pasta's rules, as nft echoed them when this object
        added them (a table made anew renumbers them all, and `install` reads them again):
        `release` then needs no listing."""
        self.list_error = ""
        """Why the last listing of a pasta chain failed (its rules then count as absent): for
        the message of whoever finds a rule missing."""
        self._made: dict[str, list[str]] | None = None
        """The table as nft listed it right after `install` made it, less the pastas' rules
        (which come and go): what `differences` compares the table with."""

    def install(self, resolvers: Iterable[str], pastas: dict[int, Path]) -> None:
        """Make the table anew (the previous one of this agent, if any, goes in the same
        transaction, so nothing runs unwalled meanwhile), with the rules of `pastas`."""
        exceptions = []
        for address in resolvers:
            family = "ip" if ipaddress.ip_address(address).version == 4 else "ip6"
            exceptions += [
                f"meta l4proto {{ tcp, udp }} {family} daddr {address} th dport 53 accept",
                f"meta l4proto {{ tcp, udp }} {family} saddr {address} th sport 53 accept",
            ]
        rules = "\n".join(self._rule(task_id, path) for task_id, path in sorted(pastas.items()))
        script = "\n".join(
            [
                f"table inet {self.table} {{}}",
                f"delete table inet {self.table}",
                f"table inet {self.table} {{",
                "  set task_flows {",
                "    type uid; size 65536; flags dynamic;",
                "  }",
                "  chain output {",
                "    type filter hook output priority filter; policy accept;",
                *self._services_closed(),
                "    fib daddr type { local, broadcast, multicast } jump pastas",
                "    ct state new jump flows",
                *self._uid_bound(),
                "  }",
                "  chain input {",
                "    type filter hook input priority filter; policy accept;",
                "    meta l4proto udp fib saddr type local jump pastas",
                "    meta l4proto udp ct state != { established, related } jump pastas",
                "  }",
                "  chain pastas {",
                "  }",
                "  chain flows {",
                "  }",
                "  chain wall {",
                *exceptions,
                "    meta l4proto tcp reject with tcp reset",
                "    reject with icmpx admin-prohibited",
                "  }",
                "}",
                rules,
                "",
            ]
        )
        self._rule_handles = _echoed_handles(self._nft(["--echo", "--handle", "-f", "-"], script))
        made = _blocks(self._nft(["--terse", "list", "table", "inet", self.table]))
        for chain in _PER_PASTA:
            made.pop(f"chain {chain}", None)
        self._made = made

    def differences(self, pastas: dict[int, Path]) -> list[str]:
        """How the table differs from the one `install` made with the rules of `pastas` (one
        line each; none: it is intact). nft's own listing is compared, so a rule changed in
        any way, added or removed is seen, whatever nft version prints it."""
        if self._made is None:
            return ["it was never made"]
        try:
            # Terse: without the elements of `task_flows`, which the kernel adds per uid.
            found = _blocks(self._nft(["--terse", "list", "table", "inet", self.table]))
        except WallError:
            return [f"table inet {self.table} is gone"]
        differences = []
        expected = {
            **self._made,
            **{
                f"chain {chain}": sorted(self._rule_text(chain, t, c) for t, c in pastas.items())
                for chain in _PER_PASTA
            },
        }
        for block in sorted(expected.keys() | found.keys()):
            if block not in found:
                differences.append(f"{block} is gone")
            elif block not in expected:
                differences.append(f"{block} was added")
            elif sorted(found[block]) != sorted(expected[block]):
                differences.append(f"{block} was changed")
        return differences

    def admit(self, task_id: int, cgroup: Path) -> None:
        """Wall the pasta that will run in `cgroup` (made, and empty: sockets take the cgroup of
        the process that makes them, so pasta must be in it before it starts)."""
        echoed = self._nft(["--echo", "--handle", "-f", "-"], self._rule(task_id, cgroup) + "\n")
        self._rule_handles.update(_echoed_handles(echoed))

    def release(self, task_id: int) -> None:
        """Remove the rules of a pasta that has ended (none is fine)."""
        known = self._rule_handles.pop(task_id, [])
        if known:
            try:
                self._nft(["-f", "-"], "".join(self._delete(c, h) for c, h in known))
                return
            except WallError:
                pass  # the table went or was changed since: look them up
        for chain, handle in self._handles(task_id):
            with contextlib.suppress(WallError):
                self._nft(["-f", "-"], self._delete(chain, handle))

    def walled(self) -> set[int]:
        """The tasks whose pasta has a rule."""
        return {task_id for task_id, _chain, _handle in self._rules()}

    def exists(self) -> bool:
        try:
            self._nft(["list", "table", "inet", self.table])
        except WallError:
            return False
        return True

    def remove(self) -> None:
        """Delete the table (nothing there is fine)."""
        if self.exists():
            self._nft(["delete", "table", "inet", self.table])
        self._rule_handles.clear()

    # internals --------------------------------------------------------------------------------
    def _ranges(self) -> str:
        return ", ".join(
            str(first) if first == last else f"{first}-{last}" for first, last in self.task_uids
        )

    def _services_closed(self) -> list[str]:
        """The rule refusing task uids the node's own services (`service_ports`)."""
        if not self.task_uids or not self.service_ports:
            return []
        ports = ", ".join(str(port) for port in sorted(set(self.service_ports)))
        return [
            f"    meta skuid {{ {self._ranges()} }} fib daddr type local "
            f"tcp dport {{ {ports} }} reject with tcp reset"
        ]

    def _uid_bound(self) -> list[str]:
        """The rule bounding each task uid's flows: its count is kept per uid, in `task_flows`."""
        if not self.task_uids:
            return []
        ranges = self._ranges()
        return [
            f"    ct state new meta skuid {{ {ranges} }} "
            f"add @task_flows {{ meta skuid ct count over {self.flows_max} }} jump wall"
        ]

    def _rule(self, task_id: int, cgroup: Path) -> str:
        """A pasta's rules, one in each chain of `_PER_PASTA`."""
        return "\n".join(
            f"add rule inet {self.table} {chain} {self._rule_text(chain, task_id, cgroup)}"
            for chain in _PER_PASTA
        )

    def _rule_text(self, chain: str, task_id: int, cgroup: Path) -> str:
        """A pasta's rule in `chain` as nft lists it."""
        level = len(cgroup.relative_to(self.cgroup2).parts)
        where = os.path.relpath(cgroup, NFT_CGROUP_ROOT)
        bound = f" ct count over {self.flows_max}" if chain == "flows" else ""
        return f'socket cgroupv2 level {level} "{where}"{bound} jump wall comment "task {task_id}"'

    def _delete(self, chain: str, handle: int) -> str:
        return f"delete rule inet {self.table} {chain} handle {handle}\n"

    def _handles(self, task_id: int) -> list[tuple[str, int]]:
        return [(chain, handle) for found, chain, handle in self._rules() if found == task_id]

    def _rules(self) -> list[tuple[int, str, int]]:
        """(task id, chain, handle) of every pasta rule in the table."""
        found = []
        for chain in _PER_PASTA:
            try:
                listed = self._nft(["-j", "list", "chain", "inet", self.table, chain])
            except WallError as exc:
                self.list_error = f"{chain}: {exc}"
                continue
            for item in json.loads(listed).get("nftables", []):
                rule = item.get("rule")
                comment = str(rule.get("comment", "")) if rule else ""
                if comment.startswith("task ") and comment[5:].isdigit():
                    found.append((int(comment[5:]), chain, int(rule["handle"])))
        return found

    def _nft(self, args: list[str], script: str | None = None) -> str:
        try:
            done = subprocess.run(
                [self.nft, *args],
                input=script,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise WallError(f"nft: {exc}") from exc
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "Error:" in line]
            raise WallError(f"nft: {lines[0] if lines else f'exit status {done.returncode}'}")
        return done.stdout


_PER_PASTA = ("pastas", "flows")
"""The chains holding one rule per pasta: what it may not reach, how many flows it may hold."""
_ECHOED_RULE = re.compile(
    r'^add rule inet \S+ (\S+) .* comment "task (\d+)" # handle (\d+)$', re.MULTILINE
)


def _echoed_handles(echoed: str) -> dict[int, list[tuple[str, int]]]:
    """{task id: [(chain, handle)]} of the pasta rules in what `nft --echo --handle` printed."""
    found: dict[int, list[tuple[str, int]]] = {}
    for chain, task, handle in _ECHOED_RULE.findall(echoed):
        found.setdefault(int(task), []).append((chain, int(handle)))
    return found


def _blocks(listing: str) -> dict[str, list[str]]:
    """`nft list table`'s output as {"chain NAME" (or "set NAME", ...): its lines}."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in listing.splitlines()[1:]:  # the first opens the table
        line = raw.strip()
        if not line:
            continue
        if current is None and line.endswith("{"):
            current = blocks.setdefault(line.removesuffix("{").strip(), [])
        elif line == "}":
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def resolvers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The node's resolvers (pasta forwards the task's DNS to the first)."""
    found = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    found.append(str(ipaddress.ip_address(fields[1].split("%")[0])))
    return found
