"""Strict isolation with real processes, as root: two orgs' tasks on one node with fake GPUs.

The GPU device files are real character devices made with mknod (major 195, as the NVIDIA
driver's) in a temporary directory: opening one without a driver fails with ENXIO once the
permission check has passed (ENODEV or opened on a GPU node), and with EACCES where the task's
fence covers it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agents.cgroups import HugePool, huge_pools, open_hierarchy
from agents.disk import DiskConfig
from agents.isolation import (
    AGENT_OOM_SCORE_ADJ,
    CAP_SYS_RESOURCE,
    Confinement,
    IsolationConfig,
    IsolationUnavailable,
    default_memory_reserve,
    has_capability,
)
from agents.runner import Runner, RunnerConfig
from agents.sandbox import LANDLOCK_SCOPE_ABI, TASK_OOM_SCORE_ADJ, landlock_abi
from agents.state import StateDir
from protocol.agent import TaskSignal
from tests.agents.helpers import require_cgroups, spec, wait_for

# Tasks run as other uids: they need an interpreter those can reach (the test's own may live
# under root's home). The probes use only the standard library.
PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
# Task uids of this test process's own (tasks of one org run as one uid, and several tests
# count or signal a uid's processes): two checkouts or xdist workers never share one.
UID_BASE = 100_000 + (os.getpid() % 10_000) * 100
ACME, RIVAL = {"org": "acme", "org_id": 1}, {"org": "rival", "org_id": 2}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")


class Node:
    def __init__(
        self,
        tmp_path: Path,
        runner_config: RunnerConfig | None = None,
        *,
        total_gpus: int = 4,
        **overrides: Any,
    ) -> None:
        self.root = tmp_path
        self.dev = tmp_path / "dev"
        self.dev.mkdir()
        for name, minor in [*((f"nvidia{m}", m) for m in range(4)), ("nvidiactl", 255)]:
            os.mknod(self.dev / name, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
            os.chmod(self.dev / name, 0o666)  # as the driver's own: the fence is what stops it
        self.data = tmp_path / "data"
        for org in ("acme", "rival"):
            (self.data / org).mkdir(parents=True)
        self.state = StateDir(tmp_path / "state")
        fields: dict[str, Any] = {
            "mode": "strict",
            "task_root": tmp_path / "tasks",
            "task_uid_base": UID_BASE,
            "org_roots": (str(self.data / "{org}"),),
            "memory_per_gpu_bytes": 512 * 2**20,
            "pids_max": 256,
            "cgroup_parent": f"fairgpu-test-{uuid.uuid4().hex[:8]}",
            "dev_dir": self.dev,
            "hide": (self.state.root,),
        }
        fields.update(overrides)
        self.confinement = Confinement(IsolationConfig(**fields), total_gpus=total_gpus)
        self.runner = Runner(self.state, runner_config, confinement=self.confinement)

    def run(self, task_id: int, command: list[str], **fields: Any) -> dict[str, Any]:
        self.runner.start(spec(task_id, command, **fields))
        return self.finish(task_id)

    def finish(self, task_id: int, timeout_s: float = 20.0) -> dict[str, Any]:
        wait_for(
            lambda: (
                (self.runner.poll(), self.runner.records[task_id].state)[1]
                not in ("starting", "running")
            ),
            timeout_s,
        )
        record = self.runner.records[task_id]
        return {
            "state": record.state,
            "exit_code": record.exit_code,
            "signal": record.signal,
            "reason": record.reason,
            "log": self.state.read_log(record).decode(),
        }

    def task_pids(self, task_id: int) -> list[int]:
        group = self.confinement.cgroup(task_id)
        assert group is not None
        return group.pids()

    def close(self) -> None:
        for task_id, record in self.runner.records.items():
            if record.state in ("starting", "running"):
                self.confinement.kill(task_id)
            self.confinement.finish(task_id)
        for child in self.runner._children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        assert self.confinement.cgroups is not None
        self.confinement.cgroups.remove()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    require_cgroups()
    n = Node(tmp_path)
    yield n
    n.close()


@pytest.fixture
def unfiltered_node(tmp_path: Path) -> Iterator[Node]:
    """A node with `--seccomp off`: the walls the filter stands in front of (the user
    namespaces and keys it refuses, tests/agents/test_seccomp.py) must hold without it too."""
    require_cgroups()
    n = Node(tmp_path, seccomp=False)
    yield n
    n.close()


@pytest.fixture
def disk_node(tmp_path: Path) -> Iterator[Node]:
    """A node whose tasks may hold 16 MiB and 200 files of its disk."""
    limits = DiskConfig(task_max_bytes=16 * 2**20, task_max_files=200, node_reserve_bytes=0)
    n = Node(tmp_path, RunnerConfig(disk=limits))
    yield n
    n.close()


def gone(pid: int) -> bool:
    """Ended (a zombie waits only for the host's init to reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def python(code: str) -> list[str]:
    return [PY, "-c", code]


def test_a_task_runs_as_its_org_uid_in_its_own_directory(node: Node) -> None:
    code = (
        "import json, os; print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), "
        "'groups': os.getgroups(), 'cwd': os.getcwd(), 'home': os.environ['HOME'], "
        "'mode': oct(os.stat(os.environ['HOME']).st_mode & 0o777), "
        "'user': os.environ.get('USER')}))"
    )
    result = node.run(1, python(code), **ACME)
    assert result["state"] == "exited", result
    seen = json.loads(result["log"])
    home = str(node.root / "tasks" / "1")
    assert seen == {
        "uid": UID_BASE + 1,
        "gid": UID_BASE + 1,
        "groups": [],
        "cwd": home,
        "home": home,
        "mode": "0o700",
        "user": None,
    }
    assert not Path(home).exists()  # removed when the task ended


def test_a_workdir_must_lie_under_the_org_roots(node: Node) -> None:
    refused = node.run(1, ["true"], workdir="/etc", **ACME)
    assert refused["state"] == "failed_to_start"
    assert refused["reason"] == (
        f"workdir /etc is outside the data roots allowed to org acme ({node.data / 'acme'})"
    )
    other_org = node.run(2, ["true"], workdir=str(node.data / "rival"), **ACME)
    assert other_org["state"] == "failed_to_start"
    os.chown(node.data / "acme", UID_BASE + 1, UID_BASE + 1)
    allowed = node.run(3, ["sh", "-c", "pwd; touch out"], workdir=str(node.data / "acme"), **ACME)
    assert (allowed["state"], allowed["exit_code"]) == ("exited", 0), allowed
    assert allowed["log"] == f"{node.data / 'acme'}\n"
    assert (node.data / "acme" / "out").stat().st_uid == UID_BASE + 1


def test_an_org_without_a_uid_is_refused(node: Node) -> None:
    result = node.run(1, ["true"], org="nobody", org_id=None)
    assert result == {**result, "state": "failed_to_start"}
    assert result["reason"] == "this node has no uid for org nobody"


def test_one_org_cannot_reach_another_orgs_task(node: Node) -> None:
    secret = "acme-model-weights-key"
    node.runner.start(
        spec(1, ["sh", "-c", "echo private > $HOME/notes; exec sleep 60"],
             env={"ACME_SECRET": secret}, gpus=[0], **ACME)
    )  # fmt: skip
    wait_for(lambda: len(node.task_pids(1)) == 1 and (node.root / "tasks/1/notes").exists())
    [victim] = node.task_pids(1)
    probe = f"""
import json, os, signal
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return type(exc).__name__
tried = {{
    "environ": attempt(lambda: open("/proc/{victim}/environ").read()),
    "cmdline": attempt(lambda: open("/proc/{victim}/cmdline").read()),
    "visible": str({victim}) in os.listdir("/proc"),
    "signal": attempt(lambda: os.kill({victim}, signal.SIGTERM)),
    "home": attempt(lambda: open("{node.root}/tasks/1/notes").read()),
    "credential": attempt(lambda: open("{node.state.credential_path}").read()),
    "record": attempt(lambda: open("{node.state.task_dir(1)}/record.json").read()),
    "log": attempt(lambda: os.listdir("{node.state.task_dir(1)}")),
    "data": attempt(lambda: os.listdir("{node.data / "acme"}")),
    "gpu": attempt(lambda: os.close(os.open("{node.dev}/nvidia0", os.O_RDWR))),
}}
print(json.dumps(tried))
"""
    node.state.credential_path.write_text("{}")
    os.chmod(node.data / "acme", 0o700)
    os.chown(node.data / "acme", UID_BASE + 1, UID_BASE + 1)
    result = node.run(2, python(probe), gpus=[1], **RIVAL)
    assert result["state"] == "exited", result
    tried = json.loads(result["log"])
    assert all(v != "allowed" for k, v in tried.items() if k != "visible"), tried
    assert tried["visible"] is False  # /proc shows a task its own processes only
    assert tried["signal"] == "PermissionError"
    assert tried["gpu"] == "PermissionError"
    assert psutil.pid_exists(victim)
    assert secret not in result["log"]


def test_a_task_opens_only_its_own_gpu_device_files(node: Node) -> None:
    code = f"""
import errno, os
for name in sorted(os.listdir("{node.dev}")):
    try:
        os.close(os.open("{node.dev}/" + name, os.O_RDWR))
        print(name, "opened")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
"""
    # Without CUDA_VISIBLE_DEVICES the task still finds nothing else to open.
    result = node.run(1, python(code), gpus=[1, 3], env={"CUDA_VISIBLE_DEVICES": ""}, **ACME)
    lines = dict(line.split() for line in result["log"].splitlines())
    assert through(lines) == {
        "nvidia0": False,
        "nvidia1": True,
        "nvidia2": False,
        "nvidia3": True,
        "nvidiactl": True,
    }, lines
    # The host's own view is unchanged: no fence.
    assert open_outcome(node.dev / "nvidia0") != "EACCES"


def open_outcome(path: Path) -> str:
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "opened"


def through(outcomes: dict[str, str]) -> dict[str, bool]:
    """Each device file's open let through (True) or fenced off (EACCES: False). Through, the
    fake device file gives ENXIO where no NVIDIA driver is loaded, ENODEV where one is but has
    no device of that minor, and opens where it has (run on a GPU node: tests/gpu)."""
    assert set(outcomes.values()) <= {"EACCES", "ENXIO", "ENODEV", "opened"}, outcomes
    return {name: outcome != "EACCES" for name, outcome in outcomes.items()}


def test_another_path_to_the_device_files_is_fenced_too(node: Node) -> None:
    """The device files the fence covers at the device directory are the same files wherever
    their filesystem is mounted again (a second devtmpfs, a chroot's /dev bound in): before,
    a task opened another GPU's device file there."""
    elsewhere = Path(f"/run/fairgpu-test-{uuid.uuid4().hex[:8]}/dev")
    elsewhere.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(node.dev), str(elsewhere)], check=True)
    try:
        code = f"""
import errno, os
for name in ("nvidia0", "nvidia1", "nvidiactl"):
    try:
        os.close(os.open("{elsewhere}/" + name, os.O_RDWR))
        print(name, "opened")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
"""
        result = node.run(1, python(code), gpus=[0], **ACME)
        lines = dict(line.split() for line in result["log"].splitlines())
        assert through(lines) == {"nvidia0": True, "nvidia1": False, "nvidiactl": True}, lines
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
        elsewhere.rmdir()
        elsewhere.parent.rmdir()


