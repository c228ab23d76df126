"""NVML backend: the only module that imports `pynvml` (distribution `nvidia-ml-py`).

Each field is read on its own so that a field the device does not support (`NotSupported`,
common on MIG-enabled and consumer GPUs) drops that field only. `GpuIsLost` marks the GPU lost
and `Unknown` marks it unhealthy; a hardware XID marks it unhealthy until the agent restarts,
because a GPU that faulted once is not to be trusted with the next job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agents.gpu.base import GpuBackendError, normalise_model, xid_marks_unhealthy
from protocol.agent import MAX_XID_EVENTS_PER_SAMPLE, GpuInfo, GpuProcess, GpuSample
from protocol.states import GpuHealth

log = logging.getLogger(__name__)
T = TypeVar("T")

_NO_NVML_HINT = (
    "run on a GPU node with the NVIDIA driver, or use --simulate 8xH100 to simulate GPUs"
)


class _Lost(Exception):
    """Raised inside one GPU's sampling to abandon it: the GPU is lost."""


@dataclass
class _Device:
    index: int
    handle: Any
    info: GpuInfo
    health: GpuHealth = GpuHealth.HEALTHY
    health_reason: str = ""
    pending_xids: list[int] = field(default_factory=list)
    minor: int | None = None
    """/dev/nvidia<minor>: the driver's numbering, which need not follow NVML's indices."""


class NvmlBackend:
    """GPUs as the NVIDIA driver reports them."""

    follows_tasks = False

    def __init__(self, nvml: Any, devices: list[_Device], event_set: Any | None) -> None:
        self._nv = nvml
        self._devices = devices
        self._event_set = event_set

    @classmethod
    def open(cls) -> NvmlBackend:
        try:
            import pynvml
        except ImportError as exc:
            raise GpuBackendError(f"NVML is not installed (nvidia-ml-py): {_NO_NVML_HINT}") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuBackendError(f"cannot initialise NVML ({exc}): {_NO_NVML_HINT}") from exc
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            devices = [_open_device(pynvml, index) for index in range(count)]
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise GpuBackendError(f"cannot list GPUs through NVML ({exc})") from exc
        _find_nvlink_peers(pynvml, devices)
        return cls(pynvml, devices, _xid_event_set(pynvml, devices))

    def devices(self) -> list[GpuInfo]:
        return [d.info for d in self._devices]

    def device_minors(self) -> dict[int, int]:
        return {d.index: d.minor for d in self._devices if d.minor is not None}

    def sample(
        self, busy: Mapping[int, Sequence[int]], driven: Mapping[int, float] | None = None
    ) -> list[GpuSample]:
        del busy, driven  # the driver knows which processes use each GPU, and how much
        self._drain_xid_events()
        now = dt.datetime.now(dt.UTC)
        return [self._sample_one(device, now) for device in self._devices]

    def close(self) -> None:
        nv = self._nv
        if self._event_set is not None:
            _quiet(nv, lambda: nv.nvmlEventSetFree(self._event_set))
        _quiet(nv, nv.nvmlShutdown)

    def _drain_xid_events(self) -> None:
        """Collect the XIDs queued since the last sample; a timeout of 0 means none is left."""
        if self._event_set is None:
            return
        nv = self._nv
        by_uuid = {d.info.uuid: d for d in self._devices}
        for _ in range(1000):  # bounded: a storm of events must not stall sampling
            try:
                data = nv.nvmlEventSetWait(self._event_set, 0)
            except nv.NVMLError_Timeout:
                return
            except nv.NVMLError as exc:
                log.warning("reading NVML events failed: %s", exc)
                return
            # Handles are ctypes pointers that do not compare equal; the uuid identifies the GPU.
            try:
                device = by_uuid.get(_text(nv.nvmlDeviceGetUUID(data.device)))
            except nv.NVMLError:
                device = None
            if device is not None:
                xid = int(data.eventData)
                device.pending_xids.append(xid)
                if xid_marks_unhealthy(xid) and device.health is GpuHealth.HEALTHY:
                    device.health, device.health_reason = GpuHealth.UNHEALTHY, f"XID {xid}"

    def _sample_one(self, device: _Device, now: dt.datetime) -> GpuSample:
        xids, device.pending_xids = device.pending_xids[-MAX_XID_EVENTS_PER_SAMPLE:], []
        base = {"index": device.index, "uuid": device.info.uuid, "sampled_at": now}
        if device.health is GpuHealth.LOST:
            return GpuSample(
                **base, xid_events=xids, health=GpuHealth.LOST, health_reason=device.health_reason
            )
        nv, h = self._nv, device.handle
        read = _Reader(nv, device)
        try:
            util = read(lambda: nv.nvmlDeviceGetUtilizationRates(h))
            memory = read(lambda: nv.nvmlDeviceGetMemoryInfo(h))
            temperature = read(lambda: _temperature(nv, h))
            power_mw = read(lambda: nv.nvmlDeviceGetPowerUsage(h))
            energy_mj = read(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h))
            ecc_unc = read(
                lambda: nv.nvmlDeviceGetTotalEccErrors(
                    h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC
                )
            )
            ecc_cor = read(
                lambda: nv.nvmlDeviceGetTotalEccErrors(
                    h, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_VOLATILE_ECC
                )
            )
            procs = read(lambda: nv.nvmlDeviceGetComputeRunningProcesses(h)) or []
        except _Lost:
            return GpuSample(
                **base, xid_events=xids, health=GpuHealth.LOST, health_reason=device.health_reason
            )
        return GpuSample(
            **base,
            utilization_ratio=None if util is None else min(max(util.gpu / 100.0, 0.0), 1.0),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else power_mw / 1000.0,
            energy_joules=None if energy_mj is None else energy_mj / 1000.0,
            ecc_uncorrected_total=None if ecc_unc is None else int(ecc_unc),
            ecc_corrected_total=None if ecc_cor is None else int(ecc_cor),
            xid_events=xids,
            health=device.health,
            health_reason=device.health_reason,
            processes=[_process(p) for p in procs[:64]],
        )


