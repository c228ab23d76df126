"""The relay's Prometheus instruments: streams open, bytes relayed, attach latency, and the hop
between server processes as the claiming process sees it.

A stream whose agent reached another process than its holder crosses two: the holder meters it
as every stream (sessions, bytes, latency), the claiming process meters its side of the hop
(hops, bytes carried), so that a byte relayed is counted once in `relayed_bytes` and the hop's
traffic is seen on both of its ends.

They live in the process registry (scheduler/metrics.py `PROCESS_REGISTRY`), so `/metrics`
carries them on every replica, summed over a host's workers in multiprocess mode. No job, user
or stream id is a label: `kind` (attach, new, port) and `direction` are the only ones.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from scheduler.metrics import PROCESS_REGISTRY

TO_JOB = "to_job"
FROM_JOB = "from_job"

SESSIONS_OPEN = Gauge(
    "fairgpu_interactive_sessions_open",
    "Streams being relayed now (a terminal, a new shell, a forwarded connection), by kind.",
    ["kind"],
    registry=PROCESS_REGISTRY,
    multiprocess_mode="livesum",
)
RELAYED_BYTES = Counter(
    "fairgpu_interactive_relayed_bytes",
    "Bytes relayed between users and jobs (binary frames), by direction (to_job, from_job).",
    ["direction"],
    registry=PROCESS_REGISTRY,
)
ATTACH_LATENCY = Histogram(
    "fairgpu_interactive_attach_latency_seconds",
    "From a stream's request to the first frame from the job's side, by kind.",
    ["kind"],
    registry=PROCESS_REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


HOPS = Counter(
    "fairgpu_interactive_hops",
    "Streams this process carried to the process holding their user's side (the agent reached "
    "this one), by kind.",
    ["kind"],
    registry=PROCESS_REGISTRY,
)
HOPS_OPEN = Gauge(
    "fairgpu_interactive_hops_open",
    "Streams this process is carrying to their holder now, by kind.",
    ["kind"],
    registry=PROCESS_REGISTRY,
    multiprocess_mode="livesum",
)
HOP_BYTES = Counter(
    "fairgpu_interactive_hop_bytes",
    "Bytes this process carried on hops to holders (binary frames), by direction (to_job, "
    "from_job); the holders count the same bytes in fairgpu_interactive_relayed_bytes_total.",
    ["direction"],
    registry=PROCESS_REGISTRY,
)


KINDS = ("attach", "new", "port")
"""The streams' kinds (scheduler/services/streamrows.StreamKind)."""


def _born() -> None:
    """Every series the operators' dashboard draws exists from the start, at zero: a series
    born with its first observation is invisible to rate() (no earlier point), and a gauge with
    no series yet reads as "no data" rather than as none open."""
    for kind in KINDS:
        SESSIONS_OPEN.labels(kind)
        ATTACH_LATENCY.labels(kind)
        HOPS.labels(kind)
        HOPS_OPEN.labels(kind)
    for direction in (TO_JOB, FROM_JOB):
        RELAYED_BYTES.labels(direction)
        HOP_BYTES.labels(direction)


_born()
# Counted on every frame: the labelled children are looked up once, not per frame (a lock and
# a dictionary lookup each time).
_RELAYED_TO_JOB = RELAYED_BYTES.labels(TO_JOB)
_RELAYED_FROM_JOB = RELAYED_BYTES.labels(FROM_JOB)


class HopMeter:
    """The claiming process's side of one hop: counted when it starts, open until it ends."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._to_job = HOP_BYTES.labels(TO_JOB)
        self._from_job = HOP_BYTES.labels(FROM_JOB)

    def __enter__(self) -> HopMeter:
        HOPS.labels(self.kind).inc()
        HOPS_OPEN.labels(self.kind).inc()
        return self

    def __exit__(self, *_: object) -> None:
        HOPS_OPEN.labels(self.kind).dec()

    def to_job(self, size: int) -> None:
        self._to_job.inc(size)

    def from_job(self, size: int) -> None:
        self._from_job.inc(size)


class StreamMeter:
    """One stream's measurements: opened when the relay starts, closed when it ends."""

    def __init__(self, kind: str, requested_at: float) -> None:
        self.kind = kind
        self.requested_at = requested_at
        """time.monotonic() when the user side asked for the stream."""
        self._first_seen = False
        self._open = False

    def __enter__(self) -> StreamMeter:
        SESSIONS_OPEN.labels(self.kind).inc()
        self._open = True
        return self

    def __exit__(self, *_: object) -> None:
        if self._open:
            SESSIONS_OPEN.labels(self.kind).dec()
            self._open = False

    def from_job(self, size: int) -> None:
        """A frame from the job's side (bytes or control): the first one ends the latency."""
        if not self._first_seen:
            self._first_seen = True
            ATTACH_LATENCY.labels(self.kind).observe(time.monotonic() - self.requested_at)
        if size:
            _RELAYED_FROM_JOB.inc(size)

    @staticmethod
    def to_job(size: int) -> None:
        _RELAYED_TO_JOB.inc(size)
