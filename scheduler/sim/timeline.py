"""Step-function logs of what the simulated cluster held, integrated into buckets afterwards.

Recording is one append per change so that the event loop stays cheap; integration over time
buckets happens once, with numpy, when the run is over.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(slots=True)
class StepLog:
    """Values of a step function: `values[k]` holds from `times[k]` until the next change."""

    times: array[float] = field(default_factory=lambda: array("d"))
    values: list[array[float]] = field(default_factory=list)

    def append(self, t: float, *values: float) -> None:
        if not self.values:
            self.values = [array("d") for _ in values]
        self.times.append(t)
        for column, value in zip(self.values, values, strict=True):
            column.append(value)

    def integrate(self, column: int, edges: FloatArray) -> FloatArray:
        """Integral of one column over each [edges[i], edges[i+1]) bucket."""
        return np.diff(self.cumulative(self.column(column), edges))

    def column(self, column: int) -> FloatArray:
        if not self.values:
            return np.zeros(0)
        return np.frombuffer(self.values[column], dtype=np.float64)

    def cumulative(self, values: FloatArray, edges: FloatArray) -> FloatArray:
        """The running integral of a step function at `edges` (exact: it is piecewise linear)."""
        times = np.frombuffer(self.times, dtype=np.float64) if len(self.times) else np.zeros(0)
        if times.size == 0:
            return np.zeros(edges.size)
        # Append a final point at the last edge so that the last value extends to the end.
        end = max(float(edges[-1]), float(times[-1]))
        t = np.append(times, end)
        areas = np.concatenate(([0.0], np.cumsum(values * np.diff(t))))
        return np.interp(edges, t, areas, left=0.0)


@dataclass(slots=True)
class Timeline:
    """What the cluster and every org held over time."""

    org_count: int
    cluster: StepLog = field(default_factory=StepLog)  # allocated GPUs, 1 if work waits
    orgs: list[StepLog] = field(default_factory=list)  # allocated, demanded, borrowed GPUs

    def __post_init__(self) -> None:
        self.orgs = [StepLog() for _ in range(self.org_count)]
        self.cluster.append(0.0, 0.0, 0.0)
        for log in self.orgs:
            log.append(0.0, 0.0, 0.0, 0.0)

    def cluster_changed(self, t: float, allocated: int, waiting: bool) -> None:
        self.cluster.append(t, allocated, 1.0 if waiting else 0.0)

    def org_changed(self, t: float, index: int, allocated: int, demand: int, borrowed: int) -> None:
        self.orgs[index].append(t, allocated, demand, borrowed)
