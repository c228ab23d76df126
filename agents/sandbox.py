"""Turns the launch wrapper's process into a confined task, then becomes the task's command.

Run by path (`python -I -S sandbox.py CONFIG_JSON COMMAND...`) as root, between the wrapper that
records the exit status and the job's command, so it imports nothing but the standard library:
every task start pays for its start-up. In order, it

1. joins the task's cgroup (every process the task starts is then a member), sets its
   `oom_score_adj` to TASK_OOM_SCORE_ADJ (a floor its uid cannot lower), and the task's own
   network namespace when it has one (agents/netns.py), whose resolver it binds over
   /etc/resolv.conf in step 2;
2. enters a mount namespace of its own, with mounts private to it: a fresh `/tmp`, `/var/tmp`,
   `/dev/shm` and the host's other world-writable directories (`PRIVATE_DIRS`), each a tmpfs no
   larger than the task's memory and charged to it, `/proc` showing only the task's own
   processes (hidepid), and every NVIDIA GPU device file other than the task's own covered by an
   unreadable file, so unsetting CUDA_VISIBLE_DEVICES finds nothing (and the driver's
   directories of those GPUs under /proc/driver/nvidia/gpus, which tell their UUIDs, by an
   empty one: agents/dri.py), and the node's D-Bus system bus and journal sockets covered
   (`NODE_SERVICES`); and an IPC namespace of its
   own, so that System V shared memory, semaphores and message queues are the task's alone and
   end with it (a segment left behind would otherwise hold the node's memory after the task);
3. drops to the task's uid and gid with no supplementary groups and umask `TASK_UMASK`, sets
   no_new_privs (setuid programs give nothing back), joins a session keyring of its own, enters
   a Landlock domain of its own where the kernel has one that scopes (6.12 or later): the task
   can then neither connect to an abstract unix socket nor signal a process outside its own
   domain, so another task's abstract sockets (NCCL's, say: the host's network namespace shares
   them) are out of its reach, and enters the working directory as that uid;
4. installs the task's seccomp filter, the program agents/seccomp.py built (`"seccomp"` in its
   config, absent with `--seccomp off`): last, so that nothing before is refused, and it binds
   every process the task starts, which can neither remove it nor lift it with a filter of
   their own;
5. execs the command, with the task's environment: same pid, so the wrapper waits for the
   command itself.

The task's environment reaches it carried (`carried`): every variable under a prefix that
nothing between the agent and here reads. The wrapper's shell, the log copier, the terminal host
and this process run as root, and the job chooses its variables: a job's `PATH` would have the
wrapper's shell run the org's own `mv` as root, its `LD_PRELOAD` load the org's library into
every one of them. Only the command gets them, as the task's uid (`uncarried`).

A step that fails writes one line to the error file (opened before privileges are dropped) and
exits 126 (127: command not found): the runner reports that line as the task's reason.

With `"enter": true` in its config it instead puts a new process into a running task's sandbox
(`fairgpu attach --new`, agents/shells.py): it joins the task's cgroup and network namespace,
enters the mount and IPC namespaces of one of the task's processes, then takes steps 3 to 5 as
above. A step that fails writes its line to stderr (the new shell's terminal) and exits 126.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import signal
import sys
from typing import Any

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS = 38
# seccomp(2): SECCOMP_SET_MODE_FILTER with SECCOMP_FILTER_FLAG_SPEC_ALLOW (linux/seccomp.h).
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine)
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1, 4
SECCOMP_FLAGS = SECCOMP_FILTER_FLAG_SPEC_ALLOW
"""What the filter is installed with; read at each install, so that a test can make the agent's
start-up probe (`filter_refusal`) ask for what a kernel refuses."""
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), linux/nsfs.h
# Landlock (linux/landlock.h); the numbers are the same on every architecture.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_RESTRICT_SELF = 444, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, LANDLOCK_SCOPE_SIGNAL = 0x1, 0x2
LANDLOCK_SCOPE_ABI = 6
# keyctl(2), whose number differs between architectures; KEYCTL_JOIN_SESSION_KEYRING.
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
KEYCTL_JOIN_SESSION_KEYRING = 1
_GPU_DEVICE = re.compile(r"^nvidia(\d+)$")
# Directories any user may write to on common distributions: each task gets empty ones of its
# own, so that nothing it writes there reaches the host's disk or another task.
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/var/crash")  # noqa: S108

NODE_SERVICES = (
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/run/systemd/io.systemd.Manager",
    "/run/systemd/journal",
    "/dev/log",
)
"""The node's services a task has no use for and must not reach (each covered where it is, a
link through its target). On the D-Bus system bus, systemd answers any uid's
`GetUnitProcesses` with every process of a unit and its command line, read as root: tasks live
in the agent's unit, so another org's task read every task's command line there, past hidepid
(systemd's own sockets, its private bus and its varlink API, go with it). Lines sent to the
journal (or syslog's `/dev/log`) read as the agent's unit's own and spent its share of
journald's rate limit."""

TASK_UMASK = 0o027
"""Every task process's umask, whatever the agent's was: what a task creates outside its own
0700 directory (a node's world-writable `/scratch`, an org root left 0755) is readable by its
org's uid and gid alone, never by another org's. The systemd unit's `UMask=0027`, which tasks
inherited, did this on those nodes only; under the DaemonSet or a root shell tasks got 0022."""

TASK_OOM_SCORE_ADJ = 500
"""Every task process's `oom_score_adj`: when the node runs out of memory, the kernel's OOM
killer takes a task before the agent (which sets its own low, agents.isolation) or the node's
services. Written as root, it is also the floor the task's uid cannot go below (the kernel's
`oom_score_adj_min`, set by a writer holding CAP_SYS_RESOURCE), and its children inherit both."""

CARRIED_PREFIX = "FAIRGPU_SANDBOXED_"
"""Before each variable of the task's environment on its way through root's processes."""

_libc = ctypes.CDLL(None, use_errno=True)


def carried(task_env: dict[str, str], own: dict[str, str]) -> dict[str, str]:
    """The environment of root's processes between the agent and a confined task's command:
    `own` (the agent's PATH and locale, which they run with) and the task's variables, each
    under CARRIED_PREFIX (job variable names never start with FAIRGPU_)."""
    return own | {CARRIED_PREFIX + name: value for name, value in task_env.items()}


def uncarried(environ: dict[str, str]) -> dict[str, str]:
    """The task's environment, from what `carried` made: nothing else of this process's."""
    size = len(CARRIED_PREFIX)
    return {
        name[size:]: value for name, value in environ.items() if name.startswith(CARRIED_PREFIX)
    }


class SandboxError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def join_cgroup(procs_files: list[str]) -> None:
    pid = str(os.getpid())
    for path in procs_files:
        with open(path, "w") as f:
            f.write(pid)


def mark_for_oom() -> None:
    """TASK_OOM_SCORE_ADJ for this process and all it starts, before it drops to the task's
    uid: otherwise it keeps the agent's own low value, inherited, and the kernel's OOM killer,
    out of the node's memory, would pass over the task to end the agent or a node service."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(TASK_OOM_SCORE_ADJ))


def join_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")
    finally:
        os.close(fd)


def private_mounts(config: dict[str, Any]) -> None:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare(CLONE_NEWNS | CLONE_NEWIPC)")
    # Nothing mounted from here on propagates back to the host, nor to other tasks.
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    if config.get("resolv_conf"):  # the resolver of the task's own network namespace
        _mount(config["resolv_conf"], "/etc/resolv.conf", None, MS_BIND, None)
    # A link (/var/lock -> /run/lock) is covered through its target; a directory only once.
    fresh = list(dict.fromkeys(os.path.realpath(t) for t in PRIVATE_DIRS if os.path.isdir(t)))
    # Directories the task needs that lie under one of those (its own, its data roots, the GPU
    # device directory) are held open and bound back into the fresh mounts.
    kept = [
        (path, os.open(path, os.O_PATH | os.O_CLOEXEC))
        for path in config.get("keep", [])
        if any(_under(path, target) for target in fresh) and os.path.isdir(path)
    ]
    size = config.get("tmpfs_bytes")
    options = f"mode=1777,size={size}" if size else "mode=1777"
    for target in fresh:
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
    if os.path.isdir("/dev/mqueue"):  # the new IPC namespace's POSIX message queues
        try:
            _mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        except SandboxError:
            _mount("tmpfs", "/dev/mqueue", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=000")
    for path, fd in kept:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        os.close(fd)
    if config.get("hide_processes", True):
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
        except SandboxError:  # kernels before 5.8 know only the number
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    fence_gpus(config["dev_dir"], set(config["gpu_minors"]), config.get("cover", []))
    for directory in config.get("hide", []):
        if os.path.isdir(directory):
            _hide_directory(directory)
    close_node_services()


def _hide_directory(directory: str) -> None:
    _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=000")


def close_node_services() -> None:
    """Cover each of NODE_SERVICES present: a directory by an empty one nobody may enter, a
    socket by a file nobody may open (connecting to it is refused)."""
    found = dict.fromkeys(os.path.realpath(path) for path in NODE_SERVICES)
    directories = [path for path in found if os.path.isdir(path)]
    for directory in directories:
        _hide_directory(directory)
    # What lies under a directory just covered is gone already.
    _cover([path for path in found if os.path.exists(path) and path not in directories])


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def fence_gpus(dev_dir: str, allowed_minors: set[int], others: list[str]) -> None:
    """Cover every GPU device file but the task's own with a file nobody may open, and
    `others` too (other GPUs' DRI nodes, which the agent found: agents/dri.py)."""
    try:
        names = os.listdir(dev_dir)
    except FileNotFoundError:
        names = []
    foreign = [
        os.path.join(dev_dir, name)
        for name in names
        if (match := _GPU_DEVICE.match(name)) and int(match.group(1)) not in allowed_minors
    ]
    foreign += [path for path in others if os.path.lexists(path)]
    foreign += [
        alias
        for elsewhere in _aliases(dev_dir)
        for path in foreign
        if _under(path, dev_dir)
        and _same_inode(alias := os.path.join(elsewhere, os.path.relpath(path, dev_dir)), path)
    ]
    _cover(foreign)


def _cover(paths: list[str]) -> None:
    """Bind a file nobody may open over each of `paths` (device files, sockets)."""
    if not paths:
        return
    mask = "/tmp/.fairgpu-mask"  # noqa: S108 - the private /tmp mounted above
    os.close(os.open(mask, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o000))
    for path in paths:
        _mount(mask, path, None, MS_BIND, None)
    os.unlink(mask)  # the bind mounts keep the inode


def _aliases(directory: str) -> list[str]:
    """Other paths at which this mount namespace shows `directory`: its filesystem mounted, or
    bind-mounted, elsewhere too (a second devtmpfs, a chroot's /dev) shows the same device
    files there, and a fence by path must cover them at every such path."""
    try:
        device = os.stat(directory).st_dev
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    number = f"{os.major(device)}:{os.minor(device)}"
    mounts = [  # (the mount's root within the filesystem, where it is mounted)
        (_unescape(fields[3]), _unescape(fields[4]))
        for fields in (line.split() for line in lines)
        if len(fields) > 4 and fields[2] == number
    ]
    real = os.path.realpath(directory)
    showing = [(root, point) for root, point in mounts if _under(real, point)]
    if not showing:
        return []
    root, point = max(showing, key=lambda mount: len(mount[1]))
    inside = os.path.normpath(os.path.join(root, os.path.relpath(real, point)))
    aliases = [
        os.path.realpath(os.path.join(point, os.path.relpath(inside, root)))
        for root, point in mounts
        if _under(inside, root)
    ]
    return [alias for alias in dict.fromkeys(aliases) if alias != real]


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (a space is \\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _same_inode(path: str, original: str) -> bool:
    try:
        return _same_file(os.lstat(path), os.lstat(original))
    except OSError:
        return False


def become(uid: int, gid: int) -> None:
    os.umask(TASK_UMASK)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    own_session_keyring()


def own_session_keyring() -> None:
    """A new, empty session keyring owned by the task. Without it the task would possess the
    agent's (systemd gives each service one), and with it every other task's keys: possession
    grants read and write whatever the uid."""
    if SYS_KEYCTL is None:
        return
    if _libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        raise SandboxError(f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(ctypes.get_errno())}")


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or it is disabled)."""
    version = _libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(int(version), 0)


def scope() -> bool:
    """A Landlock domain scoping abstract unix sockets and signals to the task; no rule on
    files or ports. False where the kernel cannot (before 6.12): the task runs without it.
    Needs no_new_privs, which `become` has set."""
    if landlock_abi() < LANDLOCK_SCOPE_ABI:
        return False
    attr = _LandlockRulesetAttr(0, 0, LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL)
    fd = _libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0
    )
    if fd < 0:
        raise SandboxError(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0), "landlock_restrict_self")
    finally:
        os.close(fd)
    return True


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def filter_system_calls(program: bytes) -> None:
    """Install `program` (struct sock_filter entries, agents/seccomp.py) for this process and
    all it starts. Needs no_new_privs, which `become` has set.

    SPEC_ALLOW, as docker's runtime asks: before Linux 5.16 a filter also turned on the CPU's
    speculative store bypass mitigation for the task, slowing its own computation, against
    an attack from within its own address space that no other tenant shares."""
    assert SYS_SECCOMP is not None  # the agent builds programs only for machines it knows
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    done = _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FLAGS, ctypes.byref(fprog))
    if done != 0:
        raise SandboxError(f"seccomp(SET_MODE_FILTER): {os.strerror(ctypes.get_errno())}")


def filter_refusal(program: bytes) -> int:
    """The errno with which this kernel refuses `program` as the sandbox installs it (the same
    call and flags, after no_new_privs); 0 when it takes it. Tried in a forked child that
    exits at once, so the caller stays unfiltered. The agent asks at start: a kernel that
    refused the flags (Linux 4.14 to 4.16 has seccomp filters but no SPEC_ALLOW) failed every
    strict task at its start, each with the same line, instead of the agent refusing once."""
    pid = os.fork()
    if pid == 0:
        status = 255  # anything but the call's own refusal: the child itself failed
        try:
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
            filter_system_calls(program)
            status = 0
        except SandboxError:
            status = ctypes.get_errno() or 255
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def task_namespaces(members_file: str) -> tuple[int, int]:
    """Open (mount, IPC) namespace fds of one of the task's processes: ones the sandbox made.

    A task's process may have made namespaces of its own (an unprivileged user namespace with
    a mount namespace in it): those are the tenant's, and entering them as root would let the
    task arrange what this process sees before it drops its privileges. Only namespaces owned
    by this process's own user namespace (which no task process can create) and other than
    this process's own (the host's) are taken. The pid is held through a pidfd and checked
    to be still a member after its namespaces are opened, so a pid reused meanwhile is not."""
    own_user = os.stat("/proc/self/ns/user")
    own_mnt = os.stat("/proc/self/ns/mnt")
    for pid in _members(members_file):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        fds: list[int] = []
        try:
            for ns in ("mnt", "ipc"):
                fds.append(os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
            signal.pidfd_send_signal(pidfd, 0)  # still that process: the fds are its
            ours = all(_owned_by(fd, own_user) for fd in fds)
            host = _same_file(os.fstat(fds[0]), own_mnt)
            if ours and not host and pid in _members(members_file):
                mnt, ipc = fds
                fds = []
                return mnt, ipc
        except OSError:
            pass
        finally:
            for fd in fds:
                os.close(fd)
            os.close(pidfd)
    raise SandboxError("no process of the task is in its sandbox (has it ended?)")


def _members(path: str) -> list[int]:
    with open(path) as f:
        return [int(line) for line in f if line.strip()]


def _owned_by(ns_fd: int, user_ns: os.stat_result) -> bool:
    owner = fcntl.ioctl(ns_fd, NS_GET_USERNS)
    try:
        return _same_file(os.fstat(owner), user_ns)
    finally:
        os.close(owner)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def enter(config: dict[str, Any], command: list[str]) -> int:
    """A new process in the running task's sandbox, then `command` as the task's uid."""
    step = "finding the task's sandbox"
    try:
        mnt, ipc = task_namespaces(config["members"])
        netns = (
            os.open(config["netns"], os.O_RDONLY | os.O_CLOEXEC) if config.get("netns") else None
        )
        step = "joining the task's cgroup"
        join_cgroup(config["cgroup_procs"])
        mark_for_oom()
        step = "entering the task's namespaces"
        if netns is not None:
            _check(_libc.setns(netns, CLONE_NEWNET), "setns(CLONE_NEWNET)")
        _check(_libc.setns(ipc, CLONE_NEWIPC), "setns(CLONE_NEWIPC)")
        _check(_libc.setns(mnt, CLONE_NEWNS), "setns(CLONE_NEWNS)")
        step = "switching to the task's user"
        become(config["uid"], config["gid"])
        step = "scoping the shell's abstract sockets and signals"
        scope()
        step = f"entering the working directory {config['cwd']}"
        os.chdir(config["cwd"])
        if config.get("seccomp"):
            step = "applying the task's seccomp filter"
            filter_system_calls(bytes.fromhex(config["seccomp"]))
        step = f"starting {command[0]}"
        os.execvpe(command[0], command, uncarried(dict(os.environ)))  # noqa: S606 - no shell string
    except (OSError, SandboxError, ValueError, KeyError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        os.write(2, f"fairgpu: {step}: {detail}\r\n".encode())
    return 126


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    command = argv[2:]
    if config.get("enter"):
        return enter(config, command)
    error_fd = os.open(
        config["error_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
    )
    step = "starting the sandbox"
    try:
        step = "joining the task's cgroup"
        join_cgroup(config["cgroup_procs"])
        step = "setting the task's oom_score_adj"
        mark_for_oom()
        if config.get("netns"):
            step = "entering the task's network namespace"
            join_netns(config["netns"])
        step = "setting up the task's mounts"
        private_mounts(config)
        step = "switching to the task's user"
        become(config["uid"], config["gid"])
        step = "scoping the task's abstract sockets and signals"
        scope()
        step = f"entering the working directory {config['cwd']}"
        os.chdir(config["cwd"])
        if config.get("seccomp"):
            step = "applying the task's seccomp filter"
            filter_system_calls(bytes.fromhex(config["seccomp"]))
        step = f"starting {command[0]}"
        os.execvpe(command[0], command, uncarried(dict(os.environ)))  # noqa: S606 - argv as given
    except FileNotFoundError as exc:
        if step.startswith("starting "):
            os.write(error_fd, f"command not found: {command[0]}\n".encode())
            return 127
        os.write(error_fd, f"{step}: {exc.strerror or exc}\n".encode())
    except (OSError, SandboxError, ValueError, KeyError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        os.write(error_fd, f"{step}: {detail}\n".encode())
    return 126


if __name__ == "__main__":
    sys.exit(main(sys.argv))
