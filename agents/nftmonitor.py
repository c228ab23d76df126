"""Follows `nft monitor` and calls back at once on every event about one nftables table.

The kernel tells every listener of its nftables netlink group about each change to the ruleset
as it is committed (`nft monitor` prints one line per object: `delete table inet NAME`, `add rule
inet NAME CHAIN ...`), so an agent that follows it learns of a deleted or changed wall within
milliseconds instead of at its next periodic look. The monitor is a process of its own; when it
dies (killed, nft upgraded under it, out of memory) it is started again after `restart_s`, and
each start calls back too, since what changed while none listened was not seen.

The monitor dies with the agent: a parent-death signal (SIGKILL) is set in it before nft runs,
so an agent killed with SIGKILL (which runs no `stop`) leaves no `nft monitor` behind, which
would otherwise live on until the next ruleset event broke its pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with(parent: int) -> Callable[[], None]:
    """Run in the child between fork and exec: SIGKILL when the thread that started it ends
    (the kernel's "parent" is that thread, here the monitor's, which outlives its process),
    and exit at once if the agent died before the signal was set. Only a system call and
    `os._exit`: nothing that takes a lock another thread may have held at the fork."""

    def preexec() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return preexec


class NftMonitor:
    """`nft monitor` in a thread of its own, for the table `inet <table>`; `nft` is read at
    each start (a callable, so that a node whose nft moved is followed with the new one)."""

    def __init__(
        self,
        nft: Callable[[], str],
        table: str,
        on_event: Callable[[], None],
        *,
        restart_s: float = 1.0,
    ) -> None:
        self.nft, self.on_event, self.restart_s = nft, on_event, restart_s
        self.starts = 0
        """Times the monitor process was started (more than one: it died and was restarted)."""
        self.lines = 0
        """Events the monitors printed, about any table (one seen: the monitor listens)."""
        self._about = re.compile(rf"\sinet {re.escape(table)}(\s|$)")
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._follow, name="nft-monitor", daemon=True)

    @property
    def pid(self) -> int | None:
        """The running monitor's process (for a test that kills it)."""
        with self._lock:
            return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the monitor process and its thread."""
        self._stopping.set()
        with self._lock:
            if self._process is not None:
                with contextlib.suppress(OSError):
                    self._process.kill()
        self._thread.join(timeout=10)

    def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                process = self._spawn()
            except OSError as exc:
                log.warning("nft monitor could not start (%s): trying again", exc)
                self._stopping.wait(self.restart_s)
                continue
            if process is None:
                return
            # What changed while no monitor listened. (A change in the moment between this
            # check and nft's joining the kernel's event group is left to the periodic check.)
            self.on_event()
            assert process.stdout is not None
            with process.stdout:
                for line in process.stdout:
                    self.lines += 1
                    if self._about.search(line):
                        self.on_event()
            process.wait()
            with self._lock:
                self._process = None
            if not self._stopping.is_set():
                log.warning(
                    "nft monitor ended (exit status %s): starting it again", process.returncode
                )
                self._stopping.wait(self.restart_s)

    def _spawn(self) -> subprocess.Popen[str] | None:
        """The monitor process, or None once stopping (never one left behind by `stop`)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            self._process = subprocess.Popen(
                [self.nft(), "monitor"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                preexec_fn=_die_with(os.getpid()),
            )
            self.starts += 1
            return self._process
