"""The NVML backend against a fake `pynvml` that raises the real NVML exception classes."""

from __future__ import annotations

import sys

import pynvml as real
import pytest

from agents.gpu import GpuBackendError, open_backend
from agents.gpu.nvml import NvmlBackend
from tests.agents.fake_pynvml import FakeNvml, device


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml([device(i) for i in range(8)])
    fake.nvlink_pairs = {frozenset({a, b}) for a in range(8) for b in range(8) if a != b}
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


def test_eight_gpu_node_reports_every_field(fake_nvml: FakeNvml) -> None:
    fake_nvml.devices[3]["processes"] = [(4242, 2_000_000)]
    backend = open_backend(None)
    infos = backend.devices()
    assert [g.index for g in infos] == list(range(8))
    assert {g.model for g in infos} == {"H100"}
    assert infos[0].name == "NVIDIA H100 80GB HBM3"
    assert infos[0].memory_bytes == 85_899_345_920
    assert infos[0].nvlink_peers == [1, 2, 3, 4, 5, 6, 7]
    assert len({g.uuid for g in infos}) == 8

    samples = backend.sample({})
    s3 = samples[3]
    assert s3.utilization_ratio == pytest.approx(0.3)
    assert s3.memory_used_bytes == 3 * 1_048_576
    assert s3.memory_total_bytes == 85_899_345_920
    assert s3.temperature_c == 33
    assert s3.power_w == pytest.approx(70.503)  # mW -> W
    assert s3.energy_joules == pytest.approx(4000.0)  # mJ -> J
    assert (s3.ecc_corrected_total, s3.ecc_uncorrected_total) == (3, 0)
    assert [(p.pid, p.used_memory_bytes) for p in s3.processes] == [(4242, 2_000_000)]
    assert all(s.health == "healthy" for s in samples)
    assert samples[0].sampled_at.tzinfo is not None
    backend.close()
    assert fake_nvml.shutdown_calls == 1


def test_field_not_supported_drops_that_field_only(fake_nvml: FakeNvml) -> None:
    fake_nvml.devices[1]["errors"] = {
        "power_mw": real.NVMLError_NotSupported,
        "energy_mj": real.NVMLError_NoPermission,
    }
    s1 = open_backend(None).sample({})[1]
    assert s1.power_w is None
    assert s1.energy_joules is None
    assert s1.utilization_ratio == pytest.approx(0.1)
    assert s1.temperature_c == 31
    assert s1.health == "healthy"


def test_mig_node_reports_mig_and_no_utilisation(fake_nvml: FakeNvml) -> None:
    fake_nvml.devices = [
        device(
            i, "NVIDIA A100-SXM4-80GB", errors={"utilization_percent": real.NVMLError_NotSupported}
        )
        for i in range(2)
    ]
    for d in fake_nvml.devices:
        d["mig_mode"] = [real.NVML_DEVICE_MIG_ENABLE, real.NVML_DEVICE_MIG_ENABLE]
    fake_nvml.nvlink_pairs = set()
    backend = open_backend(None)
    infos = backend.devices()
    assert all(g.mig_enabled and g.model == "A100-80GB" for g in infos)
    assert infos[0].nvlink_peers == []
    samples = backend.sample({})
    assert all(s.utilization_ratio is None and s.memory_used_bytes is not None for s in samples)


def test_gpu_lost_while_running_is_reported_lost(fake_nvml: FakeNvml) -> None:
    backend = open_backend(None)
    fake_nvml.devices[5]["errors"] = {"*": real.NVMLError_GpuIsLost}
    samples = backend.sample({})
    assert samples[5].health == "lost"
    assert samples[5].utilization_ratio is None
    assert samples[5].uuid == backend.devices()[5].uuid
    assert all(s.health == "healthy" for i, s in enumerate(samples) if i != 5)
    fake_nvml.devices[5]["errors"] = {}
    assert backend.sample({})[5].health == "lost"  # a lost GPU stays lost until restart


def test_gpu_lost_at_start_keeps_its_slot(fake_nvml: FakeNvml) -> None:
    fake_nvml.devices[2]["errors"] = {"*": real.NVMLError_GpuIsLost}
    backend = open_backend(None)
    assert [g.index for g in backend.devices()] == list(range(8))
    assert backend.sample({})[2].health == "lost"


def test_unknown_error_marks_unhealthy(fake_nvml: FakeNvml) -> None:
    backend = open_backend(None)
    fake_nvml.devices[0]["errors"] = {"temperature": real.NVMLError_Unknown}
    s0 = backend.sample({})[0]
    assert s0.health == "unhealthy"
    assert s0.temperature_c is None
    assert s0.power_w is not None


def test_xid_events_are_reported_once_and_mark_hardware_faults(fake_nvml: FakeNvml) -> None:
    backend = open_backend(None)
    fake_nvml.events.extend([(4, 79), (6, 13)])
    samples = backend.sample({})
    assert samples[4].xid_events == [79]
    assert samples[4].health == "unhealthy"
    assert samples[6].xid_events == [13]
    assert samples[6].health == "healthy"  # XID 13 is the application's fault
    again = backend.sample({})
    assert again[4].xid_events == []
    assert again[4].health == "unhealthy"


def test_deprecated_temperature_call_is_the_fallback(fake_nvml: FakeNvml) -> None:
    fake_nvml.old_temperature_only = True
    assert open_backend(None).sample({})[7].temperature_c == 37


@pytest.mark.parametrize("error", [real.NVMLError_LibraryNotFound, real.NVMLError_DriverNotLoaded])
def test_no_library_or_driver_names_simulate(
    monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], init_error=error).module())
    with pytest.raises(GpuBackendError, match="--simulate"):
        NvmlBackend.open()


def test_missing_python_package_names_simulate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(GpuBackendError, match="--simulate"):
        NvmlBackend.open()
