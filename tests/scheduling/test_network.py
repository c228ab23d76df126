"""`--network private|host` through the real app over HTTP on both databases: what is stored,
what is refused, where the job is placed and what its task is told.

A job that asks for `private` runs only on nodes whose agent says "netns" (it can make a
network namespace per task) and waits with the reason elsewhere; a one-node job that leaves
its network unsaid runs in one where the node can and in the node's network elsewhere; a gang,
an image or `host` gets the node's network.
"""

from __future__ import annotations

from typing import Any

from protocol.agent import AGENT_CAPABILITIES
from tests.scheduling.harness import Cluster, fast_settings, running_cluster

EVERY = list(AGENT_CAPABILITIES)
NETNS = [*EVERY, "netns"]


async def _node(cluster: Cluster, gpus: int, capabilities: list[str] | None) -> dict[str, Any]:
    node = await cluster.register(await cluster.join_token(), gpus=gpus, capabilities=capabilities)
    await cluster.heartbeat(node["credential"])
    return node


async def _started(cluster: Cluster, node: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {s["job_id"]: s for s in (await cluster.heartbeat(node["credential"]))["start"]}


async def test_the_choice_is_stored_and_a_private_gang_is_refused(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    body = {"command": ["python", "train.py"], "time_limit": 3600}
    private = await cluster.call("POST", "/v1/jobs", token, {**body, "network": "private"}, 201)
    assert (await cluster.job(token, private["id"]))["network"] == "private"
    unsaid = await cluster.call("POST", "/v1/jobs", token, body, 201)
    assert unsaid["network"] is None
    gang = {**body, "network": "private", "nodes": 2}
    problem = await cluster.call("POST", "/v1/jobs", token, gang, 422)
    assert "network private is for one-node jobs" in str(problem), problem
    await cluster.call("POST", "/v1/jobs", token, {**body, "network": "bridge"}, 422)
    await cluster.call("POST", "/v1/jobs", token, {**gang, "network": "host"}, 201)


async def test_a_private_job_goes_only_to_a_node_that_can_wall_it(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    # The node without namespaces is the tighter fit: best fit alone would pick it.
    plain = await _node(cluster, 2, EVERY)
    walled = await _node(cluster, 8, NETNS)
    job = await cluster.submit(token, gpus_per_node=2, network="private")
    await cluster.cycle()
    assert await _started(cluster, plain) == {}
    assert (await _started(cluster, walled))[job["id"]]["network"] == "private"


async def test_with_no_node_able_the_private_job_waits_with_the_reason(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    plain = await _node(cluster, 8, EVERY)
    job = await cluster.submit(token, gpus_per_node=1, network="private")
    other = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    assert (await cluster.job(token, job["id"]))["state"] == "PENDING"
    explain = await cluster.call("GET", f"/v1/jobs/{job['id']}/explain", token)
    (reason,) = explain["reasons"]
    assert reason["code"] == "Resources"
    assert reason["details"]["capabilities"] == "netns"
    assert "agent can do netns" in reason["message"]
    # The job that left it unsaid runs there, in the node's network (the agent cannot wall).
    spec = (await _started(cluster, plain))[other["id"]]
    assert spec.get("network") is None
    # The agent restarts able to: the private job goes there.
    await cluster.heartbeat(plain["credential"], capabilities=NETNS)
    await cluster.cycle()
    assert (await _started(cluster, plain))[job["id"]]["network"] == "private"


async def test_unsaid_is_private_for_one_node_and_host_for_gangs_images_and_host(
    cluster: Cluster,
) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    nodes = [await _node(cluster, 8, [*NETNS, "container"]) for _ in range(2)]
    single = await cluster.submit(token, gpus_per_node=1)
    host = await cluster.submit(token, gpus_per_node=1, network="host")
    image = await cluster.submit(token, gpus_per_node=1, image="python:3.11")
    gang = await cluster.submit(token, gpus_per_node=4, nodes=2)
    await cluster.cycle()
    specs: dict[int, list[dict[str, Any]]] = {}
    for node in nodes:
        for job_id, spec in (await _started(cluster, node)).items():
            specs.setdefault(job_id, []).append(spec)
    assert [s["network"] for s in specs[single["id"]]] == ["private"]
    assert [s.get("network") for s in specs[host["id"]]] == [None]
    assert [s.get("network") for s in specs[image["id"]]] == [None]
    assert [s.get("network") for s in specs[gang["id"]]] == [None, None]


async def test_a_server_requiring_private_networks_makes_one_node_jobs_private(
    database_url: str,
) -> None:
    settings = fast_settings(database_url, private_network_required=True)
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=16)
        token = await cluster.user_token(org)
        plain = await _node(cluster, 8, EVERY)
        body = {"command": ["python", "train.py"], "time_limit": 3600}
        unsaid = await cluster.call("POST", "/v1/jobs", token, body, 201)
        assert unsaid["network"] == "private"
        problem = await cluster.call("POST", "/v1/jobs", token, {**body, "network": "host"}, 422)
        assert "network of its own" in str(problem), problem
        gang = await cluster.call("POST", "/v1/jobs", token, {**body, "nodes": 2}, 201)
        assert gang["network"] is None
        # A node that cannot wall it does not get it; one that can does.
        await cluster.cycle()
        assert unsaid["id"] not in await _started(cluster, plain)
        walled = await _node(cluster, 8, NETNS)
        await cluster.cycle()
        assert (await _started(cluster, walled))[unsaid["id"]]["network"] == "private"


async def test_an_org_requiring_private_networks_makes_its_one_node_jobs_private(
    cluster: Cluster,
) -> None:
    """`require_private_network` on an org: its one-node jobs and those of the orgs below it
    (made before or after) run private, `host` for one is refused naming the setting; gangs
    keep their nodes' network; other orgs are untouched. Each user submits once first, so that
    on PostgreSQL the later submissions reach the direct route (api/direct.py), which must hand
    them on rather than store them as they came."""
    parent = await cluster.org(guaranteed=16)
    child = await cluster.org(guaranteed=8, parent=parent)
    other = await cluster.org(guaranteed=8)
    updated = await cluster.call(
        "PATCH", f"/v1/orgs/{parent}", cluster.admin, {"require_private_network": True}
    )
    assert updated["require_private_network"] is True
    assert updated["private_network_required"] is True
    late = await cluster.org(guaranteed=8, parent=child)  # made after the setting
    body = {"command": ["python", "train.py"], "time_limit": 3600}
    for org in (parent, child, late):
        shown = await cluster.call("GET", f"/v1/orgs/{org}", cluster.admin)
        assert shown["private_network_required"] is True, shown
        assert shown["require_private_network"] is (org == parent), shown
        token = await cluster.user_token(org)
        await cluster.call("POST", "/v1/jobs", token, {**body, "network": "private"}, 201)
        unsaid = await cluster.call("POST", "/v1/jobs", token, body, 201)
        assert unsaid["network"] == "private", (org, unsaid)
        assert (await cluster.job(token, unsaid["id"]))["network"] == "private"
        problem = await cluster.call("POST", "/v1/jobs", token, {**body, "network": "host"}, 422)
        assert "require_private_network" in str(problem), problem
        gang = await cluster.call("POST", "/v1/jobs", token, {**body, "nodes": 2}, 201)
        assert gang["network"] is None
    token = await cluster.user_token(other)
    await cluster.call("POST", "/v1/jobs", token, body, 201)
    assert (await cluster.call("POST", "/v1/jobs", token, body, 201))["network"] is None
    await cluster.call("POST", "/v1/jobs", token, {**body, "network": "host"}, 201)
    # Unset on the parent, the orgs below are free again (none set it on itself).
    await cluster.call(
        "PATCH", f"/v1/orgs/{parent}", cluster.admin, {"require_private_network": False}
    )
    token = await cluster.user_token(late)
    await cluster.call("POST", "/v1/jobs", token, body, 201)
    assert (await cluster.call("POST", "/v1/jobs", token, body, 201))["network"] is None


async def test_an_unsaid_job_of_such_an_org_waits_for_a_node_that_can_wall_it(
    cluster: Cluster,
) -> None:
    org = await cluster.org(guaranteed=16)
    await cluster.call("PATCH", f"/v1/orgs/{org}", cluster.admin, {"require_private_network": True})
    token = await cluster.user_token(org)
    plain = await _node(cluster, 2, EVERY)  # the tighter fit: best fit alone would pick it
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    assert job["id"] not in await _started(cluster, plain)
    walled = await _node(cluster, 8, NETNS)
    await cluster.cycle()
    assert (await _started(cluster, walled))[job["id"]]["network"] == "private"


async def test_only_a_platform_admin_sets_an_orgs_private_network(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=1)
    token = await cluster.user_token(org)
    change = {"require_private_network": True}
    await cluster.call("PATCH", f"/v1/orgs/{org}", token, change, 403)
    await cluster.call(
        "PATCH", f"/v1/orgs/{org}", cluster.admin, {"require_private_network": 2}, 422
    )
    shown = await cluster.call("GET", f"/v1/orgs/{org}", cluster.admin)
    assert shown["private_network_required"] is False


async def test_a_private_container_job_goes_only_to_a_node_that_can_put_it_there(
    cluster: Cluster,
) -> None:
    """A docker node without a pod image says "netns" and "container" but not "container-netns":
    a private job with an image waits for a node that says all three, with the reason, rather
    than failing at start there; a private job without an image still runs there."""
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    walled = await _node(
        cluster, 2, [*NETNS, "container"]
    )  # the tighter fit: best fit alone would pick it
    container = await cluster.submit(token, gpus_per_node=1, network="private", image="python:3.11")
    plain = await cluster.submit(token, gpus_per_node=1, network="private")
    await cluster.cycle()
    started = await _started(cluster, walled)
    assert container["id"] not in started
    assert started[plain["id"]]["network"] == "private"
    explain = await cluster.call("GET", f"/v1/jobs/{container['id']}/explain", token)
    (reason,) = explain["reasons"]
    assert reason["code"] == "Resources"
    assert reason["details"]["capabilities"] == "container,container-netns,netns"
    assert "agent can do container,container-netns,netns" in reason["message"], reason
    able = await _node(cluster, 8, [*NETNS, "container", "container-netns"])
    await cluster.cycle()
    spec = (await _started(cluster, able))[container["id"]]
    assert (spec["network"], spec["image"]) == ("private", "python:3.11")
