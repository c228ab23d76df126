"""Every metric a dashboard or rule names is one a running server or agent really exports."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.promql import (
    PROMETHEUS_SERIES,
    metric_names,
    panel_queries,
    recorded_names,
    rule_expressions,
    variable_queries,
)
from tests.deploy.stack import Stack, running_stack, scrape

# DESIGN.md "Metrics": the series operators rely on, by the names the dashboards use.
DESIGN_SERIES = {
    "fairgpu_pending_jobs", "fairgpu_running_jobs", "fairgpu_org_guaranteed_gpus",
    "fairgpu_org_limit_gpus", "fairgpu_org_allocated_gpus", "fairgpu_org_borrowed_gpus",
    "fairgpu_org_fairshare_factor", "fairgpu_admission_wait_seconds_bucket",
    "fairgpu_preemptions_total", "fairgpu_scheduling_cycle_duration_seconds_bucket",
    "fairgpu_nodes", "fairgpu_gpus", "fairgpu_scheduler_leader",
    "fairgpu_gpu_utilization_ratio", "fairgpu_gpu_memory_used_bytes", "fairgpu_gpu_power_watts",
    "fairgpu_gpu_temperature_celsius", "fairgpu_gpu_xid_errors_total",
    "fairgpu_gpu_ecc_errors_total", "fairgpu_gpu_healthy", "fairgpu_gpu_allocation_info",
}  # fmt: skip
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "untyped": ("",),
}


def exported_names(exposition: str) -> set[str]:
    """Sample names a scrape can hold: declared families (even with no sample yet) and samples."""
    names: set[str] = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        base = family.removesuffix("_total") if kind == "counter" else family
        names.update(base + suffix for suffix in SAMPLE_SUFFIXES[kind])
    names.update(re.findall(r"^([A-Za-z_:][\w:]*)[{ ]", exposition, re.MULTILINE))
    return names


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack"), [("node-a", "dc1", "2xH100")]) as s:
        yield s


@pytest.fixture(scope="module")
def exported(stack: Stack) -> set[str]:
    return exported_names(scrape(stack.metrics_url)) | exported_names(
        scrape(stack.agents[0].metrics_url)
    )


def referenced() -> dict[str, set[str]]:
    """Metric name -> where it is used (dashboard panels, variables, rules)."""
    where: dict[str, set[str]] = {}
    for q in panel_queries():
        for name in metric_names(q.expr):
            where.setdefault(name, set()).add(f"{q.dashboard}: {q.panel}")
    for uid, var, expr in variable_queries():
        for name in metric_names(expr):
            where.setdefault(name, set()).add(f"{uid}: ${var}")
    for file, rule, expr in rule_expressions():
        for name in metric_names(expr):
            where.setdefault(name, set()).add(f"{file}: {rule}")
    return where


def test_dashboards_and_rules_name_only_exported_metrics(exported: set[str]) -> None:
    known = exported | recorded_names() | PROMETHEUS_SERIES
    used = referenced()
    assert len(used) > 20
    missing = {name: sorted(places) for name, places in used.items() if name not in known}
    assert not missing, f"named but exported by neither server nor agent: {missing}"


def test_design_series_are_exported(exported: set[str]) -> None:
    assert not DESIGN_SERIES - exported, sorted(DESIGN_SERIES - exported)


@pytest.mark.parametrize("source", ["server", "agent"])
def test_promtool_check_metrics(stack: Stack, source: str, tmp_path: Path) -> None:
    """Exposition and names follow Prometheus' conventions (base units, _total on counters)."""
    url = stack.metrics_url if source == "server" else stack.agents[0].metrics_url
    text = scrape(url)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_exported_names_reads_families_without_samples() -> None:
    text = (
        '# HELP a_total x\n# TYPE a_total counter\n# HELP h x\n# TYPE h histogram\ng{x="1"} 2.0\n'
    )
    assert exported_names(text) == {
        "a_total", "a_created", "h_bucket", "h_sum", "h_count", "h_created", "g",
    }  # fmt: skip
