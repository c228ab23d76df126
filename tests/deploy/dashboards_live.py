"""`make test-dashboards`: every Grafana panel's query returns data from a real Prometheus.

Grafana cannot be installed here, so this does what Grafana would: Debian's Prometheus server
scrapes a running fairgpu server and simulated agents (with the shipped scrape config and rules),
a small workload runs (jobs in quota, borrowing, a reclaim preemption, a held job, GPU faults),
and each panel's query, with its variables filled in as Grafana fills them, is sent to
Prometheus' HTTP API. Slow (about a minute), so not part of `make test`; the file name keeps
pytest from collecting it unless named on the command line.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.sync.client import connect as ws_connect

from tests.deploy.promql import (
    ALL_VALUES,
    DEPLOY,
    RULE_FILES,
    fill_variables,
    label_values_query,
    panel_queries,
    variable_queries,
)
from tests.deploy.stack import Stack, free_port, running_stack, wait_until

SCRAPE_INTERVAL = "1s"
# Grafana's $__rate_interval is max(4 × scrape interval, $__interval + scrape interval).
GRAFANA = {"$__rate_interval": "5s", "$__interval": "1s", "$__range": "5m"}
# The simulated GPUs are 97% busy whenever a task holds them, so none is ever "idle allocated":
# widening the idle threshold (a dashboard variable) proves the allocation join returns rows.
VALUES = {**ALL_VALUES, "idle_threshold": "1.01"}
NODES = [("h100-a", "dc1", "4xH100"), ("a100-a", "dc2", "4xA100-80GB")]
SLEEP = ["sleep", "600"]


def prometheus_config(stack: Stack, workdir: Path) -> Path:
    """The shipped prometheus.yml and rules, pointed at this stack and sped up."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    rule_paths = []
    for path in RULE_FILES:
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group.pop("interval", None)  # evaluate every second like the rest
        (workdir / path.name).write_text(yaml.safe_dump(rules))
        rule_paths.append(str(workdir / path.name))
    config["rule_files"] = rule_paths
    for job in config["scrape_configs"]:
        if job["job_name"] == "fairgpu-server":
            job["static_configs"] = [{"targets": [stack.url.removeprefix("http://")]}]
            # The stack's server sets no metrics token and answers its own machine; the file
            # the shipped config names is the deployment's.
            (workdir / "metrics-token").write_text("unused-on-loopback\n")
            job["authorization"]["credentials_file"] = str(workdir / "metrics-token")
        if job["job_name"] == "fairgpu-agent":
            targets = [a.metrics_url.split("/")[2] for a in stack.agents]
            (workdir / "agents.yml").write_text(yaml.safe_dump([{"targets": targets}]))
            job["file_sd_configs"] = [
                {"files": [str(workdir / "agents*.yml")], "refresh_interval": "1s"}
            ]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, config: Path, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus package is needed: apt-get install prometheus"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str, start: float | None = None, end: float | None = None) -> Any:
        """An instant query, or a range query (1 s steps) when start and end are given."""
        if start is None or end is None:
            reply = self.http.get("/api/v1/query", params={"query": expr})
        else:
            params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": 1}
            reply = self.http.get("/api/v1/query_range", params=params)
        body = reply.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def has(self, expr: str) -> bool:
        return bool(self.query(expr))

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture
def prometheus_and_stack(tmp_path: Path) -> Iterator[tuple[Prometheus, Stack]]:
    with running_stack(tmp_path / "stack", NODES) as stack:
        prometheus = Prometheus(prometheus_config(stack, tmp_path), tmp_path)
        try:
            wait_until("prometheus ready", prometheus.ready, 60)
            yield prometheus, stack
        finally:
            prometheus.close()


