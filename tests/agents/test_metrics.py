"""The agent's /metrics exposition and dcgm-exporter job-mapping files."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agents.gpu import SimulatedBackend, parse_simulate_spec
from agents.metrics import AgentMetrics, DcgmJobMapping
from agents.scrapeserver import SCRAPE_IDLE_S


def scrape(metrics: AgentMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_per_gpu_series_and_allocation_info() -> None:
    backend = SimulatedBackend(parse_simulate_spec("2xH100"), seed="n1")
    uuid0 = backend.devices()[0].uuid
    metrics = AgentMetrics("n1", backend.devices())
    backend.inject_xid(1, 79)
    metrics.update(backend.sample({0: [123]}), [(0, 42, "acme")])
    metrics.update(backend.sample({0: [123]}), [(0, 42, "acme")])
    series = scrape(metrics)
    gpu0 = frozenset({("node", "n1"), ("gpu", "0"), ("uuid", uuid0), ("model", "H100")})
    assert series[("fairgpu_gpu_utilization_ratio", gpu0)] > 0.9
    assert series[("fairgpu_gpu_memory_total_bytes", gpu0)] == 80 * 1024**3
    assert series[("fairgpu_gpu_power_watts", gpu0)] > 600
    assert ("fairgpu_gpu_temperature_celsius", gpu0) in series
    assert ("fairgpu_gpu_energy_joules_total", gpu0) in series
    assert series[("fairgpu_gpu_healthy", gpu0)] == 1.0
    assert series[("fairgpu_gpu_ecc_errors_total", gpu0 | {("type", "uncorrected")})] == 0
    xid1 = {k: v for k, v in series.items() if k[0] == "fairgpu_gpu_xid_errors_total"}
    assert sorted(xid1.values()) == [0.0, 1.0]  # counted once although sampled twice
    info = {k: v for k, v in series.items() if k[0] == "fairgpu_gpu_allocation_info"}
    assert info == {
        (
            "fairgpu_gpu_allocation_info",
            frozenset({("node", "n1"), ("gpu", "0"), ("job_id", "42"), ("org", "acme")}),
        ): 1.0
    }
    unhealthy = [k for k, v in series.items() if k[0] == "fairgpu_gpu_healthy" and v == 0.0]
    assert len(unhealthy) == 1


def test_unsupported_fields_have_no_series() -> None:
    backend = SimulatedBackend(parse_simulate_spec("1xH100"))
    backend.lose(0)
    metrics = AgentMetrics("n1", backend.devices())
    metrics.update(backend.sample({}), [])
    names = {name for name, _ in scrape(metrics)}
    assert "fairgpu_gpu_power_watts" not in names
    assert "fairgpu_gpu_healthy" in names


def test_dcgm_job_mapping_files(tmp_path: Path) -> None:
    mapping = DcgmJobMapping(tmp_path / "jobs", range(4))
    mapping.write([(0, 7, "a"), (1, 7, "a"), (3, 9, "b")])
    assert (tmp_path / "jobs" / "0").read_text() == "7\n"
    assert (tmp_path / "jobs" / "2").read_text() == ""
    assert (tmp_path / "jobs" / "3").read_text() == "9\n"
    mapping.write([(3, 9, "b")])
    assert (tmp_path / "jobs" / "0").read_text() == ""
    assert (tmp_path / "jobs" / "3").read_text() == "9\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another uid needs root")
def test_no_task_reads_which_jobs_hold_which_gpus() -> None:
    """The mapping files told any uid on the node which job ids held which GPU: another org's
    task saw when a rival's job started, on how many GPUs and beside whom. dcgm-exporter reads
    them as root or through the directory's group, which the operator gives it."""
    base = Path(tempfile.mkdtemp(prefix="fairgpu-test-dcgm-", dir="/srv"))
    try:
        base.chmod(0o755)  # as /run or /var/lib is: every uid passes through
        directory = base / "jobs"
        directory.mkdir()
        (directory / "0").write_text("3\n")  # an earlier agent's, made readable by anyone
        (directory / "0").chmod(0o644)
        os.chown(directory, -1, EXPORTER_GID)
        mapping = DcgmJobMapping(directory, range(2))
        mapping.write([(1, 7, "a")])
        assert stat.S_IMODE(directory.stat().st_mode) == 0o2750
        for name in ("0", "1"):
            info = (directory / name).stat()
            assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, EXPORTER_GID)
        probe = (
            "import sys\n"
            "for f in sys.argv[1:]:\n"
            "    try:\n"
            "        print(open(f).read().strip() or 'none')\n"
            "    except OSError as exc:\n"
            "        print(type(exc).__name__)\n"
        )
        files = [str(directory / "0"), str(directory / "1")]

        def read_as(uid: int, gid: int, groups: list[int]) -> list[str]:
            out = subprocess.run(
                ["/usr/bin/python3", "-c", probe, *files],
                user=uid, group=gid, extra_groups=groups, capture_output=True, text=True,
                check=True,
            )  # fmt: skip
            return out.stdout.split()

        task = 200_007  # a task's uid and gid: --task-uid-base (200000) + its org's id
        assert read_as(task, task, []) == ["PermissionError"] * 2
        # dcgm-exporter, run as a user of the directory's group
        assert read_as(task + 1, task + 1, [EXPORTER_GID]) == ["none", "7"]
    finally:
        shutil.rmtree(base)


EXPORTER_GID = 1_499_990
"""The group an operator gives dcgm-exporter (any gid outside the tasks' range)."""


def test_metrics_behind_a_token_refuse_a_scrape_without_it() -> None:
    backend = SimulatedBackend(parse_simulate_spec("2xH100"), seed="n")
    metrics = AgentMetrics("n1", backend.devices())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = metrics.serve(port, "127.0.0.1", token="scrape-me")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 5
        while True:
            try:
                anonymous = httpx.get(url, timeout=2)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert anonymous.status_code == 401
        wrong = httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=2)
        assert wrong.status_code == 401
        scraped = httpx.get(url, headers={"Authorization": "Bearer scrape-me"}, timeout=2)
        assert scraped.status_code == 200
        assert "fairgpu_gpu_memory_total_bytes" in scraped.text
    finally:
        server.shutdown()
        server.server_close()


def test_a_connection_that_sends_nothing_is_closed_by_the_metrics_server() -> None:
    """An idle connection does not hold one of the server's few places for ever."""
    metrics = AgentMetrics("n1", [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = metrics.serve(port, "127.0.0.1")
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_IDLE_S + 10) as idle:
            assert idle.recv(100) == b""  # closed by the server, having sent nothing
        assert SCRAPE_IDLE_S - 0.5 <= time.monotonic() - started < SCRAPE_IDLE_S + 5
    finally:
        server.shutdown()
        server.server_close()
