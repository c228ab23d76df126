"""GPU backends behind one small interface, so that nothing else in the agent imports NVML.

`open_backend` picks one: the simulated backend when a `--simulate` spec is given, NVML otherwise.
"""

from __future__ import annotations

from agents.gpu.base import GpuBackend, GpuBackendError, normalise_model
from agents.gpu.simulated import SimulatedBackend, parse_simulate_spec

__all__ = [
    "GpuBackend",
    "GpuBackendError",
    "SimulatedBackend",
    "normalise_model",
    "open_backend",
    "parse_simulate_spec",
]


def open_backend(simulate: str | None) -> GpuBackend:
    """The simulated backend for a spec like "8xH100", NVML otherwise (raises if unavailable)."""
    if simulate:
        return SimulatedBackend(parse_simulate_spec(simulate))
    from agents.gpu.nvml import NvmlBackend  # imported lazily: only this path needs pynvml

    backend: GpuBackend = NvmlBackend.open()
    return backend
