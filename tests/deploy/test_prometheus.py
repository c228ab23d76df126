"""Prometheus configuration and rules: promtool checks them, and runs every rule unit test."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.promql import DEPLOY, REPO, RULE_FILES, RULE_TESTS

PROMETHEUS = DEPLOY / "prometheus"
CONFIGS = sorted(PROMETHEUS.glob("prometheus*.yml"))
# The alerts issue 8 asks for: every one must exist, be unit-tested and have a runbook section.
REQUIRED_ALERTS = {
    "FairgpuNodeDown",
    "FairgpuGpuLost",
    "FairgpuGpuXidStorm",
    "FairgpuGpuEccUncorrectable",
    "FairgpuOrgBelowGuarantee",
    "FairgpuQueueWaitHigh",
    "FairgpuSchedulerCycleFailing",
    "FairgpuSchedulerCycleSlow",
    "FairgpuNoSchedulerLeader",
}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool missing: apt-get install prometheus"
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alerts() -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["alert"] not in found, f"alert {rule['alert']} defined twice"
                    found[rule["alert"]] = rule
    return found


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_promtool_check_config(config: Path, tmp_path: Path) -> None:
    """promtool checks that every file a config names exists: the metrics token's is the
    deployment's own, so this copy names one made here (and the rules where they lie)."""
    loaded = yaml.safe_load(config.read_text())
    loaded["rule_files"] = [str(PROMETHEUS / path) for path in loaded["rule_files"]]
    for job in loaded["scrape_configs"]:
        if "credentials_file" in job.get("authorization", {}):
            token = tmp_path / f"{job['job_name']}-token"
            token.write_text("a-metrics-token\n")
            job["authorization"]["credentials_file"] = str(token)
    checked = tmp_path / config.name
    checked.write_text(yaml.safe_dump(loaded))
    result = promtool("check", "config", checked.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *(str(p) for p in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(test_file: Path) -> None:
    result = promtool("test", "rules", str(test_file.relative_to(PROMETHEUS)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_broken_rule_test_fails() -> None:
    """The rule tests can fail: the same inputs with a wrong expectation are reported."""
    for test_file in RULE_TESTS:
        text = test_file.read_text()
        if "exp_alerts: []" in text:
            broken = PROMETHEUS / "tests" / f".broken-{test_file.name}"
            try:
                broken.write_text(text.replace("exp_alerts: []", "exp_alerts: [{}]", 1))
                result = promtool("test", "rules", str(broken.relative_to(PROMETHEUS)))
            finally:
                broken.unlink(missing_ok=True)
            assert result.returncode != 0
            return
    pytest.fail("no rule test expects silence")


def test_required_alerts_exist_tested_and_documented() -> None:
    defined = alerts()
    assert defined.keys() >= REQUIRED_ALERTS, REQUIRED_ALERTS - defined.keys()
    tested = set()
    for test_file in RULE_TESTS:
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    tested.add(check["alertname"])
    assert defined.keys() <= tested, (
        f"alerts never seen firing in a test: {defined.keys() - tested}"
    )
    operations = (REPO / "docs" / "OPERATIONS.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in operations.splitlines()
        if line.startswith("#")
    }
    for name, rule in defined.items():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"], name
        assert annotations["description"], name
        anchor = str(annotations["runbook_url"]).partition("#")[2]
        assert anchor == name.lower(), name
        assert anchor in headings, f"{name}: docs/OPERATIONS.md has no section {anchor!r}"
        labels = rule["labels"]
        assert isinstance(labels, dict)
        assert labels["severity"] in {"critical", "warning"}, name


def test_scrape_jobs_cover_server_and_agents() -> None:
    for config in CONFIGS:
        jobs = {j["job_name"] for j in yaml.safe_load(config.read_text())["scrape_configs"]}
        assert {"fairgpu-server", "fairgpu-agent"} <= jobs, config.name
    main = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    server = next(j for j in main["scrape_configs"] if j["job_name"] == "fairgpu-server")
    assert server["authorization"]["credentials_file"]  # /metrics is closed without its token
    agent = next(j for j in main["scrape_configs"] if j["job_name"] == "fairgpu-agent")
    assert agent["file_sd_configs"]
    for entry in yaml.safe_load((PROMETHEUS / "file_sd" / "agents.yml").read_text()):
        assert entry["targets"]
        assert all(":" in t for t in entry["targets"])
    dns = yaml.safe_load((PROMETHEUS / "prometheus.dns-sd.yml").read_text())
    assert all("dns_sd_configs" in j for j in dns["scrape_configs"])