def test_a_task_cannot_lift_its_fence_nor_leave_its_cgroup(unfiltered_node: Node) -> None:
    """What an unprivileged user namespace gives a task (every capability, inside it) does not
    undo what the sandbox mounted: the fence over another GPU's file and the task's whole /dev
    come as one locked unit, which can be neither unmounted nor bound elsewhere without its
    covers. Nor can the task move itself out of its cgroup, into its parent, the hierarchy's
    root or another org's task. On a node with `--seccomp off`: the filter refuses the user
    namespace (and the mounts) before any of this is reached."""
    node = unfiltered_node
    node.runner.start(spec(1, ["sleep", "60"], gpus=[1], **RIVAL))
    wait_for(lambda: len(node.task_pids(1)) == 1)
    rival = node.confinement.cgroup(1)
    assert rival is not None
    own_dir = node.confinement.cgroups.parents()[0]  # type: ignore[union-attr]
    targets = [
        own_dir / "cgroup.procs",
        Path(os.path.commonpath([own_dir, Path("/sys/fs/cgroup")])) / "cgroup.procs",
        *rival.procs_files,
    ]
    code = f"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def err(call):
    return "allowed" if call == 0 else errno.errorcode[ctypes.get_errno()]
def opened(path):
    try:
        os.close(os.open(path, os.O_RDWR))
        return "opened"
    except OSError as exc:
        return errno.errorcode[exc.errno]
tried = {{}}
for path in {[str(t) for t in targets]!r}:
    try:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        tried[path] = "allowed"
    except OSError as exc:
        tried[path] = errno.errorcode[exc.errno]
