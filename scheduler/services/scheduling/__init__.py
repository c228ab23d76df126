"""The scheduling service: load a snapshot, let the pure core decide, apply guarded and fenced."""

from scheduler.services.scheduling.cycle import CycleResult, run_cycle
from scheduler.services.scheduling.lease import Lease, LeaseLost

__all__ = ["CycleResult", "Lease", "LeaseLost", "run_cycle"]
