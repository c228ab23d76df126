"""Simulated GPUs, so that the agent, the scheduler and demos run on machines without GPUs.

Utilisation and memory follow the tasks the runner has on each GPU (busy while a task runs, or
what the task says: `driven`, the ratio a task writes to `$HOME/.fairgpu-simulated-utilization`,
agents/runner.py, `task_utilization`); power, temperature and the energy counter follow utilisation.
Faults (an XID, a lost GPU) are injected by method call in tests, or by writing lines such as
`xid 3 79` or `lost 5` to a faults file during a demo.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agents.gpu.base import xid_marks_unhealthy
from protocol.agent import MAX_GPUS_PER_NODE, GpuInfo, GpuProcess, GpuSample
from protocol.states import GpuHealth

GIB = 1024**3
SIMULATED_UTILIZATION_FILE = ".fairgpu-simulated-utilization"
"""In a task's home: the utilisation (0 to 1) its simulated GPUs show, as the task says."""
_UUID_NAMESPACE = uuid.UUID("8f2b5f52-4f4e-4a3e-9a55-2f6f1d0c9e11")


@dataclass(frozen=True, slots=True)
class SimModel:
    name: str  # what NVML would report
    memory_bytes: int
    idle_power_w: float
    max_power_w: float
    nvlink: bool  # SXM boards: every GPU of the group reaches every other over NVLink


MODELS: dict[str, SimModel] = {
    "H100": SimModel("NVIDIA H100 80GB HBM3", 80 * GIB, 70.0, 700.0, True),
    "H200": SimModel("NVIDIA H200", 141 * GIB, 75.0, 700.0, True),
    "B200": SimModel("NVIDIA B200", 180 * GIB, 100.0, 1000.0, True),
    "A100-80GB": SimModel("NVIDIA A100-SXM4-80GB", 80 * GIB, 55.0, 400.0, True),
    "A100-40GB": SimModel("NVIDIA A100-SXM4-40GB", 40 * GIB, 50.0, 400.0, True),
    "L40S": SimModel("NVIDIA L40S", 48 * GIB, 35.0, 350.0, False),
    "L4": SimModel("NVIDIA L4", 24 * GIB, 16.0, 72.0, False),
    "V100": SimModel("Tesla V100-SXM2-32GB", 32 * GIB, 40.0, 300.0, True),
}
_BUSY_UTILIZATION = 0.97
_BUSY_MEMORY_FRACTION = 0.75
_IDLE_TEMPERATURE_C = 32.0
_BUSY_TEMPERATURE_C = 71.0


def parse_simulate_spec(spec: str) -> list[str]:
    """ "8xH100" or "8xH100,4xA100-80GB" (also "+" between groups) -> one model name per GPU."""
    models: list[str] = []
    for group in filter(None, (g.strip() for g in re.split(r"[,+]", spec))):
        match = re.fullmatch(r"(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9-]+)", group)
        if match is None:
            raise ValueError(f"cannot read simulated GPU group {group!r}: write it like 8xH100")
        count = int(match.group(1) or 1)
        model = next((m for m in MODELS if m.lower() == match.group(2).lower()), None)
        if model is None:
            known = ", ".join(MODELS)
            raise ValueError(f"unknown simulated GPU model {match.group(2)!r}; known: {known}")
        models.extend([model] * count)
    if not models or len(models) > MAX_GPUS_PER_NODE:
        raise ValueError(f"a simulated node has 1 to {MAX_GPUS_PER_NODE} GPUs, not {len(models)}")
    return models


@dataclass
class _SimGpu:
    info: GpuInfo
    model: SimModel
    energy_joules: float = 0.0
    health: GpuHealth = GpuHealth.HEALTHY
    health_reason: str = ""
    pending_xids: list[int] = field(default_factory=list)
    ecc_uncorrected_total: int = 0


