"""A network namespace of its own for each task that asks for one (`TaskSpec.network="private"`).

The pod model: the task sees only its own loopback and one interface, and reaches the outside
through `pasta` (the Debian package `passt`), a user-mode network stack that the agent starts
for the namespace. Tasks in two such namespaces share no address, no route and no bridge, so
nothing one of them listens on (on 127.0.0.1 or 0.0.0.0) is reachable from the other, nor from
a task in the host's namespace, nor from another node. pasta runs with

- `-t none -u none` (no port of the node forwarded into the namespace: pasta's default, `auto`,
  would expose every port the task binds on the node's addresses);
- `-T none -U none` (the namespace's loopback is not forwarded to the node's: its default,
  `auto`, would hand the task the node's loopback listeners);
- `--no-map-gw` (the gateway address is not the node's loopback either);
- `--dns-forward DNS_ADDRESS`: DNS queries to that address go to the node's first resolver,
  which `ip netns exec` gives the task as its `/etc/resolv.conf` (from `/etc/netns/NAME/`);
- `--runas 0`: this pasta cannot join a namespace after dropping to `nobody`; it keeps only
  CAP_SYS_ADMIN and CAP_NET_BIND_SERVICE, under no_new_privs and a seccomp filter, in mount,
  pid, IPC and UTS namespaces of its own.

The namespace is named (`ip netns add`, a file under /run/netns) so that it outlives an agent
restart and is found again: `sweep` removes those of this agent whose task is no longer running.
Under strict isolation the sandbox (agents/sandbox.py) joins it, with the task's cgroup, before
anything else; an unconfined task's command enters it through `ip netns exec NAME` (which would
also hide the host's cgroup mounts, that the sandbox needs). Either way every process of the
task is inside it; the log copier and the wrapper stay outside. Port-forwards enter it with
setns in a thread of their own (`run_in_netns`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/netns")
ETC_DIR = Path("/etc/netns")
DNS_ADDRESS = "169.254.0.53"
"""The task's resolver: pasta forwards queries sent here to the node's first resolver."""
CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace could not be made or entered; the message is one line."""


def _pasta_argv(pasta: str, name: str, pid_file: Path) -> list[str]:
    return [
        pasta,
        "--config-net",
        "--netns",
        name,
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "--no-map-gw",
        "--dns-forward",
        DNS_ADDRESS,
        "--runas",
        "0",
        "--quiet",
        "--pid",
        str(pid_file),
    ]


