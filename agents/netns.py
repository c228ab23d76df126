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

pasta connects from the node's namespace, so what it sends to the node's own addresses would
reach the node's listeners: each pasta starts inside a cgroup v2 directory that the agent's
nftables wall (agents/netwall.py) names, and no namespace is made without its rule.

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
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from agents.netwall import Wall, WallError, resolvers
from agents.state import agent_tag

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
    is taken from the agent's state directory (two agents on one host never share names).

    Each pasta runs in a cgroup v2 directory that the agent's wall (agents/netwall.py) names in
    a rule of its own: `<cgroup v2 mount>/<cgroup parent>-pasta/<agent>/<namespace name>`, or
    the one the caller gives (inside the task's own cgroup, which pasta is then charged to),
    joined before pasta starts, with any other cgroups it must be charged to."""

    def __init__(
        self,
        state_root: Path,
        *,
        pasta: str,
        ip: str,
        wall: Wall,
        cgroup_parent: str = "fairgpu",
        run_dir: Path = RUN_DIR,
        etc_dir: Path = ETC_DIR,
    ) -> None:
        self.pasta, self.ip, self.wall = pasta, ip, wall
        self.run_dir, self.etc_dir = run_dir, etc_dir
        tag = agent_tag(state_root)
        self.prefix = f"fairgpu-{tag}-"
        self.pid_dir = state_root / "netns"
        self.pasta_cgroups = wall.cgroup2 / f"{cgroup_parent.strip('/')}-pasta" / tag
        """Where the pastas that run in no cgroup of their task's have theirs (this agent's
        alone: `close` removes it, never the directory above, which other agents share)."""
        self.lock = threading.RLock()
        """Held while the wall's rules and the pastas change, so that a check of the wall
        (agents/wallwatch.py, in a thread) never sees a rule whose pasta is only starting."""

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

    def create(
        self,
        task_id: int,
        *,
        cgroup: Path | None = None,
        charge_to: Sequence[Path] = (),
        adopt: int | None = None,
    ) -> list[str]:
        """Make the task's namespace with pasta attached, walled; the prefix that runs a command
        in it. `cgroup`: pasta's cgroup v2 directory (made, empty) instead of one of its own;
        `charge_to`: more `cgroup.procs` files (cgroup v1 controllers) it joins before it starts;
        `adopt`: a process whose (empty) namespace becomes the task's instead of a new one (a
        docker pod's, agents/container.py)."""
        with self.lock:
            return self._create(task_id, cgroup, charge_to, adopt)

    def _create(
        self, task_id: int, cgroup: Path | None, charge_to: Sequence[Path], adopt: int | None
    ) -> list[str]:
        name = self.name(task_id)
        self.remove(task_id)  # what a crash between two steps left behind
        self.pid_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            if cgroup is None:
                cgroup = self.pasta_cgroups / name
                _make_cgroup(cgroup)
            self._cgroup_file(task_id).write_text(str(cgroup))
            made = ["add", name] if adopt is None else ["attach", name, str(adopt)]
            self._run([self.ip, "netns", *made])
            resolv = self.resolv_conf(task_id)
            resolv.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            resolv.write_text(f"nameserver {DNS_ADDRESS}\n{_search_lines()}")
            os.chmod(resolv, 0o644)
            try:
                self.wall.admit(task_id, cgroup)
            except WallError:
                # The table went (a `flush ruleset`, an agent that stopped idle): anew, with
                # the rules of the pastas still running, then this one's.
                self.build_wall()
                self.wall.admit(task_id, cgroup)
            joins = [cgroup / "cgroup.procs", *charge_to]
            self._run(_in_cgroups(joins, _pasta_argv(self.pasta, name, self._pid_file(task_id))))
        except NetnsError:
            self.remove(task_id)
            raise
        except (WallError, OSError) as exc:
            self.remove(task_id)
            raise NetnsError(str(exc)) from exc
        return [self.ip, "netns", "exec", name]

    def remove(self, task_id: int) -> None:
        """End the namespace's pasta, its wall rule and its cgroup, and delete the namespace;
        nothing there is fine."""
        with self.lock:
            self._remove(task_id)

    def _remove(self, task_id: int) -> None:
        pid_file = self._pid_file(task_id)
        pid = _read_pid(pid_file)
        name = self.name(task_id)
        if pid is not None and _is_pasta_for(pid, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)  # out of its cgroups, which can then go
        pid_file.unlink(missing_ok=True)
        with contextlib.suppress(WallError):
            self.wall.release(task_id)
        cgroup_file = self._cgroup_file(task_id)
        with contextlib.suppress(OSError):
            _rmdir_cgroup(Path(cgroup_file.read_text()))
        cgroup_file.unlink(missing_ok=True)
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
                    match = pattern.match(entry.removesuffix(".pid").removesuffix(".cgroup"))
                    if match:
                        found.add(int(match.group(1)))
        removed = sorted(found - keep)
        for task_id in removed:
            log.info("task %d: removing its network namespace", task_id)
            self.remove(task_id)
        with contextlib.suppress(WallError):
            for task_id in self.wall.walled() - keep:  # a rule whose pasta never started
                self.wall.release(task_id)
        return removed

    def build_wall(self) -> None:
        """The agent's wall anew, with the rules of the pastas still running (their tasks
        outlived the agent's last run)."""
        with self.lock:
            try:
                self._claim_pasta_cgroups()
                self.wall.install(resolvers(), self.walled_pastas())
            except (WallError, OSError) as exc:
                raise NetnsError(str(exc)) from exc

    def _claim_pasta_cgroups(self) -> None:
        """Make the pastas' cgroup directory, or mark it made now, before the table: until a
        pasta has a rule, the directory's age is what says the table is in use to a janitor of
        idle walls (tests/harness/netns.py in another test session on the host), which would
        otherwise remove a table between its building and its first rule."""
        _make_cgroup(self.pasta_cgroups)
        # Root's alone: the CPU time in a pasta's cgroup tells how much its task sends and
        # receives, which is no other org's business (any uid may read a cgroup's files).
        self.pasta_cgroups.chmod(0o700)
        os.utime(self.pasta_cgroups)

    def walled_pastas(self) -> dict[int, Path]:
        """The pastas the wall has a rule for, and their cgroups: each one started whose cgroup
        is still there (nft names a cgroup that exists; a rule of a pasta that died before its
        task ended matches nothing, and goes with the task)."""
        walled = {}
        for task_id in self.sweep_candidates():
            cgroup = self.pasta_cgroup(task_id)
            if cgroup is not None and cgroup.is_dir():
                walled[task_id] = cgroup
        return walled

    def sweep_candidates(self) -> set[int]:
        """The task ids that have a pid file here (a pasta started for them)."""
        pattern = re.compile(re.escape(self.prefix) + r"(\d+)\.pid$")
        found = set()
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.pid_dir):
                match = pattern.match(entry)
                if match:
                    found.add(int(match.group(1)))
        return found

    def close_if_idle(self) -> bool:
        """Remove the wall when no pasta of this agent runs (an agent that stops with none
        leaves no table behind; one with tasks running keeps it for their pastas)."""
        if self.sweep_candidates() or any(
            entry.startswith(self.prefix) for entry in _listdir(self.run_dir)
        ):
            return False
        with contextlib.suppress(WallError):
            self.wall.remove()
        self._remove_pasta_cgroups()
        return True

    def close(self) -> None:
        """Remove every namespace, the wall and the pastas' own cgroup directory."""
        self.sweep(set())
        with contextlib.suppress(WallError):
            self.wall.remove()
        self._remove_pasta_cgroups()

    def _remove_pasta_cgroups(self) -> None:
        """This agent's directory of pasta cgroups, then the one above it when no other agent
        of the host has its own there (the kernel refuses a cgroup with children): with a
        cgroup parent of their own, test sessions left one each behind, every run."""
        for directory in (self.pasta_cgroups, self.pasta_cgroups.parent):
            try:
                directory.rmdir()
            except OSError:
                return

    def pasta_cgroup(self, task_id: int) -> Path | None:
        """The cgroup v2 directory the task's pasta was started in (recorded, not read from
        /proc/PID/cgroup, whose paths are relative to the reader's cgroup namespace: an agent
        in a container with one of its own would misread them)."""
        try:
            return Path(self._cgroup_file(task_id).read_text())
        except OSError:
            return None

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

    def _cgroup_file(self, task_id: int) -> Path:
        """Where pasta's cgroup v2 directory is recorded (removed with the namespace)."""
        return self.pid_dir / f"{self.name(task_id)}.cgroup"

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


