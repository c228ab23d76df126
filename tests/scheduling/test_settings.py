"""Settings: every policy knob from FAIRGPU_POLICY_*, one conversion to the core's PolicyConfig,
renamed variables refused, and the configured policy reaching the API (classes, shares)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from scheduler.core.types import PolicyConfig
from scheduler.db import OrgUsage
from scheduler.policysettings import RENAMED_ENV, PolicySettings
from scheduler.settings import Settings
from tests.scheduling.harness import fast_settings, running_cluster

FAIRGPU = str(Path(sys.executable).parent / "fairgpu")


@pytest.fixture(autouse=True)
def _no_policy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        *RENAMED_ENV,
        *(f"FAIRGPU_POLICY_{f.upper()}" for f in PolicySettings.model_fields),
    ]:
        monkeypatch.delenv(name, raising=False)


def test_every_policy_knob_is_a_setting_with_the_cores_default() -> None:
    assert set(PolicySettings.model_fields) == {f.name for f in dataclasses.fields(PolicyConfig)}
    assert PolicySettings().to_policy_config() == PolicyConfig()
    assert Settings().policy.to_policy_config() == PolicyConfig()


def test_every_policy_knob_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "half_life_s": ("3600", 3600.0),
        "gpu_weights": ('{"A100": 0.5}', {"A100": 0.5}),
        "priority_classes": ('{"batch": 0, "urgent": 9}', {"batch": 0, "urgent": 9}),
        "weight_fairshare": ("1", 1.0),
        "weight_class": ("2", 2.0),
        "weight_age": ("3", 3.0),
        "weight_size": ("4", 4.0),
        "age_max_s": ("60", 60.0),
        "min_runtime_s": ("5", 5.0),
        "preemption_grace_s": ("7", 7.0),
        "max_preemption_grace_s": ("120", 120.0),
        "backfill_reservations": ("2", 2),
        "backfill_depth": ("100", 100),
        "protect_gang_gpus": ("64", 64),
        "protect_gang_after_s": ("7200", 7200.0),
        "pack_by_end": ("false", False),
        "consolidate": ("true", True),
        "consolidate_max_lost_s": ("300", 300.0),
        "consolidate_after_s": ("600", 600.0),
        "ordering": ("fifo", "fifo"),
        "backfill": ("false", False),
        "borrowing": ("false", False),
        "preemption": ("false", False),
        "explain": ("false", False),
        "fairshare_algorithm": ("fairtree", "fairtree"),
    }
    assert set(values) == set(PolicySettings.model_fields)
    for name, (raw, _) in values.items():
        monkeypatch.setenv(f"FAIRGPU_POLICY_{name.upper()}", raw)
    config = Settings(default_max_priority_class="batch").policy.to_policy_config()
    assert {name: getattr(config, name) for name in values} == {
        name: parsed for name, (_, parsed) in values.items()
    }


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_ENV.items()))
def test_a_renamed_variable_stops_the_server_and_names_the_new_one(
    old: str, new: str, tmp_path: Path
) -> None:
    r = subprocess.run(
        [FAIRGPU, "server", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"],
        env={"PATH": "/usr/bin:/bin", old: "2"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert new in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_setting_under_its_old_name_is_refused_not_ignored() -> None:
    with pytest.raises(ValidationError, match="preemption_grace_s"):
        Settings(preemption_grace_s=1.0)  # type: ignore[call-arg]


def test_the_default_maximum_class_must_be_a_configured_one() -> None:
    with pytest.raises(ValidationError, match="not a configured priority class"):
        Settings(policy=PolicySettings(priority_classes={"batch": 0}))
    ok = Settings(
        policy=PolicySettings(priority_classes={"batch": 0}), default_max_priority_class="batch"
    )
    assert ok.default_max_priority_class == "batch"


def test_a_child_process_gets_the_same_settings_secrets_included() -> None:
    settings = Settings(
        metrics_token=SecretStr("scrape-me"),
        port=9999,
        policy=PolicySettings(gpu_weights={"H100": 2.0}, ordering="fifo"),
    )
    assert "scrape-me" not in settings.model_dump_json()
    again = Settings.from_child_json(settings.to_child_json())
    assert again == settings
    assert again.metrics_token is not None
    assert again.metrics_token.get_secret_value() == "scrape-me"


async def test_the_api_checks_the_configured_priority_classes(database_url: str) -> None:
    policy = PolicySettings(priority_classes={"batch": 0, "normal": 1, "urgent": 5})
    async with running_cluster(fast_settings(database_url, policy=policy)) as cluster:
        org = await cluster.org(guaranteed=1)
        token = await cluster.user_token(org)
        assert (await cluster.submit(token, priority_class="batch"))["priority_class"] == "batch"
        r = await cluster.http.post(
            "/v1/jobs",
            json={"command": ["true"], "time_limit": 60, "priority_class": "high"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 422, r.text
        assert "batch, normal, urgent" in r.json()["detail"]
        # Above the org's maximum (the default, normal) is forbidden, not unknown.
        await cluster.call(
            "POST", "/v1/jobs", token,
            {"command": ["true"], "time_limit": 60, "priority_class": "urgent"}, expect=403,
        )  # fmt: skip
        await cluster.call(
            "PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_priority_class": "high"}, expect=422
        )
        await cluster.call(
            "PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_priority_class": "urgent"}, expect=200
        )
        assert (await cluster.submit(token, priority_class="urgent"))["priority_class"] == "urgent"


async def _shares_with_usage(database_url: str, algorithm: str) -> dict[str, dict[str, object]]:
    policy = PolicySettings(fairshare_algorithm=algorithm)  # type: ignore[arg-type]
    settings = fast_settings(database_url, policy=policy, run_scheduler=False)
    async with running_cluster(settings) as cluster:
        busy, idle = await cluster.org(guaranteed=1), await cluster.org(guaranteed=1)
        await cluster.register(await cluster.join_token(), gpus=4)
        orgs = {
            o["name"]: o["id"]
            for o in (await cluster.call("GET", "/v1/orgs", cluster.admin))["data"]
        }
        async with cluster.sessionmaker() as session:
            session.add(
                OrgUsage(org_id=orgs[busy], decayed_gpu_seconds=4 * 3600.0, as_of=datetime.now(UTC))
            )
            await session.commit()
        rows = (await cluster.call("GET", "/v1/shares", cluster.admin))["data"]
        by_name = {r["org"]: r for r in rows}
        return {"busy": by_name[busy], "idle": by_name[idle]}


async def test_shares_use_the_configured_fair_share_algorithm(database_url: str) -> None:
    classic = await _shares_with_usage(database_url, "classic")
    assert classic["busy"]["recover_s"] is not None
    fairtree = await _shares_with_usage(database_url, "fairtree")
    assert fairtree["busy"]["recover_s"] is None
    assert fairtree["idle"]["recover_s"] is None
    # Fair Tree's factor is a rank among the orgs: the idle one above the busy one.
    assert fairtree["idle"]["fairshare_factor"] > fairtree["busy"]["fairshare_factor"]
    assert fairtree["busy"]["fairshare_factor"] != classic["busy"]["fairshare_factor"]
