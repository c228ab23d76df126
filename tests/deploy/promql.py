"""Just enough PromQL reading to list the metric names that dashboards and rules select.

Not a parser: it removes strings, label matchers, ranges and grouping clauses, then keeps the
identifiers that are neither functions, keywords nor numbers. Every expression is also parsed by
promtool (tests/deploy/test_dashboards.py), so a query this reads wrongly still fails there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yml"))

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip
# Series that Prometheus itself makes, not fairgpu.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")

# What Grafana puts in for its own variables when the tests send a query to Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "20s", "$__interval": "5s", "$__range": "5m"}
# Values for the dashboards' own variables: every org, node, GPU type and model.
ALL_VALUES = {"org": ".*", "gpu_type": ".*", "node": ".*", "model": ".*", "idle_threshold": "0.05"}


def metric_names(expr: str) -> set[str]:
    """Metric names the expression selects (`label_values(m, l)` counts `m`)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS or name.startswith("$"):
            continue
        if match.start() > 0 and text[match.start() - 1] == "$":
            continue  # a template variable such as $org
        names.add(name)
    return names


def label_values_query(query: str) -> str:
    """`label_values(metric{...}, label)` -> `metric{...}`; a plain expression stays as it is."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", query, re.DOTALL)
    return match.group(1) if match else query


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool = False


def load_dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows are containers, their nested panels count)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries() -> list[PanelQuery]:
    queries = []
    for path in DASHBOARDS:
        board = load_dashboard(path)
        for panel in panels(board):
            for target in panel.get("targets", []):
                queries.append(
                    PanelQuery(
                        board["uid"],
                        panel["title"],
                        target["refId"],
                        target["expr"],
                        bool(target.get("instant")),
                    )  # fmt: skip
                )
    return queries


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, variable name, PromQL) for every query variable."""
    found = []
    for path in DASHBOARDS:
        board = load_dashboard(path)
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                found.append((board["uid"], var["name"], label_values_query(query)))
    return found


def rule_expressions() -> list[tuple[str, str, str]]:
    """(file, rule name, expression) for every recording and alerting rule."""
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((path.name, rule.get("record") or rule["alert"], rule["expr"]))
    return found


def recorded_names() -> set[str]:
    """Series the recording rules make (dashboards and alerts may use them like any metric)."""
    names: set[str] = set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return names


def fill_variables(
    expr: str, values: dict[str, str], grafana: dict[str, str] = GRAFANA_VARIABLES
) -> str:
    """Replace Grafana's and the dashboard's variables the way Grafana would before querying."""
    for name, value in grafana.items():
        expr = expr.replace(name, value)
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr
