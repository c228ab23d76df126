"""The periodic check of the agent's nftables wall: put back when anything removed or changed it.

The agent makes its table once at start (agents/netwall.py), but the table is not its alone to
keep: an operator's `nft flush ruleset`, a firewall reload (`systemctl restart nftables`, whose
`/etc/nftables.conf` usually begins with one) or any other root process can remove it or change
a rule, and the private tasks' pastas would then reach the node's own addresses silently. Every
`wall_check_interval_s` the agent compares the table with what it made, with the rule of each
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

Between a removal and the next check (at most one interval) the pastas run unwalled: the
interval bounds that window, at the cost of one `nft list table` per check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from agents.netns import Namespaces, NetnsError

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
