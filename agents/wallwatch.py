"""The watch over the agent's nftables wall: put back at once when anything removed or changed it.

The agent makes its table once at start (agents/netwall.py), but the table is not its alone to
keep: an operator's `nft flush ruleset`, a firewall reload (`systemctl restart nftables`, whose
`/etc/nftables.conf` usually begins with one) or any other root process can remove it or change
a rule, and the private tasks' pastas would then reach the node's own addresses silently. The
agent follows the kernel's ruleset events (`nft monitor`, agents/nftmonitor.py) and checks the
table on every event about it, and every `wall_check_interval_s` besides (the backstop, should
the monitor be down or miss one): it compares the table with what it made, with the rule of each
pasta that runs, and on any difference

- makes it anew (one nft transaction, the running pastas' rules included), logs what differed
  and counts it (`fairgpu_agent_wall_restores_total`);
- where that fails, stops (SIGSTOP) every pasta of the node, so that no private task's traffic
  leaves unwalled (the tasks run on, their connections stalled), counts it
  (`fairgpu_agent_wall_failures_total`), and reports the node unable to run private tasks (the
  "netns" capability goes from its next heartbeat: the scheduler places no more there, and the
  agent refuses one that reaches it meanwhile, since making its namespace needs the wall); each
  later check tries again, and once the wall is back the pastas go on (SIGCONT) and the
  capability returns.

The pastas run unwalled from a removal until the check that the event starts has made the table
anew (tens of milliseconds on an idle node); with the monitor down, until the next periodic check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

from agents.netns import Namespaces, NetnsError
from agents.nftmonitor import NftMonitor

log = logging.getLogger(__name__)


class WallWatch:
    """The state of one agent's wall between checks."""

    def __init__(self, namespaces: Namespaces) -> None:
        self.namespaces = namespaces
        self.intact = True
        """False while the wall is lost and cannot be made anew (its pastas stopped)."""
        self.restores = 0
        """Times the wall was found removed or changed and made anew."""
        self.failures = 0
        """Checks that found it lost and could not make it anew."""
        self._lock = threading.Lock()
        self._stopped: dict[int, int] = {}
        """task id → pid of each pasta stopped while the wall is lost."""
        self.monitor: NftMonitor | None = None
        """The ruleset events being followed (`follow`), None when not."""
        self._wake = threading.Event()
        self._following = threading.Event()
        self._checker: threading.Thread | None = None

    def follow(self, interval_s: float, on_change: Callable[[], None]) -> None:
        """Check in a thread of its own on every event about the table and every `interval_s`,
        until `unfollow`; `on_change` (from that thread) when the node's ability to run private
        tasks changed."""
        wall = self.namespaces.wall
        self._following.set()
        self.monitor = NftMonitor(lambda: wall.nft, wall.table, self._wake.set)
        self._checker = threading.Thread(
            target=self._check_until_unfollowed,
            args=(interval_s, on_change),
            name="wall-check",
            daemon=True,
        )
        self._checker.start()
        self.monitor.start()

    def unfollow(self) -> None:
        self._following.clear()
        self._wake.set()
        if self.monitor is not None:
            self.monitor.stop()
        if self._checker is not None:
            self._checker.join(timeout=30)

    def _check_until_unfollowed(self, interval_s: float, on_change: Callable[[], None]) -> None:
        while True:
            self._wake.wait(interval_s)
            if not self._following.is_set():
                return
            self._wake.clear()  # events from here on start another check
            try:
                if self.check():
                    on_change()
            except Exception:
                log.exception("checking the network wall failed; trying again")

    def check(self) -> bool:
        """Compare the wall with what it should be, and put it back; True when that changed
        whether the node can run private tasks (the agent reports it at once)."""
        with self._lock, self.namespaces.lock:
            differences = self.namespaces.wall.differences(self.namespaces.walled_pastas())
            if not differences:
                return self._back() if not self.intact else False
            try:
                self.namespaces.build_wall()
                after = self.namespaces.wall.differences(self.namespaces.walled_pastas())
            except NetnsError as exc:
                after = [str(exc)]
            if after:
                return self._lost(differences, after)
            self.restores += 1
            log.warning(
                "the network wall (nft table inet %s) was removed or changed (%s): made anew",
                self.namespaces.wall.table,
                "; ".join(differences),
            )
            return self._back() if not self.intact else False

    def _lost(self, differences: list[str], after: list[str]) -> bool:
        """The wall cannot be made: no pasta may run unwalled meanwhile."""
        self.failures += 1
        for task_id in self.namespaces.sweep_candidates():
            pid = self.namespaces.pasta_pid(task_id)
            if pid is not None and task_id not in self._stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    self._stopped[task_id] = pid
        log.error(
            "the network wall (nft table inet %s) was removed or changed (%s) and cannot be made "
            "anew (%s): the private tasks' pastas are stopped and this node takes no private "
            "task until it can",
            self.namespaces.wall.table,
            "; ".join(differences),
            "; ".join(after),
        )
        was, self.intact = self.intact, False
        return was

    def _back(self) -> bool:
        """The wall is whole again: the stopped pastas go on."""
        for task_id, pid in sorted(self._stopped.items()):
            if self.namespaces.pasta_pid(task_id) == pid:  # not a pid reused since
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self._stopped.clear()
        self.intact = True
        log.warning("the network wall is back: private tasks run and are taken again")
        return True