class Namespaces:
    """The network namespaces of one agent's tasks: `fairgpu-<agent>-<task id>`, where <agent>
    is taken from the agent's state directory (two agents on one host never share names)."""

    def __init__(
        self,
        state_root: Path,
        *,
        pasta: str,
        ip: str,
        run_dir: Path = RUN_DIR,
        etc_dir: Path = ETC_DIR,
    ) -> None:
        self.pasta, self.ip = pasta, ip
        self.run_dir, self.etc_dir = run_dir, etc_dir
        tag = hashlib.sha256(str(state_root.resolve()).encode()).hexdigest()[:8]
        self.prefix = f"fairgpu-{tag}-"
        self.pid_dir = state_root / "netns"

    # per task ---------------------------------------------------------------------------------
    def name(self, task_id: int) -> str:
        return f"{self.prefix}{task_id}"

    def path(self, task_id: int) -> Path:
        return self.run_dir / self.name(task_id)

    def resolv_conf(self, task_id: int) -> Path:
        """The task's /etc/resolv.conf (`ip netns exec` binds it; so does agents/sandbox)."""
        return self.etc_dir / self.name(task_id) / "resolv.conf"

    def exists(self, task_id: int) -> bool:
        return self.path(task_id).exists()

    def create(self, task_id: int) -> list[str]:
        """Make the task's namespace with pasta attached; the prefix that runs a command in it."""
        name = self.name(task_id)
        self.remove(task_id)  # what a crash between two steps left behind
        self.pid_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._run([self.ip, "netns", "add", name])
            resolv = self.resolv_conf(task_id)
            resolv.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            resolv.write_text(f"nameserver {DNS_ADDRESS}\n{_search_lines()}")
            os.chmod(resolv, 0o644)
            self._run(_pasta_argv(self.pasta, name, self._pid_file(task_id)))
        except NetnsError:
            self.remove(task_id)
            raise
        return [self.ip, "netns", "exec", name]

    def remove(self, task_id: int) -> None:
        """End the namespace's pasta and delete the namespace; nothing there is fine."""
        pid_file = self._pid_file(task_id)
        pid = _read_pid(pid_file)
        name = self.name(task_id)
        if pid is not None and _is_pasta_for(pid, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        if self.path(task_id).exists():
            try:
                self._run([self.ip, "netns", "delete", name])
            except NetnsError as exc:
                log.warning("task %d: %s", task_id, exc)
        shutil.rmtree(self.etc_dir / name, ignore_errors=True)

    def sweep(self, keep: set[int]) -> list[int]:
        """Remove this agent's namespaces (and pastas) of tasks not in `keep`; their ids."""
        found: set[int] = set()
        pattern = re.compile(re.escape(self.prefix) + r"(\d+)$")
        for directory in (self.run_dir, self.etc_dir, self.pid_dir):
            with contextlib.suppress(OSError):
                for entry in os.listdir(directory):
                    match = pattern.match(entry.removesuffix(".pid"))
                    if match:
                        found.add(int(match.group(1)))
        removed = sorted(found - keep)
        for task_id in removed:
            log.info("task %d: removing its network namespace", task_id)
            self.remove(task_id)
        return removed

    def pasta_pid(self, task_id: int) -> int | None:
        pid = _read_pid(self._pid_file(task_id))
        return pid if pid is not None and _is_pasta_for(pid, self.name(task_id)) else None

    # entering ---------------------------------------------------------------------------------
    def call_inside(self, task_id: int, function: Callable[[], _T]) -> _T:
        """`function()` in a thread that has entered the task's namespace (sockets it makes
        belong there; /proc/thread-self/net shows its tables). The agent's other threads stay
        in the node's namespace: the thread ends with the call, so it never returns anywhere."""
        return run_in_netns(self.path(task_id), function)

    # internals --------------------------------------------------------------------------------
    def _pid_file(self, task_id: int) -> Path:
        return self.pid_dir / f"{self.name(task_id)}.pid"

    def _run(self, argv: list[str]) -> None:
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NetnsError(f"{Path(argv[0]).name}: {exc}") from exc
        if done.returncode != 0:
            lines = [
                line
                for line in done.stderr.decode(errors="replace").splitlines()
                if line.strip() and "to syslog" not in line
            ]
            detail = lines[-1] if lines else f"exit status {done.returncode}"
            raise NetnsError(f"{Path(argv[0]).name} {argv[1]}: {detail}")


def remove_all(state_root: Path) -> list[int]:
    """Remove every network namespace (and pasta) of the agent with this state directory:
    for whoever ends its tasks without it (a test harness, an operator retiring a node)."""
    ip = shutil.which("ip")
    if ip is None or os.geteuid() != 0:
        return []
    return Namespaces(state_root, pasta=shutil.which("pasta") or "pasta", ip=ip).sweep(set())


def run_in_netns(path: Path, function: Callable[[], _T]) -> _T:
    """Call `function` in a fresh thread that first joins the network namespace at `path`."""
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            error.append(NetnsError(f"the task's network namespace is gone ({exc.strerror})"))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                reason = os.strerror(ctypes.get_errno())
                error.append(NetnsError(f"entering the task's network namespace: {reason}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(function())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="netns", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def entry(named: Path, pids: set[int]) -> Path:
    """Where to enter a task's namespace: its name, or where that is no longer a namespace (an
    agent restarted in a mount namespace of its own, as systemd's ProtectSystem gives it, does
    not see the mounts its predecessor made) the namespace of one of the task's processes that
    is not the agent's own."""
    try:
        if os.stat(named).st_dev == os.stat("/proc/self/ns/net").st_dev:  # on nsfs
            return named
    except OSError:
        pass
    own = os.stat("/proc/self/ns/net").st_ino
    for pid in sorted(pids):
        path = Path(f"/proc/{pid}/ns/net")
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino != own:
                return path
    return named


def thread_net_dir() -> Path:
    """The /proc/net of the calling thread's network namespace."""
    return Path("/proc/thread-self/net")


def open_namespaces(state_root: Path) -> tuple[Namespaces | None, str]:
    """This node's namespaces if it can build them (root, `ip` and `pasta`, a kernel that lets
    it: tried once with a namespace made and removed), else None and why not."""
    if os.geteuid() != 0:
        return None, "the agent does not run as root"
    pasta, ip = shutil.which("pasta"), shutil.which("ip")
    if pasta is None or ip is None:
        return None, f"{'pasta (package passt)' if pasta is None else 'ip (iproute2)'} not found"
    namespaces = Namespaces(state_root, pasta=pasta, ip=ip)
    probe = 0  # never a task id: the server's ids start at 1
    try:
        namespaces.create(probe)
        namespaces.call_inside(probe, _loopback_works)
    except (NetnsError, OSError) as exc:
        return None, str(exc)
    finally:
        namespaces.remove(probe)
    return namespaces, ""


def _loopback_works() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def _search_lines() -> str:
    """The node's search domains and options, which stay meaningful inside the namespace."""
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return ""
    kept = [line for line in lines if line.split()[:1] in (["search"], ["domain"], ["options"])]
    return "".join(f"{line}\n" for line in kept)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_pasta_for(pid: int, name: str) -> bool:
    """The process is a pasta serving namespace `name` (not a pid reused by another)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(argv)
        and Path(argv[0].decode(errors="replace")).name == "pasta"
        and (name.encode() in argv)
    )
