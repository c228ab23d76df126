"""The agent's /metrics: per-GPU series and the GPU-to-job join, plus dcgm-exporter job files.

Job ids never label the per-GPU series (they churn); `fairgpu_gpu_allocation_info` carries them
so that dashboards join on (node, gpu). The registry is the agent's own, not the global one.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agents.scrapeserver import BoundedServer, QuietHandler
from agents.state import write_atomic
from protocol.agent import GpuInfo, GpuSample

if TYPE_CHECKING:
    from agents.wallwatch import WallWatch

log = logging.getLogger(__name__)
METRICS_RETRY_S = 5.0
"""How often the agent tries again for a metrics port someone else holds."""
_HEALTH_VALUE = {"healthy": 1.0, "unhealthy": 0.0, "lost": 0.0}


class AgentMetrics(Collector):
    """Holds the latest samples; Prometheus reads them at scrape time (no per-sample cost)."""

    def __init__(self, node: str, devices: Sequence[GpuInfo]) -> None:
        self.node = node
        self.devices = {d.index: d for d in devices}
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._samples: list[GpuSample] = []
        self._xid_totals: dict[int, int] = {}
        self._allocations: list[tuple[int, int, str]] = []
        self.wall: WallWatch | None = None
        """The check of the private tasks' nftables wall, on a node that has one."""
        self.registry.register(self)

    def update(
        self, samples: Iterable[GpuSample], allocations: Iterable[tuple[int, int, str]]
    ) -> None:
        with self._lock:
            self._samples = list(samples)
            for s in self._samples:
                self._xid_totals[s.index] = self._xid_totals.get(s.index, 0) + len(s.xid_events)
            self._allocations = sorted(allocations)

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "gpu", "uuid", "model"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"fairgpu_gpu_{name}", doc, labels=labels)

        util = gauge("utilization_ratio", "Fraction of time a kernel ran on the GPU.")
        used = gauge("memory_used_bytes", "GPU memory in use.")
        total = gauge("memory_total_bytes", "GPU memory installed.")
        power = gauge("power_watts", "Power draw.")
        temp = gauge("temperature_celsius", "GPU die temperature.")
        healthy = gauge("healthy", "1 when the GPU is healthy, 0 when unhealthy or lost.")
        energy = CounterMetricFamily(
            "fairgpu_gpu_energy_joules", "Energy used since the driver loaded.", labels=labels
        )
        ecc = CounterMetricFamily(
            "fairgpu_gpu_ecc_errors",
            "ECC memory errors since the driver loaded.",
            labels=[*labels, "type"],
        )
        xid = CounterMetricFamily(
            "fairgpu_gpu_xid_errors", "XID errors seen since the agent started.", labels=labels
        )
        alloc = GaugeMetricFamily(
            "fairgpu_gpu_allocation_info",
            "1 for each GPU held by a job; join on node and gpu.",
            labels=["node", "gpu", "job_id", "org"],
        )
        with self._lock:
            samples, allocations = list(self._samples), list(self._allocations)
            xid_totals = dict(self._xid_totals)
        for s in samples:
            device = self.devices.get(s.index)
            values = [self.node, str(s.index), s.uuid, device.model if device else "unknown"]
            for family, value in (
                (util, s.utilization_ratio),
                (used, s.memory_used_bytes),
                (total, s.memory_total_bytes),
                (power, s.power_w),
                (temp, s.temperature_c),
                (energy, s.energy_joules),
            ):
                if value is not None:
                    family.add_metric(values, float(value))
            healthy.add_metric(values, _HEALTH_VALUE[s.health])
            if s.ecc_corrected_total is not None:
                ecc.add_metric([*values, "corrected"], float(s.ecc_corrected_total))
            if s.ecc_uncorrected_total is not None:
                ecc.add_metric([*values, "uncorrected"], float(s.ecc_uncorrected_total))
            xid.add_metric(values, float(xid_totals.get(s.index, 0)))
        for gpu, job, org in allocations:
            alloc.add_metric([self.node, str(gpu), str(job), org], 1.0)
        yield from (util, used, total, power, temp, healthy, energy, ecc, xid, alloc)
        if self.wall is not None:
            yield from _wall_metrics(self.node, self.wall)

    def serve(self, port: int, addr: str = "0.0.0.0", *, token: str | None = None) -> BoundedServer:
        """In a thread; the server is returned for `shutdown()`. With `token`, a scrape must
        bring it as a bearer token: tasks share the node's network, and the allocation series
        name every org's jobs on the node. Tasks reach the port token or not: the server
        bounds what their connections hold of the agent (agents/scrapeserver.py)."""
        app = make_wsgi_app(self.registry)
        guarded = _bearer_guard(app, token) if token else app
        server = make_server(addr, port, guarded, BoundedServer, handler_class=QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server

    def serve_when_free(
        self,
        port: int,
        addr: str = "0.0.0.0",
        *,
        token: str | None = None,
        retry_s: float = METRICS_RETRY_S,
    ) -> threading.Thread | None:
        """serve(), or, where the port is taken, the same from a thread that tries again every
        `retry_s` until it binds (returned; None: served at once). Tasks outlive their agent,
        and a host-network task may hold the port while the agent is down: the agent then
        refused to start, and the node went down for every org on it. It now heartbeats
        without /metrics meanwhile (Prometheus sees the target down, or the task's answers:
        docs/ISOLATION.md). Any other error (an address the node lacks) stops the start."""
        try:
            self.serve(port, addr, token=token)
            return None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            log.error(
                "metrics port %d is taken (a task in the node's network?): no /metrics until "
                "it is free; trying again every %.0f s",
                port,
                retry_s,
            )

        def again() -> None:
            while True:
                time.sleep(retry_s)
                try:
                    self.serve(port, addr, token=token)
                except OSError:
                    continue
                log.warning("metrics port %d is free again: /metrics served", port)
                return

        thread = threading.Thread(target=again, name="metrics-retry", daemon=True)
        thread.start()
        return thread


def _wall_metrics(node: str, wall: WallWatch) -> Iterator[Metric]:
    """How often the wall was found removed or changed: each one a window in which private
    tasks ran unwalled (until the check that nft monitor's event started, or at most one check
    interval with the monitor down), or stood still (while it stayed lost)."""
    restores = CounterMetricFamily(
        "fairgpu_agent_wall_restores",
        "Times the nftables wall of the private tasks was found removed or changed and made anew.",
        labels=["node"],
    )
    restores.add_metric([node], float(wall.restores))
    failures = CounterMetricFamily(
        "fairgpu_agent_wall_failures",
        "Checks that found the nftables wall lost and could not make it anew.",
        labels=["node"],
    )
    failures.add_metric([node], float(wall.failures))
    intact = GaugeMetricFamily(
        "fairgpu_agent_wall_intact",
        "1 while the wall stands and the node takes private tasks, 0 while it is lost.",
        labels=["node"],
    )
    intact.add_metric([node], 1.0 if wall.intact else 0.0)
    yield from (restores, failures, intact)


_Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _bearer_guard(app: _Wsgi, token: str) -> _Wsgi:
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain")])
        return [b"/metrics needs the agent's metrics token\n"]

    return guarded


MAPPING_DIR_MODE = 0o2750
MAPPING_FILE_MODE = 0o640


class DcgmJobMapping:
    """dcgm-exporter's HPC job mapping: one file per GPU index holding its job ids, one a line.

    Point dcgm-exporter's `--hpc-job-mapping-dir` at the same directory and every DCGM series
    gets an `hpc_job` label. Files are rewritten only when the allocation changes.

    Which jobs hold which GPUs is no task's to read (another org's task learnt there when a
    rival's job started, on how many GPUs, and next to whom): the directory is root's and its
    group's alone (2750, the group it has, which the files inherit) and the files 0640.
    dcgm-exporter reads them as root, or as a member of the group the operator gives the
    directory (`chgrp dcgm-exporter DIR`), which no task uid is.
    """

    def __init__(self, directory: Path, gpu_indices: Iterable[int]) -> None:
        self.directory = directory
        self.gpu_indices = sorted(gpu_indices)
        self._written: dict[int, str] = {}
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(MAPPING_DIR_MODE)
        for entry in directory.iterdir():  # what an earlier agent wrote, readable by any uid
            if entry.is_file() and not entry.is_symlink():
                os.chown(entry, -1, directory.stat().st_gid)
                entry.chmod(MAPPING_FILE_MODE)

    def write(self, allocations: Iterable[tuple[int, int, str]]) -> None:
        jobs: dict[int, list[str]] = {i: [] for i in self.gpu_indices}
        for gpu, job, _org in allocations:
            jobs.setdefault(gpu, []).append(str(job))
        for gpu, ids in jobs.items():
            text = "".join(f"{job}\n" for job in sorted(set(ids)))
            if self._written.get(gpu) != text:
                try:
                    write_atomic(self.directory / str(gpu), text, MAPPING_FILE_MODE)
                    self._written[gpu] = text
                except OSError as exc:
                    log.warning("cannot write dcgm job mapping for GPU %d: %s", gpu, exc)
