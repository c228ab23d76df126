"""The per-org interactive maximum time (#17 item 4), through the real app on SQLite and
PostgreSQL (with the direct routes on and off): inherited down the org tree, refused at submit
and at a raised `update --time`, and an interactive job counted in quotas as any job."""

from __future__ import annotations

from typing import Any

import pytest

from tests.scheduling.harness import Cluster, fast_settings, running_cluster

HOT = [pytest.param(False, id="routed"), pytest.param(True, id="hot")]
HOUR = 3600


async def _post(cluster: Cluster, token: str, **spec: Any) -> Any:
    body = {"command": ["bash"], "interactive": True, **spec}
    return await cluster.http.post(
        "/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"}
    )


async def _max_of(cluster: Cluster, org: str) -> int:
    shown = await cluster.call("GET", f"/v1/orgs/{org}", cluster.admin)
    return int(shown["interactive_max_time_s"])


@pytest.mark.parametrize("hot", HOT)
async def test_the_maximum_is_inherited_and_refuses_longer_sessions(
    database_url: str, hot: bool
) -> None:
    if hot and "postgresql" not in database_url:
        pytest.skip("the direct routes (api/direct.py) exist only on PostgreSQL")
    settings = fast_settings(database_url, hot_paths=hot, interactive_max_time_s=8 * HOUR)
    async with running_cluster(settings) as cluster:
        parent = await cluster.org()
        child = await cluster.org(parent=parent)
        user = await cluster.user_token(child)
        await cluster.submit(user)  # the token is known now: plain submissions may go hot
        assert await _max_of(cluster, child) == 8 * HOUR  # the server's default

        await cluster.call(
            "PATCH", f"/v1/orgs/{parent}", cluster.admin, {"interactive_max_time": "2h"}
        )
        assert (await _max_of(cluster, parent), await _max_of(cluster, child)) == (
            2 * HOUR,
            2 * HOUR,
        )
        refused = await _post(cluster, user, time_limit=3 * HOUR)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["interactive_max_time_s"] == 2 * HOUR
        assert "interactive job may run at most 7200 s" in refused.json()["detail"]
        assert (await _post(cluster, user, time_limit=2 * HOUR)).status_code == 201
        # A batch job is not bound by it.
        assert (await cluster.submit(user, time_limit=3 * HOUR))["time_limit_s"] == 3 * HOUR

        # The child's own setting wins over its parent's; null returns to the parent's.
        await cluster.call(
            "PATCH", f"/v1/orgs/{child}", cluster.admin, {"interactive_max_time": 4 * HOUR}
        )
        assert (await _post(cluster, user, time_limit=3 * HOUR)).status_code == 201
        await cluster.call(
            "PATCH", f"/v1/orgs/{child}", cluster.admin, {"interactive_max_time": None}
        )
        assert await _max_of(cluster, child) == 2 * HOUR
        assert (await _post(cluster, user, time_limit=3 * HOUR)).status_code == 422
        # An array of interactive jobs is held to it as well.
        array = await _post(cluster, user, time_limit=3 * HOUR, array="0-1")
        assert array.status_code == 422, array.text


