"""The idle timeout of interactive tasks: no input and no GPU use for `TaskSpec.idle_timeout_s`
ends the task, with a warning to its terminal first (docs/INTERACTIVE.md, "Idle timeout").

Input is any byte a client sends into the task: keys (and Ctrl-C) to its terminal
(agents/streams.py) and bytes to a port of it that is forwarded (agents/forward.py): a notebook
used in a browser through `port-forward` is in use though nobody types in its terminal. A
client attaching, or a new forwarded connection, is input too (the program of a session starts
at its first attach); a window's resize is not. GPU use is a sample of the backend (NVML's
utilisation on a real node; what the task says on a simulated one, agents/gpu/simulated.py)
showing one of the task's own GPUs at BUSY_RATIO or more. Before a warning or an end the daemon
looks at the GPUs once more, so that neither rests on a sample a heartbeat interval old.

The clock is the agent's: a task the agent meets again after its own restart counts as used
at that moment (the agent has no record of the input meanwhile), which only ever lengthens a
session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from agents.state import TaskRecord
from protocol.agent import GpuSample

BUSY_RATIO = 0.05
"""A GPU at this utilisation or more is in use (a notebook's kernel between cells sits at 0)."""
OTHER_RANKS_BUSY_S = 1.0
"""Busy GPU-seconds on a multi-node session's other ranks since the last look that count as GPU
use (one GPU at BUSY_RATIO for 20 s)."""
MAX_WARNING_LEAD_S = 300.0
STOP_REASON = "idle timeout"
"""The runner's stop reason for an idle task: reported as `timeout` with the idle time."""

Action = Literal["warn", "end"]


def watches_other_ranks(record: TaskRecord) -> bool:
    """A multi-node session's terminal task (only that rank carries an idle timeout): its
    other ranks' GPU use, which the server knows, counts too."""
    return record.spec.idle_timeout_s is not None and record.spec.num_nodes > 1


def warning_lead_s(timeout_s: float) -> float:
    """How long before the end the warning comes: a quarter of the timeout, 5 minutes at most."""
    return min(MAX_WARNING_LEAD_S, timeout_s / 4)


def human_s(seconds: float) -> str:
    """`1h30m`, `5m`, `45s`: how a person reads the warning."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts) or "0s"


def warning_text(timeout_s: float) -> str:
    lead = warning_lead_s(timeout_s)
    idle_s = human_s(timeout_s - lead)
    return (
        f"\r\nfairgpu: this session has had no input and no GPU use for {idle_s};"
        f" it ends in {human_s(lead)} unless you type something (idle timeout "
        f"{human_s(timeout_s)})\r\n"
    )


def ending_text(timeout_s: float) -> str:
    return (
        f"\r\nfairgpu: ending this session: no input and no GPU use for {human_s(timeout_s)} "
        "(idle timeout)\r\n"
    )


def ended_reason(timeout_s: float) -> str:
    """The task's reason in its final report (the job's in describe and its events)."""
    return f"idle timeout: no input and no GPU use for {timeout_s:g} s"


@dataclass
class _Activity:
    at: float
    warned: bool = False
    others_busy_s: float | None = None
    """The other ranks' busy GPU-seconds at the last look (multi-node sessions); None: not
    looked at yet."""


class IdleWatch:
    """When each interactive task was last used; which are due a warning or an end."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tasks: dict[int, _Activity] = {}

    def touch(self, task_id: int) -> None:
        """The task was used now (input, or its GPUs busy): its idle time starts again."""
        activity = self._tasks.get(task_id)
        if activity is None:
            self._tasks[task_id] = _Activity(self._clock())
        else:
            activity.at, activity.warned = self._clock(), False

    def observe(self, samples: Sequence[GpuSample], records: Iterable[TaskRecord]) -> None:
        """GPU use from a sample of every GPU: a task whose GPUs are busy was used now."""
        busy = {s.index for s in samples if (s.utilization_ratio or 0.0) >= BUSY_RATIO}
        for record in records:
            if record.spec.idle_timeout_s is not None and busy.intersection(record.spec.gpus):
                self.touch(record.task_id)

    def needs_baseline(self, task_id: int) -> bool:
        """Whether the other ranks of this multi-node task were never looked at."""
        activity = self._tasks.get(task_id)
        return activity is None or activity.others_busy_s is None

    def other_ranks(self, task_id: int, busy_s: float | None) -> None:
        """What the server says the job's other ranks' GPUs did (busy GPU-seconds, a total):
        a rise of OTHER_RANKS_BUSY_S or more since the last look is GPU use; the first look
        only sets where the count starts. None (the server could not say) counts as use, and
        as a start of 0: a session is never ended on what could not be seen."""
        activity = self._tasks.setdefault(task_id, _Activity(self._clock()))
        before = activity.others_busy_s
        if busy_s is None:
            activity.others_busy_s = 0.0 if before is None else before
            self.touch(task_id)
            return
        activity.others_busy_s = busy_s
        if before is not None and busy_s - before >= OTHER_RANKS_BUSY_S:
            self.touch(task_id)

    def due(self, records: Iterable[TaskRecord]) -> list[tuple[TaskRecord, Action]]:
        """The running interactive tasks whose idle time reached their warning or their end.
        A task seen for the first time starts counting now; tasks gone are forgotten."""
        now = self._clock()
        found: list[tuple[TaskRecord, Action]] = []
        watched: set[int] = set()
        for record in records:
            timeout_s = record.spec.idle_timeout_s
            if timeout_s is None or record.state != "running" or record.stop_reason is not None:
                continue
            watched.add(record.task_id)
            activity = self._tasks.setdefault(record.task_id, _Activity(now))
            idle_s = now - activity.at
            if idle_s >= timeout_s:
                found.append((record, "end"))
            elif idle_s >= timeout_s - warning_lead_s(timeout_s) and not activity.warned:
                found.append((record, "warn"))
        for task_id in set(self._tasks) - watched:
            del self._tasks[task_id]
        return found

    def warned(self, task_id: int) -> None:
        """The warning went out: not again until the task is used and idle anew."""
        activity = self._tasks.get(task_id)
        if activity is not None:
            activity.warned = True
