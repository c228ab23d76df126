"""Removes the task network namespaces (agents/netns.py) that tests left without a process.

Tasks outlive their agent by design, and their namespaces with them; harnesses that start agent
processes remove their agents' own (`agents.netopen.remove_all`), but an in-process agent or a
test that failed half-way may leave one. At the end of a session every `fairgpu-*` namespace in
which no process runs any more, made more than `min_age_s` ago (a task's namespace holds its
processes for as long as it runs, and gets them within a moment of being made), is removed with
its resolver file and its pasta. Namespaces of other test sessions on the host that still run
something are left alone. So are agents' nftables walls (agents/netwall.py) with a pasta's rule
or a namespace of theirs; an idle one is removed (an agent whose table is gone makes it anew
for its next pasta).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from agents.netns import ETC_DIR, RUN_DIR
from agents.netwall import Wall, cgroup2_mount


def remove_orphans(min_age_s: float = 120.0) -> list[str]:
    if os.geteuid() != 0 or not RUN_DIR.is_dir() or shutil.which("ip") is None:
        return []
    in_use: set[int] = set()
    pastas: dict[int, bytes] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            in_use.add(os.stat(pid_dir / "ns" / "net").st_ino)
            cmdline = (pid_dir / "cmdline").read_bytes()
            if Path(cmdline.split(b"\0")[0].decode(errors="replace")).name == "pasta":
                pastas[int(pid_dir.name)] = cmdline
    removed: list[str] = []
    now = time.time()
    for path in RUN_DIR.glob("fairgpu-*"):
        try:
            made = (ETC_DIR / path.name).stat().st_mtime
            inode = path.stat().st_ino
        except OSError:
            continue
        if inode in in_use or now - made < min_age_s:
            continue
        for pid, cmdline in pastas.items():
            if path.name.encode() in cmdline.split(b"\0"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", path.name], capture_output=True, check=False)
        shutil.rmtree(ETC_DIR / path.name, ignore_errors=True)
        removed.append(path.name)
    remove_idle_walls(min_age_s)
    return removed


def remove_idle_walls(min_age_s: float = 120.0) -> list[str]:
    """The `inet fairgpu-<agent>` tables with no pasta rule and no namespace of their agent,
    whose agent's pasta cgroup directory (made when it opened its namespaces, removed when it
    stops idle) is gone or older than `min_age_s`: a running agent with no private task yet,
    in another test session on the host, keeps its wall (removing it would count as a restore
    in that session's tests of the wall)."""
    nft = shutil.which("nft")
    if os.geteuid() != 0 or nft is None:
        return []
    listed = subprocess.run([nft, "list", "tables", "inet"], capture_output=True, text=True)
    names = re.findall(r"^table inet (fairgpu-[0-9a-f]{8})$", listed.stdout, re.MULTILINE)
    in_use = {path.name.rsplit("-", 1)[0] for path in RUN_DIR.glob("fairgpu-*")}
    removed = []
    cgroup2 = cgroup2_mount()
    now = time.time()
    for name in names:
        wall = Wall(name, nft=nft, cgroup2=Path("/sys/fs/cgroup"))
        tag = name.removeprefix("fairgpu-")
        directories = list(cgroup2.glob(f"*-pasta/{tag}")) if cgroup2 is not None else []
        if name in in_use or _made_since(directories, now - min_age_s) or wall.walled():
            continue
        wall.remove()
        removed.append(name)
        for directory in directories:
            with contextlib.suppress(OSError):  # its pastas' cgroups: none is left running
                directory.rmdir()
    return removed


def _made_since(directories: list[Path], since: float) -> bool:
    """One of the directories was made after `since` (a cgroup directory's mtime is when it was
    made: its children do not change it)."""
    for directory in directories:
        with contextlib.suppress(OSError):
            if directory.stat().st_mtime > since:
                return True
    return False
