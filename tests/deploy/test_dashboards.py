"""The Grafana dashboards: structure Grafana needs, and every query valid PromQL."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.promql import (
    ALL_VALUES,
    DASHBOARDS,
    DEPLOY,
    fill_variables,
    load_dashboard,
    metric_names,
    panel_queries,
    panels,
    variable_queries,
)

EXPECTED_UIDS = {"fairgpu-cluster", "fairgpu-orgs", "fairgpu-nodes"}


def test_the_three_dashboards_exist_with_stable_unique_uids() -> None:
    uids = [load_dashboard(p)["uid"] for p in DASHBOARDS]
    assert sorted(uids) == sorted(EXPECTED_UIDS)
    for path in DASHBOARDS:
        assert path.stem == load_dashboard(path)["uid"], "file name and uid differ"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    board = load_dashboard(path)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    shown = list(panels(board))
    assert shown
    for panel in shown:
        where = f"{board['uid']}: {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
        assert panel["targets"], f"{where} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", where
            expr = target["expr"]
            for match in re.finditer(r"\b(rate|irate|increase)\([^\[]*\[([^\]]*)\]", expr):
                assert match.group(2) == "$__rate_interval", f"{where}: {match.group(0)}"
            for name in re.findall(r"\$\{?(\w+)", expr):
                assert name.startswith("__") or name in variables, f"{where}: ${name} undefined"
        grid = panel["gridPos"]
        assert grid["x"] >= 0, where
        assert grid["x"] + grid["w"] <= 24, where


def test_query_variables_use_the_datasource_variable() -> None:
    for path in DASHBOARDS:
        for var in load_dashboard(path)["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"]["uid"] == "${datasource}", var["name"]


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    rules = [
        {"record": f"check:q{i}", "expr": fill_variables(q.expr, ALL_VALUES)}
        for i, q in enumerate(panel_queries())
    ]
    rules += [
        {"record": f"check:v{i}", "expr": fill_variables(expr, ALL_VALUES)}
        for i, (_, _, expr) in enumerate(variable_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_provisioning_points_at_the_dashboards_and_the_datasource() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"]
    assert source["url"].startswith("http")
    providers = yaml.safe_load((provisioning / "dashboards" / "fairgpu.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_metric_names_are_read_from_queries() -> None:
    """The reader the consistency test relies on: it must find names, and only names."""
    expr = (
        'histogram_quantile(0.95, sum by (le, org) (rate(fairgpu_a_bucket{org=~"$org"}'
        "[$__rate_interval]))) / on (org) group_left (gpu_type) max without (instance)"
        " (fairgpu:b:ratio) * 2 > bool 1e3 or vector(0)"
        ' unless label_replace(up, "x", "$1", "y", "(.*)")'
    )
    assert metric_names(expr) == {"fairgpu_a_bucket", "fairgpu:b:ratio", "up"}