CLONE_NEWUSER, CLONE_NEWNS, MNT_DETACH, MS_BIND = 0x10000000, 0x20000, 2, 0x1000
tried["userns"] = err(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
tried["umount mask"] = err(libc.umount2(b"{node.dev}/nvidia0", MNT_DETACH))
os.makedirs("/tmp/bare", exist_ok=True)
tried["bind dev bare"] = err(libc.mount(b"{node.dev}", b"/tmp/bare", None, MS_BIND, None))
tried["open bare"] = opened("/tmp/bare/nvidia0")
tried["open after"] = opened("{node.dev}/nvidia0")
for key, value in tried.items():
    print(f"{{key}}={{value}}")
"""
    result = node.run(2, python(code), gpus=[1], **ACME)
    lines = dict(line.split("=", 1) for line in result["log"].splitlines())
    assert lines.pop("userns") == "allowed", result  # the kernel lets any user make one
    assert lines.pop("umount mask") == "EINVAL", lines  # locked: came with the namespace
    assert lines.pop("bind dev bare") == "EINVAL", lines  # not without the covers beneath
    assert lines.pop("open bare") == "ENOENT", lines
    assert lines.pop("open after") == "EACCES", lines
    assert set(lines.values()) <= {"EACCES", "EPERM"}, lines
    assert len(lines) == len(targets)
    assert node.task_pids(1) == rival.pids()


def test_a_task_opens_no_other_gpus_dri_nodes(tmp_path: Path) -> None:
    """With nvidia-drm each GPU also has DRI nodes, render nodes 0666 under udev's default
    rules: before, a task fenced to its /dev/nvidiaN still opened another GPU's render node.
    Nor does it read another GPU's directory of the driver's (tests/gpu saw a task given no
    GPU read the UUID of a real H200 there).

    The DRI nodes are real character devices (major 226, mknod); what the kernel says about
    them (sysfs's device link and vendor, the NVIDIA driver's "Device Minor") is laid out in a
    directory as this host, which has no NVIDIA driver, cannot show it."""
    sys_dir = tmp_path / "sys"
    # Outside /tmp, which the task sees a fresh one of, as it sees the real /proc/driver.
    driver = Path(f"/run/fairgpu-test-{uuid.uuid4().hex[:8]}/driver")
    node = Node(tmp_path, sys_dir=sys_dir, nvidia_driver_dir=driver)
    try:
        dri = node.dev / "dri"
        dri.mkdir()
        # (node, DRI minor, PCI bus id, vendor, NVIDIA minor): card0 is the BMC's graphics,
        # renderD130 a GPU the driver says nothing of.
        nodes = [
            ("card0", 0, "0000:02:00.0", "0x1a03", None),
            ("card1", 1, "0000:41:00.0", "0x10de", 0),
            ("renderD128", 128, "0000:41:00.0", "0x10de", 0),
            ("card2", 2, "0000:42:00.0", "0x10de", 1),
            ("renderD129", 129, "0000:42:00.0", "0x10de", 1),
            ("renderD130", 130, "0000:43:00.0", "0x10de", None),
        ]
        for name, minor, bus_id, vendor, gpu in nodes:
            os.mknod(dri / name, 0o666 | stat.S_IFCHR, os.makedev(226, minor))
            os.chmod(dri / name, 0o666)
            pci = sys_dir / "devices/pci0000:00" / bus_id
            pci.mkdir(parents=True, exist_ok=True)
            (pci / "vendor").write_text(vendor + "\n")
            (sys_dir / "dev/char" / f"226:{minor}").mkdir(parents=True)
            (sys_dir / "dev/char" / f"226:{minor}" / "device").symlink_to(pci)
            if gpu is not None:
                (driver / "gpus" / bus_id).mkdir(parents=True, exist_ok=True)
                (driver / "gpus" / bus_id / "information").write_text(
                    f"Model: \t\t NVIDIA H100\nIRQ:   \t\t 42\nDevice Minor: \t {gpu}\n"
                )
        code = f"""
import errno, os
for name in sorted(os.listdir("{dri}")):
    try:
        os.close(os.open("{dri}/" + name, os.O_RDWR))
        print(name, "opened")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
for bus_id in ("0000:41:00.0", "0000:42:00.0"):
    try:
        with open("{driver}/gpus/" + bus_id + "/information") as f:
            print(bus_id, "read" if "Device Minor" in f.read() else "empty")
    except OSError as exc:
        print(bus_id, errno.errorcode[exc.errno])
"""
        result = node.run(1, python(code), gpus=[0], **ACME)
        lines = dict(line.split() for line in result["log"].splitlines())
        # The driver's directory of another GPU (its UUID, bus, firmware) is hidden too.
        assert lines.pop("0000:41:00.0") == "read", result
        assert lines.pop("0000:42:00.0") == "EACCES", result
        fenced = {name for name, outcome in lines.items() if outcome == "EACCES"}
        assert set(lines) == {name for name, *_ in nodes}, result
        assert fenced == {"card2", "renderD129", "renderD130"}, lines
    finally:
        node.close()
        shutil.rmtree(driver.parent, ignore_errors=True)


def test_a_process_slow_to_exit_is_waited_for_before_its_task_is_removed(tmp_path: Path) -> None:
    """A killed process leaves `cgroup.procs` as it starts to exit and stays a member until
    it has: a CUDA process on a real H200 took long enough that removing the task's cgroup
    failed (EBUSY), the agent's poll raised, and the task's directory stayed on the node's disk.
    Here the slow exit is a process with 1.5 GiB to unmap, left behind by the task."""
    node = Node(tmp_path, memory_per_gpu_bytes=3 * 2**30)
    try:
        hog = (
            "b = bytearray(1536 << 20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "print('ready', flush=True)\n"
            "import time; time.sleep(600)\n"
        )
        code = (
            "import subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-c', {hog!r}], start_new_session=True,"
            " stdout=subprocess.PIPE, text=True)\n"
            "print(p.stdout.readline().strip(), flush=True)\n"
        )
        result = node.run(1, python(code), **ACME)
        assert (result["state"], result["log"]) == ("exited", "ready\n"), result
        group = node.confinement.cgroup(1)
        assert group is not None
        assert not group.exists()
        assert not node.confinement.task_dir(1).exists()
    finally:
        node.close()


def test_a_setsid_child_does_not_outlive_its_task(node: Node) -> None:
    code = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen(['setsid', 'sleep', '300'], start_new_session=True,\n"
        "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    result = node.run(1, python(code), **ACME)
    assert (result["state"], result["exit_code"]) == ("exited", 0)
    orphan = int(result["log"].split()[0])
    wait_for(lambda: gone(orphan))


def test_a_double_forked_daemon_ends_when_its_task_is_stopped(node: Node) -> None:
    node.runner.start(
        spec(1, ["sh", "-c", "(setsid sh -c 'exec sleep 300' &) ; exec sleep 300"], **ACME)
    )
    wait_for(lambda: len(node.task_pids(1)) == 2)
    pids = node.task_pids(1)
    node.runner.stop(1, grace_s=0.2, reason="cancelled")
    result = node.finish(1)
    assert result["state"] == "stopped"
    assert all(gone(p) for p in pids)


def test_a_stopped_task_gets_sigterm_once_also_where_it_left_the_group(node: Node) -> None:
    # The runner signals the wrapper's process group, then the cgroup's members that left it: a
    # second SIGTERM during a checkpoint handler would re-enter it (the flake this replaced:
    # Python's print in a re-entered handler raises). The wakeup fd counts deliveries in C.
    code = (
        "import os, signal, subprocess, sys, time\n"
        "r, w = os.pipe(); os.set_blocking(w, False)\n"
        "signal.set_wakeup_fd(w); signal.signal(signal.SIGTERM, lambda *_: None)\n"
        "role = sys.argv[1]\n"
        "if role == 'leader':\n"
        "    child = subprocess.Popen([sys.executable, '-c', sys.argv[2], 'left', sys.argv[2]],\n"
        "                             start_new_session=True)\n"
        "print('ready', role, flush=True)\n"
        "os.read(r, 1)\n"
        "time.sleep(1.0)  # any second SIGTERM arrives meanwhile\n"
        "os.set_blocking(r, False); extra = 0\n"
        "try: extra = len(os.read(r, 64))\n"
        "except BlockingIOError: pass\n"
        "if role == 'leader': child.wait()\n"
        "print(role, 'got', 1 + extra, flush=True)\n"
    )
    node.runner.start(spec(1, [PY, "-c", code, "leader", code], **ACME))
    record = node.runner.records[1]
    wait_for(lambda: node.state.read_log(record).decode().count("ready") == 2)
    node.runner.stop(1, grace_s=20, reason="cancelled")
    result = node.finish(1, timeout_s=30)
    assert (result["state"], result["exit_code"]) == ("stopped", 0)
    assert sorted(result["log"].splitlines()[2:]) == ["leader got 1", "left got 1"]


def test_a_fork_bomb_is_held_by_the_pids_limit(node: Node) -> None:
    code = (
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        children += 1\n"
        "except OSError as exc:\n"
        "    print('stopped after', children, exc.strerror, flush=True)\n"
        "time.sleep(60)\n"
    )
    node.runner.start(spec(1, python(code), **ACME))
    wait_for(lambda: "stopped after" in node.state.read_log(node.runner.records[1]).decode(), 30)
    log = node.state.read_log(node.runner.records[1]).decode()
    children = int(log.split()[2])
    assert children < 256
    # The node still starts work for others while the bomb holds its limit.
    assert node.run(2, ["true"], **RIVAL)["state"] == "exited"
    node.runner.stop(1, grace_s=0, reason="cancelled")
    assert node.finish(1)["state"] == "stopped"
    assert node.task_pids(1) == []


def test_a_task_holds_at_most_its_gpus_share_of_the_nodes_pid_space(tmp_path: Path) -> None:
    """With the default of 8,192 processes each, four one-GPU tasks of one org filled a node's
    32,768 pids (this host's kernel.pid_max; a systemd unit's TasksMax sooner), and the node
    could start nothing more: not the agent's threads, not another org's processes. On a node of
    64 GPUs here, one GPU's share of the three quarters tasks get is 384."""
    node = Node(tmp_path, total_gpus=64, pids_max=8192)
    try:
        budget = node.confinement.tasks_pids
        pid_space = min(
            int(Path("/proc/sys/kernel/pid_max").read_text()),
            int(Path("/proc/sys/kernel/threads-max").read_text()),
        )
        assert budget is not None
        assert budget <= pid_space * 3 // 4
        share = budget // 64
        assert share < 1000
        # Forks until refused, or 1,000 children (enough past the share; fewer than 8,192 on a
        # shared test machine).
        code = (
            "import os, time\n"
            "children = 0\n"
            "try:\n"
            "    while children < 1000:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(60); os._exit(0)\n"
            "        children += 1\n"
            "except OSError as exc:\n"
            "    print('refused', end=' ')\n"
            "print('children', children, flush=True)\n"
            "time.sleep(60)\n"
        )
        node.runner.start(spec(1, python(code), gpus=[0], **ACME))
        log = lambda: node.state.read_log(node.runner.records[1]).decode()  # noqa: E731
        wait_for(lambda: "children" in log(), 60)
        assert log().startswith("refused"), log()
        assert int(log().split()[2]) < share
        node.runner.stop(1, grace_s=0, reason="cancelled")
        assert node.finish(1)["state"] == "stopped"
    finally:
        node.close()


def test_a_memory_hog_dies_alone_with_out_of_memory(node: Node) -> None:
    node.runner.start(spec(1, ["sleep", "60"], **ACME))
    hog = "x = []\nwhile True:\n    x.append(bytearray(16 * 2**20))\n"
    result = node.run(2, python(hog), memory_bytes=96 * 2**20, **RIVAL)
    assert result["state"] == "exited"
    assert result["reason"] == "out of memory"
    assert result["signal"] == signal.SIGKILL
    assert node.runner.records[1].state == "running"
    node.runner.stop(1, grace_s=0, reason="done")
    node.finish(1)


def test_a_job_cannot_raise_its_memory_limit_past_its_gpus_share(node: Node) -> None:
    """Memory is not scheduled: a job's --mem above its GPUs' share of the node's memory (512
    MiB per GPU here) was its limit as asked, and such a task filled the node's memory, where
    the kernel's OOM killer ends the largest process of the node, whoever's. Before, this
    one-GPU task asking for 8 GiB held 1 GiB."""
    hold = "x = bytearray(1024 * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('held')\n"
    result = node.run(1, python(hold), gpus=[0], memory_bytes=8 * 2**30, **ACME)
    assert result["state"] == "failed_to_start", result
    assert result["reason"] == (
        "the job asks for 8.0 GiB of memory, more than its 1 GPU(s)' share of this node's "
        "memory (0.5 GiB); ask for less (--mem) or for more GPUs"
    )
    # Two GPUs' share holds what one's could not.
    small = "x = bytearray(600 * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('held')\n"
    result = node.run(2, python(small), gpus=[0, 1], memory_bytes=2**30, **ACME)
    assert (result["state"], result["log"]) == ("exited", "held\n"), result


def test_the_node_keeps_a_reserve_of_its_memory_from_its_tasks(tmp_path: Path) -> None:
    """Shares of all the node's memory added up to all of it: with every task at its limit the
    node itself ran out, and the kernel's OOM killer took whatever was largest, whoever's.
    Before, a one-GPU task asking for a quarter of this four-GPU node's memory ran."""
    total = psutil.virtual_memory().total
    n = Node(tmp_path, memory_per_gpu_bytes=None)
    try:
        reserve = default_memory_reserve(total)
        share = (total - reserve) // 4
        assert n.confinement.limits(spec(1, ["true"], gpus=[0])).memory_bytes == share
        assert n.confinement.memory_per_gpu_bytes == share  # what the agent reports
        assert n.confinement.limits(spec(1, ["true"], gpus=[0, 1])).memory_bytes == 2 * share
        result = n.run(1, ["true"], gpus=[0], memory_bytes=total // 4, **ACME)
        assert result["state"] == "failed_to_start", result
        assert f"share of this node's memory ({share / 2**30:.1f} GiB)" in result["reason"]
    finally:
        n.close()


def test_the_memory_reserve_also_bounds_mem_per_gpu(tmp_path: Path) -> None:
    """--mem-per-gpu cannot hand out the reserve either: here it asks for all the node's
    memory per GPU, and an explicit reserve leaves 4 GiB for four GPUs."""
    total = psutil.virtual_memory().total
    n = Node(tmp_path, memory_per_gpu_bytes=total, node_memory_reserve_bytes=total - 4 * 2**30)
    try:
        assert n.confinement.limits(spec(1, ["true"], gpus=[0])).memory_bytes == 2**30
        assert n.confinement.memory_per_gpu_bytes == 2**30
    finally:
        n.close()
    (tmp_path / "none").mkdir()
    parent = f"fairgpu-test-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(IsolationUnavailable, match="leaves no memory for tasks"):
            Node(tmp_path / "none", node_memory_reserve_bytes=total, cgroup_parent=parent)
    finally:  # the hierarchy was opened before the reserve was found wanting
        open_hierarchy(parent).remove()


def test_the_default_memory_reserve() -> None:
    assert default_memory_reserve(2**40) == int(2**40 * 0.05)  # 51.2 GiB of a 1 TiB node
    assert default_memory_reserve(32 * 2**30) == 4 * 2**30  # at least 4 GiB
    assert default_memory_reserve(2 * 2**30) == 2**30  # at most half


def test_a_task_goes_first_to_the_oom_killer_and_cannot_lower_itself(node: Node) -> None:
    """Tasks inherited the agent's oom_score_adj, so out of the node's memory the kernel's OOM
    killer weighed a task as the agent. Every task process is now TASK_OOM_SCORE_ADJ and its
    uid cannot go below the agent's value; where the agent holds CAP_SYS_RESOURCE, the agent is
    at AGENT_OOM_SCORE_ADJ and the task's value is itself the floor, children included."""
    shielded = has_capability(CAP_SYS_RESOURCE)
    agent = int(Path("/proc/self/oom_score_adj").read_text())
    if shielded:
        assert agent == AGENT_OOM_SCORE_ADJ
    probe = (
        "import errno, subprocess, sys\n"
        "def lower(value):\n"
        "    try:\n"
        "        with open('/proc/self/oom_score_adj', 'w') as f: f.write(value)\n"
        "        return 'lowered'\n"
        "    except OSError as exc: return errno.errorcode[exc.errno]\n"
        "print(open('/proc/self/oom_score_adj').read().strip())\n"
        "print(subprocess.run(['cat', '/proc/self/oom_score_adj'], capture_output=True,"
        " text=True).stdout.strip())\n"
        "print(lower(str(int(sys.argv[1]) - 1)), lower(sys.argv[1]))\n"
    )
    result = node.run(1, [*python(probe), str(agent)], gpus=[0], **ACME)
    assert result["state"] == "exited", result
    adj = str(TASK_OOM_SCORE_ADJ)
    floor = "EACCES" if shielded else "lowered"  # the agent's own value
    assert result["log"].split() == [adj, adj, "EACCES", floor], result


def test_private_tmp_and_shm(node: Node) -> None:
    (Path("/tmp") / "fairgpu-host-file").write_text("host")
    try:
        result = node.run(
            1,
            ["sh", "-c", "ls -A /tmp /dev/shm; echo mine > /dev/shm/x; cat /dev/shm/x"],
            **ACME,
        )
    finally:
        (Path("/tmp") / "fairgpu-host-file").unlink()
    assert "fairgpu-host-file" not in result["log"]
    assert result["log"].rstrip().endswith("mine")
    assert not Path("/dev/shm/x").exists()


HUGE_PROBE = """
import mmap, sys
FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000  # MAP_HUGETLB
def mapped(pages):
    try:
        area = mmap.mmap(-1, pages * 2**21, flags=FLAGS)
    except OSError as exc:
        return exc.strerror
    area[:: 2**21] = b"x" * pages  # touch every page: it is the task's now
    area.close()
    return "mapped"
print(mapped(3), mapped(2), flush=True)
"""


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """The node's 2 MiB pool at 8 pages (16 MiB) for the test, as it was after (host-wide)."""
    pool = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    if not pool.exists():
        pytest.skip("no 2 MiB huge pages on this kernel")
    before = pool.read_text()
    try:
        pool.write_text("8")
        if int(pool.read_text()) < 8:
            pytest.skip("the kernel found no room for 8 huge pages")
        yield 8
    finally:
        pool.write_text(before)


def test_a_task_holds_at_most_its_gpus_share_of_the_huge_page_pool(
    node: Node, huge_pages: int
) -> None:
    # The memory controller does not charge huge pages: a one-GPU task of a four-GPU node
    # mapped the whole pool. Its share now: 8 pages x 1/4 = 2.
    limits = node.confinement.limits(spec(1, ["true"], gpus=[0], **ACME))
    assert limits.hugetlb_bytes["2MB"] == 2 * 2**21
    result = node.run(1, python(HUGE_PROBE), gpus=[0], **ACME)
    assert result["log"].split() == ["Cannot", "allocate", "memory", "mapped"], result
    assert int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text()) == 8


def test_huge_page_pools_are_read_by_their_cgroup_names(tmp_path: Path) -> None:
    for kib, pages, overcommit in ((2048, 8, 2), (1048576, 1, 0), (64, 0, 0)):
        pool = tmp_path / f"hugepages-{kib}kB"
        pool.mkdir()
        (pool / "nr_hugepages").write_text(f"{pages}\n")
        (pool / "nr_overcommit_hugepages").write_text(f"{overcommit}\n")
    assert huge_pools(tmp_path) == {
        "2MB": HugePool(2**21, 10), "1GB": HugePool(2**30, 1), "64KB": HugePool(2**16, 0),
    }  # fmt: skip


def test_strict_isolation_needs_uids() -> None:
    with pytest.raises(IsolationUnavailable, match="task uids"):
        Confinement(IsolationConfig(mode="strict", task_uid_base=None))


def test_strict_isolation_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(IsolationUnavailable, match="pass --isolation none"):
        Confinement(IsolationConfig(mode="strict", task_uid_base=UID_BASE))


def test_a_restarted_agent_adopts_a_confined_task_and_still_ends_all_of_it(node: Node) -> None:
    node.runner.start(spec(1, ["sh", "-c", "(setsid sleep 300 &); exec sleep 300"], **ACME))
    wait_for(lambda: len(node.task_pids(1)) == 2)
    pids = node.task_pids(1)
    restarted = Runner(node.state, confinement=node.confinement)  # same state, same cgroups
    restarted.recover()
    assert restarted.records[1].state == "running"
    restarted.stop(1, grace_s=0.2, reason="cancelled")
    wait_for(lambda: (restarted.poll(), restarted.records[1].state)[1] == "stopped")
    assert all(gone(p) for p in pids)
    assert not (node.root / "tasks" / "1").exists()


def test_the_job_environment_and_secret_never_reach_the_nodes_disk(node: Node) -> None:
    secret, key = f"tok-{uuid.uuid4().hex}", f"rdv-{uuid.uuid4().hex}"
    code = "import os; print(os.environ['API_TOKEN'], os.environ['FAIRGPU_JOB_SECRET'])"
    result = node.run(1, python(code), env={"API_TOKEN": secret}, job_secret=key, **ACME)
    assert result["log"] == f"{secret} {key}\n"  # the task has them (and prints them to its log)
    files = [p for p in node.state.root.rglob("*") if p.is_file() and not p.name.startswith("log")]
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
        assert key.encode() not in path.read_bytes(), path


def test_the_jobs_variables_reach_its_command_never_roots_processes(node: Node) -> None:
    """The wrapper's shell, the log copier and the sandbox run as root before the command: a
    job whose PATH names its org's directory first had the wrapper run the org's own `mv` as
    root when the task ended (and LD_PRELOAD would have loaded its library into all three)."""
    tools = node.data / "acme" / "bin"
    tools.mkdir()
    ran_as = node.data / "acme" / "ran-as"
    for name in ("mv", "sh", "sleep"):  # what the wrapper, and the job itself, look up
        (tools / name).write_text(f'#!/bin/sh\nid -u >> {ran_as}\nexec /bin/{name} "$@"\n')
        (tools / name).chmod(0o755)
    os.chown(node.data / "acme", UID_BASE + 1, UID_BASE + 1)
    os.chown(tools, UID_BASE + 1, UID_BASE + 1)
    env = {"PATH": f"{tools}:/usr/bin:/bin", "LD_LIBRARY_PATH": str(tools), "MARK": "acme-mark"}
    node.runner.start(spec(1, ["sh", "-c", 'echo "$MARK $PATH"; exec sleep 3'], env=env, **ACME))

    def sleeping() -> bool:
        with contextlib.suppress(psutil.Error):
            return any(
                psutil.Process(p).cmdline() == ["/bin/sleep", "3"] for p in node.task_pids(1)
            )
        return False

    wait_for(sleeping)  # the command is what runs now: the processes before it are done
    wrapper = node.runner.records[1].pid
    assert wrapper is not None
    for pid in (wrapper, *node.task_pids(1)):
        process = psutil.Process(pid)
        seen = process.environ()
        if process.uids().real == 0:
            assert not {"MARK", "LD_LIBRARY_PATH"} & seen.keys(), (process.cmdline(), seen)
            assert str(tools) not in seen.get("PATH", ""), (process.cmdline(), seen)
        else:  # the command has them all
            assert (seen["MARK"], seen["LD_LIBRARY_PATH"]) == ("acme-mark", str(tools)), seen
    result = node.finish(1)
    assert (result["state"], result["exit_code"]) == ("exited", 0), result["log"]
    assert result["log"] == f"acme-mark {tools}:/usr/bin:/bin\n"
    # The job's own sh and sleep were the org's, run as its uid; nothing of it ran as root.
    assert ran_as.read_text().split() == [str(UID_BASE + 1)] * 2


def _until_disk_ends_a_task(node: Node, timeout_s: float = 20.0) -> None:
    wait_for(node.runner.check_disk, timeout_s)


# A writer that never stops: 1 MiB at a time, flushed to the disk (the blocks count at once).
FILL = (
    "import os\n"
    "fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT, 0o600)\n"
    "{unlink}"
    "while True:\n"
    "    os.write(fd, os.urandom(2**20))\n"
    "    os.fsync(fd)\n"
)


def test_a_task_writing_without_end_is_ended_at_its_disk_limit(disk_node: Node) -> None:
    disk_node.runner.start(spec(1, ["sleep", "60"], **ACME))
    fill = FILL.format(path="fill", unlink="")
    disk_node.runner.start(spec(2, python(fill), **RIVAL))
    _until_disk_ends_a_task(disk_node)
    result = disk_node.finish(2)
    assert result["state"] == "stopped"  # not asked by the server: the job ends FAILED
    assert result["reason"].startswith("disk limit: the task holds ")
    assert "over its limit of 16.0 MiB" in result["reason"]
    assert not disk_node.confinement.task_dir(2).exists()  # its space is given back
    assert disk_node.runner.records[1].state == "running"
    assert not disk_node.runner.check_disk()  # the other org's task is within its limits


def test_a_deleted_file_kept_open_counts_against_the_limit(disk_node: Node) -> None:
    fill = FILL.format(path="hidden", unlink="os.unlink('hidden')\n")
    disk_node.runner.start(spec(1, python(fill), **RIVAL))
    _until_disk_ends_a_task(disk_node)
    assert disk_node.finish(1)["reason"].startswith("disk limit: the task holds ")


def test_a_task_making_files_without_end_is_ended_at_its_file_limit(disk_node: Node) -> None:
    spray = "import itertools\nfor i in itertools.count():\n    open(f'f{i}', 'w').close()\n"
    disk_node.runner.start(spec(1, python(spray), **RIVAL))
    _until_disk_ends_a_task(disk_node)
    result = disk_node.finish(1)
    assert result["reason"].startswith(
        "disk limit: the task's directory holds more than 200 files, this node's limit"
    )


def test_a_task_hiding_its_files_deeper_than_a_path_reaches_is_ended(disk_node: Node) -> None:
    """The walk measures by path: below a path of PATH_MAX bytes it could not go, and a task
    held 48 MiB there under a 16 MiB limit, unseen, free to fill the node's disk (and, under
    the node's reserve, to have another org's task ended as the one holding the most)."""
    deep = (
        "import os\n"
        "for _ in range(160):\n"
        "    os.mkdir('d' * 30); os.chdir('d' * 30)\n"
        "fd = os.open('big', os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "for _ in range(48):\n"
        "    os.write(fd, b'x' * 2**20)\n"
        "os.fsync(fd)\n"
        "import time; time.sleep(60)\n"
    )
    disk_node.runner.start(spec(1, python(deep), **ACME))
    _until_disk_ends_a_task(disk_node)
    result = disk_node.finish(1)
    assert result["state"] == "stopped", result  # not asked by the server: the job ends FAILED
    assert result["reason"].startswith("disk limit: the task's directory nests deeper"), result
    assert not disk_node.confinement.task_dir(1).exists()  # its space is given back


def test_a_task_leaving_thousands_of_nested_directories_is_removed_whole(node: Node) -> None:
    """shutil.rmtree recursed once per level: the agent's clean-up of such a task raised
    RecursionError (out of the runner's poll) and kept the directory, with the disk it held."""
    deep = "import os\nfor _ in range(3000):\n    os.mkdir('d'); os.chdir('d')\n"
    try:
        result = node.run(1, python(deep), **ACME)
        assert (result["state"], result["exit_code"]) == ("exited", 0), result["log"]
        assert not node.confinement.task_dir(1).exists()
    finally:  # pytest's clean-up of its temporary directories recurses the same way
        subprocess.run(["rm", "-rf", str(node.confinement.task_dir(1))], check=False)


def test_the_clean_up_of_a_task_follows_none_of_its_links(node: Node) -> None:
    """The agent (root) removes and measures a task's directory: links the task left there to
    another org's running task's files, to the agent's state and to a directory outside stay
    links, and what they point at stays."""
    node.state.credential_path.write_text("{}")
    node.runner.start(
        spec(1, ["sh", "-c", "echo private > $HOME/notes; exec sleep 60"], gpus=[0], **RIVAL)
    )
    rival_notes = node.root / "tasks/1/notes"
    wait_for(rival_notes.exists)
    outside = node.data / "acme" / "kept"
    outside.mkdir()
    (outside / "file").write_text("data")
    os.chown(node.data / "acme", UID_BASE + 1, UID_BASE + 1)
    os.chown(outside, UID_BASE + 1, UID_BASE + 1)
    code = f"""
import os
home = os.environ["HOME"]
os.symlink("{rival_notes}", home + "/rival-notes")
os.symlink("{node.root / "tasks/1"}", home + "/rival-home")
os.symlink("{node.state.root}", home + "/state")
os.symlink("{node.state.credential_path}", home + "/credential")
os.symlink("{outside}", home + "/outside")
os.mkfifo(home + "/fifo")
print("left", sorted(os.listdir(home)))
"""
    result = node.run(2, python(code), gpus=[1], **ACME)
    assert (result["state"], result["exit_code"]) == ("exited", 0), result["log"]
    assert not node.confinement.task_dir(2).exists()
    assert rival_notes.read_text() == "private\n"
    assert node.state.credential_path.read_text() == "{}"
    assert (outside / "file").read_text() == "data"
    assert node.runner.records[1].state == "running"


def test_under_the_node_reserve_the_task_holding_the_most_is_ended(tmp_path: Path) -> None:
    # A reserve above the disk's free space: the node is always under it.
    limits = DiskConfig(node_reserve_bytes=2**62, pressure_min_task_bytes=2**20)
    pressed = Node(tmp_path, RunnerConfig(disk=limits))
    try:
        write = "import time\nopen('data', 'wb').write(b'x' * {})\nopen('done', 'w')\n"
        write += "time.sleep(60)"
        pressed.runner.start(spec(1, python(write.format(2**16)), **ACME))
        pressed.runner.start(spec(2, python(write.format(2**23)), **RIVAL))
        for task_id in (1, 2):
            wait_for(lambda t=task_id: (pressed.confinement.task_dir(t) / "done").exists())
        os.sync()
        _until_disk_ends_a_task(pressed)
        result = pressed.finish(2)
        assert "fell under its reserve" in result["reason"]
        assert pressed.runner.records[1].state == "running"  # one task per check
    finally:
        pressed.close()


def test_private_tmp_is_bounded_by_the_task_memory(node: Node) -> None:
    node.runner.start(spec(1, ["sleep", "60"], **ACME))
    result = node.run(
        2,
        ["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=1024; df -k /tmp /dev/shm"],
        memory_bytes=64 * 2**20,
        **RIVAL,
    )
    assert "No space left on device" in result["log"] or result["reason"] == "out of memory"
    assert " 65536 " in result["log"] or result["reason"] == "out of memory"  # size = --mem
    assert not Path("/tmp/fill").exists()
    assert node.runner.records[1].state == "running"


SYSV_SHM = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "key = 0x7A11\n"
    "if sys.argv[1] == 'make':\n"
    "    print(libc.shmget(key, 2**20, 0o1000 | 0o666) >= 0)\n"  # IPC_CREAT, open to all
    "else:\n"
    "    print(libc.shmget(key, 0, 0) >= 0)\n"
)