def _search_lines() -> str:
    """The node's search domains and options, which stay meaningful inside the namespace."""
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return ""
    kept = [line for line in lines if line.split()[:1] in (["search"], ["domain"], ["options"])]
    return "".join(f"{line}\n" for line in kept)


def _in_cgroups(procs_files: Sequence[Path], argv: list[str]) -> list[str]:
    """`argv` run by a shell that first moves itself into each cgroup (`echo 0` to its
    cgroup.procs moves the writer): pasta is in them from its first instruction, so every
    socket it makes (it opens a pool of them at start) carries the cgroup the wall matches."""
    script = (
        'for f do [ "$f" = -- ] && break; echo 0 > "$f" || exit 125; shift; done; shift; exec "$@"'
    )
    return ["/bin/sh", "-c", script, "sh", *map(str, procs_files), "--", *argv]


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _rmdir_cgroup(path: Path, timeout_s: float = 5.0) -> None:
    """Remove pasta's cgroup once empty: a pasta killed by someone else (the task's cgroup.kill,
    a janitor) may still be leaving it, past the point where its pid says it is pasta."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    """Until the process has exited (a zombie has left its cgroups)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.005)


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


def _make_cgroup(path: Path) -> None:
    """`mkdir -p` of a cgroup directory whose parents another agent of the host may remove
    when it stops (`_remove_pasta_cgroups`), between the making of a parent and of its child."""
    for _ in range(3):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    path.mkdir(parents=True, exist_ok=True)