class SimulatedBackend:
    """GPUs that exist only in memory. `seed` keeps uuids stable across restarts of one node."""

    follows_tasks = True

    def __init__(
        self, models: Sequence[str], *, seed: str = "sim", faults_file: Path | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._faults_file = faults_file
        self._last_sample_s = time.monotonic()
        self._gpus: list[_SimGpu] = []
        for index, name in enumerate(models):
            model = MODELS[name]
            peers = [
                i for i, other in enumerate(models) if i != index and other == name and model.nvlink
            ]
            info = GpuInfo(
                index=index,
                uuid=f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{seed}/{index}')}",
                model=name,
                name=model.name,
                memory_bytes=model.memory_bytes,
                nvlink_peers=peers,
            )
            self._gpus.append(_SimGpu(info, model))

    def devices(self) -> list[GpuInfo]:
        return [g.info for g in self._gpus]

    def device_minors(self) -> dict[int, int]:
        return {g.info.index: g.info.index for g in self._gpus}

    def inject_xid(self, index: int, xid: int) -> None:
        with self._lock:
            gpu = self._gpus[index]
            gpu.pending_xids.append(xid)
            if xid == 48:  # double-bit ECC error
                gpu.ecc_uncorrected_total += 1
            if xid_marks_unhealthy(xid) and gpu.health is GpuHealth.HEALTHY:
                gpu.health, gpu.health_reason = GpuHealth.UNHEALTHY, f"XID {xid}"

    def lose(self, index: int) -> None:
        """The GPU falls off the bus, as XID 79 reports on real hardware."""
        with self._lock:
            gpu = self._gpus[index]
            gpu.pending_xids.append(79)
            gpu.health, gpu.health_reason = GpuHealth.LOST, "GPU has fallen off the bus (simulated)"

    def sample(
        self, busy: Mapping[int, Sequence[int]], driven: Mapping[int, float] | None = None
    ) -> list[GpuSample]:
        self._read_faults_file()
        driven = driven or {}
        now = dt.datetime.now(dt.UTC)
        now_s = time.monotonic()
        with self._lock:
            elapsed_s, self._last_sample_s = now_s - self._last_sample_s, now_s
            return [
                self._sample_one(
                    g, busy.get(g.info.index, ()), driven.get(g.info.index), now, elapsed_s
                )
                for g in self._gpus
            ]

    def close(self) -> None:
        return None

    def _sample_one(
        self,
        gpu: _SimGpu,
        pids: Sequence[int],
        driven: float | None,
        now: dt.datetime,
        elapsed_s: float,
    ) -> GpuSample:
        xids, gpu.pending_xids = gpu.pending_xids, []
        base = {"index": gpu.info.index, "uuid": gpu.info.uuid, "sampled_at": now}
        if gpu.health is GpuHealth.LOST:
            return GpuSample(
                **base, xid_events=xids, health=GpuHealth.LOST, health_reason=gpu.health_reason
            )
        utilization = (driven if driven is not None else _BUSY_UTILIZATION) if pids else 0.0
        power_w = (
            gpu.model.idle_power_w + (gpu.model.max_power_w - gpu.model.idle_power_w) * utilization
        )
        gpu.energy_joules += power_w * elapsed_s
        total = gpu.model.memory_bytes
        used = int(total * _BUSY_MEMORY_FRACTION) if pids else 0
        per_process = used // len(pids) if pids else 0
        return GpuSample(
            **base,
            utilization_ratio=utilization,
            memory_used_bytes=used,
            memory_total_bytes=total,
            temperature_c=_IDLE_TEMPERATURE_C
            + (_BUSY_TEMPERATURE_C - _IDLE_TEMPERATURE_C) * utilization,
            power_w=power_w,
            energy_joules=gpu.energy_joules,
            ecc_uncorrected_total=gpu.ecc_uncorrected_total,
            ecc_corrected_total=0,
            xid_events=xids,
            health=gpu.health,
            health_reason=gpu.health_reason,
            processes=[GpuProcess(pid=p, used_memory_bytes=per_process) for p in pids[:64]],
        )

    def _read_faults_file(self) -> None:
        """Apply and consume `xid INDEX CODE` / `lost INDEX` lines written by an operator."""
        path = self._faults_file
        if path is None or not path.exists():
            return
        try:
            lines = path.read_text().splitlines()
            path.unlink()
        except OSError:
            return
        for line in lines:
            words = line.split()
            try:
                if len(words) == 3 and words[0] == "xid":
                    self.inject_xid(int(words[1]), int(words[2]))
                elif len(words) == 2 and words[0] == "lost":
                    self.lose(int(words[1]))
            except (ValueError, IndexError):
                continue


def task_utilization(home: Path) -> float | None:
    """The utilisation (0 to 1) a task says its GPUs have, from a small regular file in its
    home, or None. Not through a link, nor from a FIFO or a device the task put there (the
    agent may be root)."""
    path = home / SIMULATED_UTILIZATION_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 64).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        ratio = float(text)
    except ValueError:
        return None
    return min(1.0, max(0.0, ratio)) if math.isfinite(ratio) else None