def run_workload(stack: Stack, prometheus: Prometheus) -> None:
    """In-quota jobs, borrowing, a reclaim that preempts the borrower, a held job, GPU faults."""
    acme = stack.org("acme", {"H100": (2, 4)}, shares=2)
    globex = stack.org("globex", {"H100": (2, 4), "A100-80GB": (2, 4)})
    # globex borrows every H100 (2 guaranteed + 2 borrowed) with a preemptible gang.
    stack.submit(globex, name="borrower", command=SLEEP, gpus_per_node=4, gpu_type="H100",
                 preemptible=True, time_limit=600)  # fmt: skip
    stack.submit(globex, name="a100", command=SLEEP, gpus_per_node=2, gpu_type="A100-80GB",
                 time_limit=600)  # fmt: skip
    stack.submit(acme, name="held", command=SLEEP, gpus_per_node=1, hold=True, time_limit=600)
    # A histogram series is born with its first observation, which rate() cannot see: admit one
    # more globex job once Prometheus has globex's series, as on a cluster that has been up a while.
    wait_until(
        "globex's first admissions scraped",
        lambda: prometheus.has('fairgpu_admission_wait_seconds_count{org="globex"}'),
        60,
    )
    stack.submit(globex, name="short", command=["sleep", "2"], gpus_per_node=1,
                 gpu_type="A100-80GB", preemptible=True, time_limit=60)  # fmt: skip
    wait_until(
        "the borrower holds borrowed GPUs",
        lambda: prometheus.has("fairgpu_org_borrowed_gpus > 0"),
        60,
    )
    time.sleep(2.5)  # past the minimum runtime, so that the borrower may be preempted
    # acme wants its guarantee back: the borrower is preempted and waits again.
    stack.submit(acme, name="reclaim", command=SLEEP, gpus_per_node=2, gpu_type="H100",
                 time_limit=600)  # fmt: skip
    interactive_session(stack, globex)
    _h100, a100 = stack.agents
    a100.inject("xid 2 48", "xid 2 13", "lost 3")


def interactive_session(stack: Stack, token: str) -> None:
    """A `run --pty` job attached to once, as the CLI does: the relay's series move."""
    job = stack.submit(token, name="shell", command=["sh", "-c", "echo shell-ready; sleep 600"],
                       gpus_per_node=1, gpu_type="A100-80GB", preemptible=True,
                       interactive=True, time_limit=600)  # fmt: skip
    with stack.client(token) as http:
        wait_until(
            "the shell runs", lambda: http.get(f"/v1/jobs/{job}").json()["state"] == "RUNNING", 60
        )
    url = stack.url.replace("http://", "ws://") + f"/v1/jobs/{job}/attach?rank=0"
    with ws_connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=30
    ) as ws:
        ws.send(json.dumps({"type": "resize", "rows": 24, "cols": 80}))  # starts the command
        seen = b""
        while b"shell-ready" not in seen:
            message = ws.recv(timeout=60)
            seen += message if isinstance(message, bytes) else b""


def test_every_panel_query_returns_data(prometheus_and_stack: tuple[Prometheus, Stack]) -> None:
    prometheus, stack = prometheus_and_stack
    start = time.time()
    run_workload(stack, prometheus)
    for what, expr in [
        ("a preemption", "sum(fairgpu_preemptions_total) > 0"),
        ("admissions", "sum(fairgpu_admission_wait_seconds_count) >= 3"),
        ("a job on GPUs", "fairgpu_gpu_allocation_info"),
        ("pending reasons", "fairgpu_pending_jobs"),
        ("an unhealthy GPU", "fairgpu_gpu_healthy == 0"),
        ("an XID", "fairgpu_gpu_xid_errors_total > 0"),
        ("recording rules", "fairgpu:org_gpus_allocated_over_guaranteed:ratio"),
    ]:
        wait_until(what, lambda e=expr: prometheus.has(e), 90)
    time.sleep(6)  # a few more scrapes so that rates over $__rate_interval have two points
    end = time.time()

    empty = []
    queries = panel_queries()
    for q in queries:
        expr = fill_variables(q.expr, VALUES, GRAFANA)
        result = prometheus.query(expr) if q.instant else prometheus.query(expr, start, end)
        values = [v for series in result for v in series.get("values", [series.get("value")])]
        if not any(v and math.isfinite(float(v[1])) for v in values):
            empty.append(f"{q.dashboard} / {q.panel} [{q.ref_id}]: {expr}")
    for uid, var, query in variable_queries():
        if not prometheus.query(fill_variables(label_values_query(query), VALUES, GRAFANA)):
            empty.append(f"{uid} variable ${var}: {query}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert len(queries) >= 40

    firing = {a["labels"]["alertname"] for a in prometheus.http.get("/api/v1/alerts").json()
              ["data"]["alerts"] if a["state"] == "firing"}  # fmt: skip
    assert "FairgpuGpuEccUncorrectable" in firing, firing
