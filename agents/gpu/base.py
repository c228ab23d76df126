"""The GPU backend interface and the GPU model names the scheduler matches jobs on."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from protocol.agent import GpuInfo, GpuSample


class GpuBackendError(RuntimeError):
    """The backend cannot start (no library, no driver); the message says what to do instead."""


class GpuBackend(Protocol):
    """What the agent needs from GPUs: what is there, and how each one is doing now.

    `sample` takes the pids of the tasks running on each GPU index, and the utilisation the
    tasks on some GPUs say they have (`driven`, agents/runner.py): NVML ignores both (the
    driver knows its processes and their use), the simulated backend derives utilisation and
    memory from them.
    """

    follows_tasks: bool
    """True when `sample` derives the figures from `busy` and `driven` (the simulated backend):
    only then does the agent read what each task says of its use (a file per task)."""

    def devices(self) -> list[GpuInfo]: ...

    def device_minors(self) -> dict[int, int]:
        """GPU index → minor number of its device file (/dev/nvidiaN), for the task fence."""
        ...

    def sample(
        self, busy: Mapping[int, Sequence[int]], driven: Mapping[int, float] | None = None
    ) -> list[GpuSample]: ...

    def close(self) -> None: ...


# Ordered: the first pattern that matches the raw NVML product name wins.
_MODEL_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"GH200", "GH200"),
    (r"B200", "B200"),
    (r"H200", "H200"),
    (r"H100", "H100"),
    (r"H800", "H800"),
    (r"A100.*80\s*GB", "A100-80GB"),
    (r"A100", "A100-40GB"),
    (r"A800", "A800"),
    (r"L40S", "L40S"),
    (r"L40", "L40"),
    (r"L4\b", "L4"),
    (r"A40\b", "A40"),
    (r"A10\b", "A10"),
    (r"V100", "V100"),
    (r"T4\b", "T4"),
)


def normalise_model(name: str) -> str:
    """Map NVML's product name ("NVIDIA A100-SXM4-80GB") to the type jobs ask for ("A100-80GB").

    Unknown products keep their name without the vendor prefix, spaces turned into dashes, so
    that a new GPU still schedules (jobs can ask for it by that name) instead of failing.
    """
    for pattern, model in _MODEL_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return model
    stripped = re.sub(r"^(NVIDIA|Tesla)\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"\s+", "-", stripped) or "unknown"


# XIDs that usually mean the application misbehaved (illegal address, MMU fault from user code,
# reset channel, preemptive cleanup, ...), not the hardware: they are reported but do not mark
# the GPU unhealthy, or every buggy job would drain a node.
APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68})


def xid_marks_unhealthy(xid: int) -> bool:
    return xid not in APPLICATION_XIDS
