"""A job's warning signal, Slurm's `--signal [B:]SIG[@SECONDS]`.

The node sends SIG that many seconds before the job's time limit, and instead of SIGTERM when the
job is preempted (then SIGKILL after the grace). `B:` sends it to the batch shell only (the
command the node started) rather than to every process of the task. Shared by the API, which
validates and stores the normalised text, and the agent, which delivers it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

DEFAULT_LEAD_S = 60
"""Seconds before the limit when `@SECONDS` is left out (Slurm's default)."""
_UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})


@dataclass(frozen=True, slots=True)
class WarningSignal:
    name: str
    """The signal's name without SIG: "USR1"."""
    lead_s: int
    batch_only: bool = False

    @property
    def number(self) -> int:
        return int(signal.Signals["SIG" + self.name])

    def __str__(self) -> str:
        return f"{'B:' if self.batch_only else ''}{self.name}@{self.lead_s}"


def signal_named(text: str) -> signal.Signals:
    """A signal by number or name, with or without SIG, in any case; ValueError if unknown."""
    word = text.strip().upper()
    try:
        sig = signal.Signals(int(word)) if word.isdigit() else signal.Signals[_with_sig(word)]
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {text.strip()[:32]!r}") from None
    if sig in _UNCATCHABLE:
        raise ValueError(f"{sig.name} cannot be caught; use a signal the job can trap")
    return sig


def _with_sig(word: str) -> str:
    return word if word.startswith("SIG") else "SIG" + word


def parse_signal(text: str) -> WarningSignal:
    """`[B:]SIG[@SECONDS]`: `USR1@120`, `B:TERM@60`, `10@30`. ValueError names what is wrong."""
    body = text.strip()
    batch_only = False
    if ":" in body:
        where, _, body = body.partition(":")
        if where.strip().upper() != "B":
            raise ValueError(f"{where.strip()[:8]!r}: only B: (the batch shell) may precede it")
        batch_only = True
    word, at, seconds = body.partition("@")
    lead_s = DEFAULT_LEAD_S
    if at:
        if not seconds.strip().isdigit() or int(seconds) <= 0 or len(seconds.strip()) > 9:
            raise ValueError(f"{seconds.strip()[:16]!r}: seconds must be a positive integer")
        lead_s = int(seconds)
    sig = signal_named(word)
    return WarningSignal(sig.name.removeprefix("SIG"), lead_s, batch_only)