def test_system_v_ipc_is_the_tasks_own_and_ends_with_it(node: Node) -> None:
    made = node.run(1, [PY, "-c", SYSV_SHM, "make"], **ACME)
    assert made["log"].strip() == "True"
    assert not any(
        int(line.split()[0]) == 0x7A11
        for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    )
    node.runner.start(spec(2, ["sleep", "60"], **ACME))
    found = node.run(3, [PY, "-c", SYSV_SHM, "find"], **RIVAL)
    assert found["log"].strip() == "False"
    node.runner.stop(2, grace_s=0, reason="done")
    node.finish(2)


# The batch shell traps USR1 and says who it is; a child it started traps it too.
BATCH = (
    "trap 'echo shell $(id -u) got USR1' USR1\n"
    '{py} -c "import signal, time\n'
    "signal.signal(signal.SIGUSR1, lambda *_: print('child got USR1', flush=True))\n"
    'time.sleep(60)" &\n'
    "touch $HOME/ready\n"
    "while true; do sleep 0.05; done\n"
)


def test_a_batch_only_warning_reaches_the_batch_shell_alone(node: Node) -> None:
    warning = TaskSignal(name="USR1", lead_s=59, batch_only=True)
    script = BATCH.format(py=PY)
    node.runner.start(spec(1, ["sh", "-c", script], time_limit_s=120, signal=warning, **ACME))
    node.runner.start(spec(2, ["sh", "-c", script], time_limit_s=60, signal=warning, **RIVAL))
    for task_id in (1, 2):
        wait_for(lambda t=task_id: (node.confinement.task_dir(t) / "ready").exists())
    wait_for(lambda: (node.runner.poll(), node.runner.records[2].warned)[1])
    time.sleep(0.5)
    for task_id in (1, 2):
        node.runner.stop(task_id, grace_s=0, reason="done")
    rival, acme = node.finish(2), node.finish(1)
    assert f"shell {UID_BASE + 2} got USR1" in rival["log"]  # as rival's own uid
    assert "child got USR1" not in rival["log"]
    assert "USR1" not in acme["log"]  # the other org's task saw nothing