class _Reader:
    """Reads one field: None when unsupported, `_Lost` when the GPU is gone."""

    def __init__(self, nv: Any, device: _Device) -> None:
        self._nv, self._device = nv, device

    def __call__(self, fn: Callable[[], T]) -> T | None:
        nv = self._nv
        try:
            return fn()
        except nv.NVMLError_GpuIsLost as exc:
            self._device.health, self._device.health_reason = GpuHealth.LOST, str(exc)
            raise _Lost from exc
        except nv.NVMLError_Unknown as exc:
            if self._device.health is GpuHealth.HEALTHY:
                self._device.health, self._device.health_reason = (
                    GpuHealth.UNHEALTHY,
                    f"NVML: {exc}",
                )
            return None
        except nv.NVMLError:
            return None  # NotSupported, NoPermission, ...: this field only


def _temperature(nv: Any, handle: Any) -> int:
    """`nvmlDeviceGetTemperatureV` where the library and driver have it, else the old call."""
    getter = getattr(nv, "nvmlDeviceGetTemperatureV", None)
    if getter is not None:
        try:
            return int(getter(handle, nv.NVML_TEMPERATURE_GPU))
        except (nv.NVMLError_FunctionNotFound, nv.NVMLError_ArgumentVersionMismatch):
            pass
    return int(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))


def _process(p: Any) -> GpuProcess:
    used = getattr(p, "usedGpuMemory", None)
    return GpuProcess(pid=int(p.pid), used_memory_bytes=None if used is None else int(used))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _open_device(nv: Any, index: int) -> _Device:
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nv.nvmlDeviceGetUUID(handle))
        name = _text(nv.nvmlDeviceGetName(handle))
        memory_bytes = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
    except (nv.NVMLError_GpuIsLost, nv.NVMLError_Unknown) as exc:
        # Keep the slot so the index stays stable and the server sees a lost GPU, not fewer GPUs.
        info = GpuInfo(index=index, uuid=f"GPU-lost-{index}", model="unknown", memory_bytes=0)
        return _Device(index, None, info, health=GpuHealth.LOST, health_reason=str(exc))
    mig = False
    try:
        current, _pending = nv.nvmlDeviceGetMigMode(handle)
        mig = current == nv.NVML_DEVICE_MIG_ENABLE
    except nv.NVMLError:
        pass
    info = GpuInfo(
        index=index,
        uuid=uuid,
        model=normalise_model(name),
        name=name,
        memory_bytes=memory_bytes,
        mig_enabled=mig,
    )
    minor: int | None = None  # unknown: the fence takes the index as the minor number
    with contextlib.suppress(nv.NVMLError):
        minor = int(nv.nvmlDeviceGetMinorNumber(handle))
    return _Device(index, handle, info, minor=minor)


def _find_nvlink_peers(nv: Any, devices: list[_Device]) -> None:
    peers: dict[int, list[int]] = {d.index: [] for d in devices}
    live = [d for d in devices if d.handle is not None]
    for a in live:
        for b in live:
            if a.index >= b.index:
                continue
            try:
                status = nv.nvmlDeviceGetP2PStatus(
                    a.handle, b.handle, nv.NVML_P2P_CAPS_INDEX_NVLINK
                )
            except nv.NVMLError:
                continue
            if status == nv.NVML_P2P_STATUS_OK:
                peers[a.index].append(b.index)
                peers[b.index].append(a.index)
    for d in devices:
        d.info = d.info.model_copy(update={"nvlink_peers": peers[d.index]})


def _xid_event_set(nv: Any, devices: list[_Device]) -> Any | None:
    """An event set with every GPU that supports XID events registered; None if none does."""
    try:
        event_set = nv.nvmlEventSetCreate()
    except nv.NVMLError:
        return None
    registered = 0
    for d in devices:
        if d.handle is None:
            continue
        try:
            nv.nvmlDeviceRegisterEvents(d.handle, nv.nvmlEventTypeXidCriticalError, event_set)
            registered += 1
        except nv.NVMLError:
            log.info("GPU %d does not report XID events", d.index)
    if registered:
        return event_set
    _quiet(nv, lambda: nv.nvmlEventSetFree(event_set))
    return None


def _quiet(nv: Any, fn: Callable[[], object]) -> None:
    with contextlib.suppress(nv.NVMLError):
        fn()