async def test_only_platform_admins_set_it_and_a_raised_limit_is_checked(
    database_url: str,
) -> None:
    async with running_cluster(fast_settings(database_url)) as cluster:
        org = await cluster.org()
        member = await cluster.user_token(org)
        admin_user = await cluster.call(
            "POST", "/v1/users", cluster.admin, {"name": "boss", "org": org, "role": "org-admin"}
        )
        org_admin = (
            await cluster.call(
                "POST", "/v1/tokens", cluster.admin, {"name": "t", "user_id": admin_user["id"]}
            )
        )["token"]
        for token in (member, org_admin):
            denied = await cluster.http.patch(
                f"/v1/orgs/{org}",
                json={"interactive_max_time": 30 * 86_400},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert denied.status_code == 403, denied.text
        await cluster.call(
            "PATCH", f"/v1/orgs/{org}", cluster.admin, {"interactive_max_time": "1h"}
        )

        job = (await _post(cluster, member, time_limit=HOUR, hold=True)).json()
        raised = await cluster.http.patch(
            f"/v1/jobs/{job['id']}",
            json={"time_limit": 2 * HOUR},
            headers={"Authorization": f"Bearer {org_admin}"},
        )
        assert raised.status_code == 422, raised.text
        assert raised.json()["interactive_max_time_s"] == HOUR
        lowered = await cluster.call(
            "PATCH", f"/v1/jobs/{job['id']}", member, {"time_limit": HOUR // 2}
        )
        assert lowered["time_limit_s"] == HOUR // 2


async def test_an_interactive_job_counts_against_its_orgs_limit(database_url: str) -> None:
    """A terminal holds its GPUs as a batch job does: the org's limit counts them."""
    async with running_cluster(fast_settings(database_url)) as cluster:
        org = await cluster.org(guaranteed=1, limit=1)
        user = await cluster.user_token(org)
        node = await cluster.register(await cluster.join_token(), gpus=4)
        await cluster.heartbeat(node["credential"])
        shell = (await _post(cluster, user, time_limit=HOUR)).json()
        await cluster.cycle()
        assert (await cluster.job(user, shell["id"]))["state"] == "STARTING"
        batch = await cluster.submit(user)
        await cluster.cycle()
        assert (await cluster.job(user, batch["id"]))["state"] == "PENDING"
        explain = await cluster.call("GET", f"/v1/jobs/{batch['id']}/explain", user)
        assert explain["reasons"][0]["code"] == "OrgLimit", explain


async def _started(cluster: Cluster, credential: str) -> dict[int, dict[str, Any]]:
    """job id -> the spec a heartbeat reply asks the node to start."""
    await cluster.cycle()
    reply = await cluster.heartbeat(credential, samples=[], tasks=[])
    return {spec["job_id"]: spec for spec in reply.get("start", [])}


async def test_the_idle_timeout_is_inherited_and_reaches_the_terminals_agent(
    database_url: str,
) -> None:
    settings = fast_settings(database_url, interactive_idle_timeout_s=HOUR)
    async with running_cluster(settings) as cluster:
        parent = await cluster.org(guaranteed=8)
        child = await cluster.org(guaranteed=8, parent=parent)
        user = await cluster.user_token(child)
        node = await cluster.register(await cluster.join_token())

        async def idle_of(org: str) -> int:
            shown = await cluster.call("GET", f"/v1/orgs/{org}", cluster.admin)
            return int(shown["interactive_idle_timeout_s"])

        assert await idle_of(child) == HOUR  # the server's default
        await cluster.call(
            "PATCH", f"/v1/orgs/{parent}", cluster.admin, {"interactive_idle_timeout": "30m"}
        )
        assert (await idle_of(parent), await idle_of(child)) == (1800, 1800)
        shell = (await _post(cluster, user, time_limit=HOUR, gpus_per_node=1)).json()
        batch = await cluster.submit(user, gpus_per_node=1)
        started = await _started(cluster, node["credential"])
        assert started[shell["id"]]["pty"] is True
        assert started[shell["id"]]["idle_timeout_s"] == 1800
        assert "idle_timeout_s" not in started[batch["id"]]  # a batch job has none

        # The child's own 0 is "never": its terminals carry no timeout; null: the parent's.
        await cluster.call(
            "PATCH", f"/v1/orgs/{child}", cluster.admin, {"interactive_idle_timeout": 0}
        )
        assert await idle_of(child) == 0
        never = (await _post(cluster, user, time_limit=HOUR, gpus_per_node=1)).json()
        started = await _started(cluster, node["credential"])
        assert started[never["id"]]["pty"] is True
        assert "idle_timeout_s" not in started[never["id"]]
        await cluster.call(
            "PATCH", f"/v1/orgs/{child}", cluster.admin, {"interactive_idle_timeout": None}
        )
        assert await idle_of(child) == 1800

        for bad in (-5, "soon", "99999d"):
            refused = await cluster.http.patch(
                f"/v1/orgs/{child}",
                json={"interactive_idle_timeout": bad},
                headers={"Authorization": f"Bearer {cluster.admin}"},
            )
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
        # Only platform admins set it.
        denied = await cluster.http.patch(
            f"/v1/orgs/{child}",
            json={"interactive_idle_timeout": "1m"},
            headers={"Authorization": f"Bearer {user}"},
        )
        assert denied.status_code in (403, 404), denied.text
        assert await idle_of(child) == 1800
