"""A fake `pynvml` module: the real exception classes and constants, devices held in dicts."""

from __future__ import annotations

import types
from collections import deque
from typing import Any

import pynvml as real


class FakeNvml:
    """State behind the fake module; tests edit `devices`, `errors`, `events` directly."""

    def __init__(self, devices: list[dict[str, Any]], *, init_error: type | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.nvlink_pairs: set[frozenset[int]] = set()
        self.events: deque[tuple[int, int]] = deque()  # (device index, xid)
        self.shutdown_calls = 0
        self.old_temperature_only = False

    def module(self) -> types.ModuleType:
        m = types.ModuleType("pynvml")
        for name in dir(real):
            if name.startswith(("NVMLError", "NVML_", "nvmlEventType")):
                setattr(m, name, getattr(real, name))
        fake = self

        def call(index: int, field: str) -> Any:
            dev = fake.devices[index]
            error = dev.get("errors", {}).get(field) or dev.get("errors", {}).get("*")
            if error is not None:
                raise error()
            return dev[field]

        def init() -> None:
            if fake.init_error is not None:
                raise fake.init_error()

        def shutdown() -> None:
            fake.shutdown_calls += 1

        def wait(event_set: Any, timeout_ms: int) -> Any:
            if not fake.events:
                raise real.NVMLError_Timeout()
            index, xid = fake.events.popleft()
            return types.SimpleNamespace(device=index, eventData=xid)

        def temperature_v(h: int, sensor: int) -> Any:
            if fake.old_temperature_only:
                raise real.NVMLError_FunctionNotFound()
            return call(h, "temperature")

        def p2p(a: int, b: int, caps: int) -> int:
            ok = frozenset({a, b}) in fake.nvlink_pairs
            status: int = real.NVML_P2P_STATUS_OK if ok else real.NVML_P2P_STATUS_NOT_SUPPORTED
            return status

        def memory(h: int) -> Any:
            total, used = call(h, "memory_total"), call(h, "memory_used")
            return types.SimpleNamespace(total=total, used=used, free=total - used)

        def register(h: int, types_: int, event_set: Any) -> None:
            call(h, "register_events")

        def ecc(h: int, kind: int, counter: int) -> Any:
            field = (
                "ecc_uncorrected"
                if kind == real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
                else "ecc_corrected"
            )
            return call(h, field)

        m.__dict__.update(
            nvmlInit=init,
            nvmlShutdown=shutdown,
            nvmlDeviceGetCount=lambda: len(fake.devices),
            nvmlDeviceGetHandleByIndex=lambda i: (call(i, "handle"), i)[1],
            nvmlDeviceGetUUID=lambda h: call(h, "uuid"),
            nvmlDeviceGetName=lambda h: call(h, "name"),
            nvmlDeviceGetMinorNumber=lambda h: (
                call(h, "minor") if "minor" in fake.devices[h] else h
            ),
            nvmlDeviceGetMemoryInfo=memory,
            nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(
                gpu=call(h, "utilization_percent"), memory=0
            ),
            nvmlDeviceGetTemperatureV=temperature_v,
            nvmlDeviceGetTemperature=lambda h, sensor: call(h, "temperature"),
            nvmlDeviceGetPowerUsage=lambda h: call(h, "power_mw"),
            nvmlDeviceGetTotalEnergyConsumption=lambda h: call(h, "energy_mj"),
            nvmlDeviceGetTotalEccErrors=ecc,
            nvmlDeviceGetComputeRunningProcesses=lambda h: [
                types.SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in call(h, "processes")
            ],
            nvmlDeviceGetMigMode=lambda h: call(h, "mig_mode"),
            nvmlDeviceGetP2PStatus=p2p,
            nvmlEventSetCreate=lambda: "event-set",
            nvmlEventSetFree=lambda s: None,
            nvmlDeviceRegisterEvents=register,
            nvmlEventSetWait=wait,
        )
        return m


def device(index: int, name: str = "NVIDIA H100 80GB HBM3", **overrides: Any) -> dict[str, Any]:
    dev: dict[str, Any] = {
        "handle": index,
        "uuid": f"GPU-{index:08d}-0000-0000-0000-000000000000",
        "name": name,
        "memory_total": 85_899_345_920,
        "memory_used": 1_048_576 * index,
        "utilization_percent": 10 * index,
        "temperature": 30 + index,
        "power_mw": 70_500 + index,
        "energy_mj": 1_000_000 * (index + 1),
        "ecc_uncorrected": 0,
        "ecc_corrected": index,
        "processes": [],
        "mig_mode": [real.NVML_DEVICE_MIG_DISABLE, real.NVML_DEVICE_MIG_DISABLE],
        "register_events": None,
        "errors": {},
    }
    dev.update(overrides)
    return dev