def test_no_signal_reaches_a_process_that_took_an_ended_tasks_pid(
    node: Node, tmp_path: Path
) -> None:
    warning = TaskSignal(name="USR1", lead_s=30)
    node.run(1, ["true"], signal=warning, **ACME)
    # Another process now holds the pid the record names (pid reuse, forged here).
    got = tmp_path / "got"
    bystander = subprocess.Popen(
        [sys.executable, "-c",
         "import pathlib, signal, sys, time\n"
         "for s in (signal.SIGUSR1, signal.SIGTERM):\n"
         f"    signal.signal(s, lambda n, _: pathlib.Path({str(got)!r}).write_text(str(n)))\n"
         "print('ready', flush=True)\n"
         "time.sleep(30)\n"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert bystander.stdout is not None
        assert bystander.stdout.readline() == b"ready\n"
        record = node.runner.records[1]
        record.state, record.pid, record.stop_reason = "running", bystander.pid, None
        node.runner._warn(record)
        node.runner._terminate(record, grace_s=0, reason="stop")
        node.runner._kill(record)
        time.sleep(0.3)
        assert not got.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        if bystander.stdout is not None:
            bystander.stdout.close()


# Listens on an abstract unix socket (no file: any process of the network namespace may
# connect, whatever its uid), or connects to one and says what came of it.
ABSTRACT = (
    "import os, socket, sys, time\n"
    "name = b'\\0' + sys.argv[2].encode()\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "if sys.argv[1] == 'listen':\n"
    "    s.bind(name); s.listen(); os.chmod(os.environ['HOME'], 0o711)\n"
    "    open(os.environ['HOME'] + '/ready', 'w').close()\n"
    "    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect(name)\n"
    "    print('own connect allowed', flush=True)\n"
    "    time.sleep(60)\n"
    "try:\n"
    "    s.connect(name)\n"
    "    print('allowed')\n"
    "except OSError as exc:\n"
    "    print(type(exc).__name__)\n"
)


@pytest.mark.skipif(landlock_abi() < LANDLOCK_SCOPE_ABI, reason="needs Landlock scoping (6.12)")
def test_another_orgs_abstract_socket_is_out_of_reach(node: Node) -> None:
    name = f"fairgpu-test-{uuid.uuid4().hex}"
    node.runner.start(spec(1, [PY, "-c", ABSTRACT, "listen", name], **ACME))
    wait_for((node.confinement.task_dir(1) / "ready").exists)
    rival = node.run(2, [PY, "-c", ABSTRACT, "connect", name], **RIVAL)
    assert rival["log"].strip() == "PermissionError"
    # The host itself (not in any task's domain) still reaches it: the wall is between tasks.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.connect(b"\0" + name.encode())
    node.runner.stop(1, grace_s=0, reason="done")
    assert "own connect allowed" in node.finish(1)["log"]


@pytest.mark.skipif(landlock_abi() < LANDLOCK_SCOPE_ABI, reason="needs Landlock scoping (6.12)")
def test_tasks_of_one_org_cannot_signal_each_other_either(node: Node) -> None:
    node.runner.start(spec(1, ["sleep", "60"], **ACME))
    wait_for(lambda: bool(node.task_pids(1)))
    [victim] = node.task_pids(1)
    probe = (
        f"import os\ntry:\n    os.kill({victim}, 0)\n    print('allowed')\n"
        "except OSError as exc:\n    print(type(exc).__name__)\n"
    )
    result = node.run(2, python(probe), **ACME)  # same org, same uid
    assert result["log"].strip() in ("PermissionError", "ProcessLookupError")
    assert node.runner.records[1].state == "running"
    node.runner.stop(1, grace_s=0, reason="done")
    node.finish(1)


KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
KEYRING_PROBE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "own = libc.syscall({nr}, 0, ctypes.c_long(-3), 0)\n"  # the session keyring's id
    "buf = ctypes.create_string_buffer(256)\n"
    "agents = libc.syscall({nr}, 6, ctypes.c_long({agent}), buf, 256)\n"  # describe the agent's
    "print(own, agents, buf.value.decode())\n"
)


@pytest.mark.skipif(KEYCTL is None, reason="keyctl's number is known for x86_64 and aarch64")
def test_a_task_does_not_possess_the_agents_session_keyring(unfiltered_node: Node) -> None:
    """With `--seccomp off`: the filter refuses the key calls altogether."""
    node = unfiltered_node
    assert KEYCTL is not None
    libc = ctypes.CDLL(None, use_errno=True)
    # The agent's own session keyring, as systemd gives a service one (this test process).
    agent_ring = libc.syscall(KEYCTL, 1, f"fairgpu-test-{uuid.uuid4().hex[:8]}".encode())
    assert agent_ring > 0
    result = node.run(1, python(KEYRING_PROBE.format(nr=KEYCTL, agent=agent_ring)), **ACME)
    own, described, _ = (result["log"].split() + ["", ""])[:3]
    assert int(own) != agent_ring
    assert int(own) > 0
    assert int(described) < 0  # not the task's to read


NODE_PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(result):
    return "allowed" if result >= 0 else os.strerror(ctypes.get_errno())
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return exc.strerror
inotify = libc.inotify_init1(0)
print(json.dumps({
    "sysctl": attempt(lambda: open("/proc/sys/kernel/core_pattern", "w").write("|/tmp/x")),
    "inotify_other_org": errno_of(libc.inotify_add_watch(inotify, TARGET, 0xFFF)),
    "fanotify": errno_of(libc.fanotify_init(0, 0)),
}))
"""


def test_a_task_cannot_tune_the_node_nor_watch_another_org(node: Node) -> None:
    node.runner.start(spec(1, ["sleep", "60"], **ACME))
    target = node.confinement.task_dir(1)
    wait_for(target.exists)
    probe = NODE_PROBE.replace("TARGET", repr(str(target).encode()))
    result = node.run(2, python(probe), **RIVAL)
    tried = json.loads(result["log"].strip().splitlines()[-1])
    assert tried["sysctl"] == "Permission denied"
    assert tried["fanotify"] == "Operation not permitted"
    # Not readable by its uid, or (task directories under /tmp, as here) not even in its view.
    assert tried["inotify_other_org"] in ("Permission denied", "No such file or directory")
    node.runner.stop(1, grace_s=0, reason="done")
    node.finish(1)
