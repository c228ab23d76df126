"""Authorisation matrix: every role × every endpoint × own/other org, over real HTTP.

Each row names an endpoint and a target (own org, other org); each column a caller. Mutating
calls get fresh targets, so rows do not depend on each other. All mismatches are reported at
once, so a failure shows the whole shape of what went wrong.

Every route of the app must be hit by at least one row: a new route that is not classified here
fails `test_authorisation_matrix`, so no feature can forget to decide who may call it. A route
these rows cannot drive (a WebSocket, /metrics, which needs the real scheduling runtime) is
classified in `CHECKED_ELSEWHERE` with the test that checks its callers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from sqlalchemy import update

from scheduler.db import ApiToken, Node
from scheduler.services.tokens import issue_token
from scheduler.states import NodeState, TokenKind
from tests import factories
from tests.api.helpers import World, running_app, seed_world

# `expired` and `revoked` are member_a's tokens past their expiry or revoked; `agent2` is the
# credential of a second node, `admin_b` the org admin of the other org.
CALLERS = (
    "anon", "expired", "revoked", "join", "agent", "agent2",
    "member_a", "admin_a", "admin_b", "platform",
)  # fmt: skip
# Routes open to anyone: the probes and the API's own description.
OPEN = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"})
# (method, path) -> the test that checks who may call it; WEBSOCKET is the method of a
# WebSocket route.
CHECKED_ELSEWHERE: dict[tuple[str, str], str] = {
    ("GET", "/metrics"): "tests/security/test_tenant_views.py::"
    "test_metrics_ask_for_their_token_when_one_is_set",
    ("WEBSOCKET", "/v1/jobs/{job_id}/attach"): "tests/cli/test_interactive.py::"
    "test_only_the_owner_and_org_admins_attach",
    ("WEBSOCKET", "/v1/agent/streams/{stream_id}"): "tests/cli/test_interactive_streams.py::"
    "test_only_its_node_opens_a_stream_and_the_relay_carries_frames",
    ("WEBSOCKET", "/v1/relay/streams/{stream_id}"): "tests/cli/test_relay_replicas.py::"
    "test_a_stream_held_by_a_reaches_the_agent_through_b",
    ("WEBSOCKET", "/v1/jobs/{job_id}/forward"): "tests/cli/test_port_forward.py::"
    "test_another_orgs_port_on_the_same_node_is_refused",
}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    # Builds the path (and body) from the world; may create fresh rows.
    target: Callable[[World], Awaitable[tuple[str, Any]]]
    expect: dict[str, int]  # caller -> status; callers not listed expect `default`
    default: int = 0


def fixed(path: str, body: Any = None) -> Callable[[World], Awaitable[tuple[str, Any]]]:
    async def build(w: World) -> tuple[str, Any]:
        return path.format(a=w.org_a.id, b=w.org_b.id, node=w.node.id if w.node else 0), body

    return build


def on_job(owner: str, suffix: str = "", body: Any = None) -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        job = await w.job(owner)
        return f"/v1/jobs/{job.id}{suffix}", body

    return build


def on_user(key: str, suffix: str = "") -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        return f"/v1/users/{w.users[key].id}{suffix}", None

    return build


def token_for(key: str) -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        return "/v1/tokens", {"user_id": w.users[key].id, "name": "t"}

    return build


def revoke_token_of(key: str) -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        async with w.client("platform") as c:
            r = await c.post("/v1/tokens", json={"user_id": w.users[key].id})
            assert r.status_code == 201, r.text
        return f"/v1/tokens/{r.json()['id']}", None

    return build


def new_join_token() -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        async with w.client("platform") as c:
            r = await c.post("/v1/join-tokens", json={"uses": 1})
            assert r.status_code == 201, r.text
        return f"/v1/join-tokens/{r.json()['id']}", None

    return build


_seq = iter(range(10_000))


def new_org(parent: str | None = None) -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        return "/v1/orgs", {"name": f"new-{next(_seq)}", "parent": parent}

    return build


def empty_org() -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        name = f"gone-{next(_seq)}"
        async with w.client("platform") as c:
            assert (await c.post("/v1/orgs", json={"name": name})).status_code == 201
        return f"/v1/orgs/{name}", None

    return build


def new_user(org: str | None, role: str = "member") -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        body: dict[str, Any] = {"name": f"u-{next(_seq)}", "role": role}
        if org is not None:
            body["org"] = org
        return "/v1/users", body

    return build


def on_array_task(owner: str, suffix: str = "", body: Any = None) -> Callable[..., Any]:
    """Element 1 of a fresh array of `owner`'s (`42_1`), submitted through the API."""

    async def build(w: World) -> tuple[str, Any]:
        async with w.client(owner) as c:
            r = await c.post("/v1/jobs", json={**JOB, "array": "0-2"})
            assert r.status_code == 201, r.text
        return f"/v1/jobs/{r.json()['id']}_1{suffix}", body

    return build


def new_node(suffix: str, state: NodeState = NodeState.READY) -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        async with w.app.state.sessionmaker() as session:
            node, _ = await factories.node(session, gpus=1)
            node.state = state
            await session.commit()
        return f"/v1/nodes/{node.id}{suffix}", None

    return build


def task_on_the_agents_node(suffix: str) -> Callable[..., Any]:
    """A running task of member_a's on the node of the `agent` credential."""

    async def build(w: World) -> tuple[str, Any]:
        job = await w.job("member_a")
        assert w.node is not None
        async with w.app.state.sessionmaker() as session:
            node = await session.get(Node, w.node.id)
            assert node is not None
            task = await factories.running_task(session, job, node, [])
            await session.commit()
        return f"/v1/agent/tasks/{task.id}{suffix}", None

    return build


def registration() -> Callable[..., Any]:
    async def build(w: World) -> tuple[str, Any]:
        name = f"fresh-{next(_seq)}"
        gpu = {"index": 0, "uuid": f"GPU-{name}", "model": "H100", "memory_bytes": 1}
        body = {
            "name": name, "site": "dc1", "domain": "r1", "hostname": name, "address": "a",
            "agent_version": "t", "gpus": [gpu],
        }  # fmt: skip
        return "/v1/agent/register", body

    return build


JOB = {"command": ["python", "train.py"], "gpus_per_node": 1, "time_limit": 60}
UNAUTHENTICATED = {"anon": 401, "expired": 401, "revoked": 401}
USERS_ONLY = {**UNAUTHENTICATED, "join": 403, "agent": 403, "agent2": 403}
ALL_USERS_OK = {**USERS_ONLY, "member_a": 200, "admin_a": 200, "admin_b": 200, "platform": 200}
A_ONLY = {**ALL_USERS_OK, "admin_b": 404}  # org A's objects: org B's admin sees nothing
B_ONLY = {**USERS_ONLY, "admin_b": 200, "platform": 200}  # org B's; the default (A's view) 404
ADMIN = {**USERS_ONLY, "member_a": 403, "admin_a": 403, "admin_b": 403}
AGENTS_ONLY = {**UNAUTHENTICATED, "join": 403, "member_a": 403, "admin_a": 403, "admin_b": 403}

CASES = [
    # Jobs of the caller's own org (owned by member_a) and of another org (owned by member_b).
    # The platform admin here has no org, so it cannot own jobs: 422.
    Case("submit", "POST", fixed("/v1/jobs", JOB), {**USERS_ONLY, "platform": 422}, 201),
    Case("list jobs", "GET", fixed("/v1/jobs"), ALL_USERS_OK),
    Case(
        "list jobs org=other",
        "GET",
        fixed("/v1/jobs?org=org-b"),
        {**ALL_USERS_OK, "member_a": 404, "admin_a": 404},
    ),
    Case("get own job", "GET", on_job("member_a"), A_ONLY),
    Case("get other org's job", "GET", on_job("member_b"), B_ONLY, 404),
    Case("explain own", "GET", on_job("member_a", "/explain"), A_ONLY),
    Case("explain other", "GET", on_job("member_b", "/explain"), B_ONLY, 404),
    Case("logs own", "GET", on_job("member_a", "/logs"), A_ONLY),
    Case("logs other", "GET", on_job("member_b", "/logs"), B_ONLY, 404),
    Case("events own", "GET", on_job("member_a", "/events"), A_ONLY),
    Case("events other", "GET", on_job("member_b", "/events"), B_ONLY, 404),
    Case("cancel own", "POST", on_job("member_a", "/cancel"), A_ONLY),
    Case(
        "cancel colleague's",
        "POST",
        on_job("member_a2", "/cancel"),
        {**A_ONLY, "member_a": 403},
    ),
    Case("cancel other org's", "POST", on_job("member_b", "/cancel"), B_ONLY, 404),
    Case("hold own", "POST", on_job("member_a", "/hold"), A_ONLY),
    Case("hold other", "POST", on_job("member_b", "/hold"), B_ONLY, 404),
    Case("release own", "POST", on_job("member_a", "/release"), A_ONLY),
    Case("release other", "POST", on_job("member_b", "/release"), B_ONLY, 404),
    # PATCH: a member changes only its own jobs (Slurm's scontrol update: owner or admin).
    Case("update own", "PATCH", on_job("member_a", body={"time_limit": 30}), A_ONLY),
    Case(
        "update colleague's",
        "PATCH",
        on_job("member_a2", body={"name": "mine-now"}),
        {**A_ONLY, "member_a": 403},
    ),
    Case("update other org's", "PATCH", on_job("member_b", body={"hold": True}), B_ONLY, 404),
    # Array elements by `42_7`: another org's are 404 on every route, as its jobs are.
    Case("get own array task", "GET", on_array_task("member_a"), A_ONLY),
    Case("get other org's array task", "GET", on_array_task("member_b"), B_ONLY, 404),
    Case(
        "update other org's array task",
        "PATCH",
        on_array_task("member_b", body={"time_limit": 30}),
        B_ONLY,
        404,
    ),
    Case("hold other org's array task", "POST", on_array_task("member_b", "/hold"), B_ONLY, 404),
    Case(
        "cancel other org's array task",
        "POST",
        on_array_task("member_b", "/cancel"),
        B_ONLY,
        404,
    ),
    Case("logs of other org's array task", "GET", on_array_task("member_b", "/logs"), B_ONLY, 404),
    # Orgs, quotas, shares.
    Case("list orgs", "GET", fixed("/v1/orgs"), ALL_USERS_OK),
    Case("get own org", "GET", fixed("/v1/orgs/{a}"), A_ONLY),
    Case("get other org", "GET", fixed("/v1/orgs/{b}"), B_ONLY, 404),
    Case("create org", "POST", new_org(), {**ADMIN, "platform": 201}),
    Case("create sub-org", "POST", new_org("org-a"), {**ADMIN, "platform": 201}),
    Case(
        "update own org", "PATCH", fixed("/v1/orgs/{a}", {"shares": 2}), {**ADMIN, "platform": 200}
    ),
    Case("delete org", "DELETE", empty_org(), {**ADMIN, "platform": 204}),
    Case("get own quota", "GET", fixed("/v1/orgs/{a}/quota"), A_ONLY),
    Case("get other quota", "GET", fixed("/v1/orgs/{b}/quota"), B_ONLY, 404),
    Case(
        "set own quota",
        "PUT",
        fixed("/v1/orgs/{a}/quota/H100", {"guaranteed": 1}),
        {**ADMIN, "platform": 200},
    ),
    Case(
        "set other quota",
        "PUT",
        fixed("/v1/orgs/{b}/quota/H100", {"guaranteed": 1}),
        {**ADMIN, "platform": 200},
    ),
    Case("shares", "GET", fixed("/v1/shares"), ALL_USERS_OK),
    Case("usage", "GET", fixed("/v1/usage"), ALL_USERS_OK),
    Case("usage csv", "GET", fixed("/v1/usage?format=csv&by=user"), ALL_USERS_OK),
    Case("usage of other org", "GET", fixed("/v1/usage?org=org-b"), B_ONLY, 404),
    # Users.
    Case("me", "GET", fixed("/v1/users/me"), ALL_USERS_OK),
    Case(
        "list users",
        "GET",
        fixed("/v1/users"),
        {**ADMIN, "admin_a": 200, "admin_b": 200, "platform": 200},
    ),
    Case(
        "create user in own org",
        "POST",
        new_user("org-a"),
        {**ADMIN, "admin_a": 201, "platform": 201},
    ),
    Case(
        "create user in other org",
        "POST",
        new_user("org-b"),
        {**ADMIN, "admin_b": 201, "platform": 201},
    ),
    Case(
        "create platform admin",
        "POST",
        new_user(None, "platform-admin"),
        {**ADMIN, "platform": 201},
    ),
    Case(
        "get colleague",
        "GET",
        on_user("member_a2"),
        {**USERS_ONLY, "member_a": 404, "admin_a": 200, "admin_b": 404, "platform": 200},
    ),
    Case("get other org's user", "GET", on_user("member_b"), B_ONLY, 404),
    # Tokens.
    Case("list tokens", "GET", fixed("/v1/tokens"), ALL_USERS_OK),
    Case("token for self", "POST", fixed("/v1/tokens", {"name": "mine"}), {**USERS_ONLY}, 201),
    Case(
        "token for colleague",
        "POST",
        token_for("member_a2"),
        {**USERS_ONLY, "member_a": 404, "admin_a": 201, "admin_b": 404, "platform": 201},
    ),
    Case(
        "token for other org's user",
        "POST",
        token_for("member_b"),
        {**USERS_ONLY, "admin_b": 201, "platform": 201},
        404,
    ),
    Case(
        "revoke colleague's token",
        "DELETE",
        revoke_token_of("member_a2"),
        {**USERS_ONLY, "member_a": 404, "admin_a": 200, "admin_b": 404, "platform": 200},
    ),
    Case("revoke other org's token", "DELETE", revoke_token_of("member_b"), B_ONLY, 404),
    Case(
        "create join token",
        "POST",
        fixed("/v1/join-tokens", {"uses": 1}),
        {**ADMIN, "platform": 201},
    ),
    Case("list join tokens", "GET", fixed("/v1/join-tokens"), {**ADMIN, "platform": 200}),
    Case("revoke join token", "DELETE", new_join_token(), {**ADMIN, "platform": 200}),
    # Nodes: everyone sees them (members see other orgs' jobs on them only as counts,
    # tests/security/test_tenant_views.py); only platform admins change them.
    Case("list nodes", "GET", fixed("/v1/nodes"), ALL_USERS_OK),
    Case("get node", "GET", fixed("/v1/nodes/{node}"), ALL_USERS_OK),
    Case("drain node", "POST", fixed("/v1/nodes/{node}/drain"), {**ADMIN, "platform": 200}),
    Case("resume node", "POST", fixed("/v1/nodes/{node}/resume"), {**ADMIN, "platform": 200}),
    Case("approve node", "POST", new_node("/approve"), {**ADMIN, "platform": 200}),
    Case("revoke node", "POST", new_node("/revoke"), {**ADMIN, "platform": 200}),
    Case("delete node", "DELETE", new_node("", NodeState.DOWN), {**ADMIN, "platform": 204}),
    # The agent protocol: a join token registers a new node (a node credential only its own
    # node, under its own name; a user token is no join token: 401); a credential heartbeats
    # for its own node (what it may say there: tests/security/test_node_scope.py).
    Case(
        "register",
        "POST",
        registration(),
        {**UNAUTHENTICATED, "join": 200, "agent": 403, "agent2": 403},
        401,
    ),
    Case(
        "heartbeat",
        "POST",
        fixed("/v1/agent/heartbeat", {"wait_s": 0}),
        {**AGENTS_ONLY, "agent": 200, "agent2": 200, "platform": 403},
    ),
    # A task's job's GPU use elsewhere: only for the node running the task (another node's
    # credential does not see it exist).
    Case(
        "job gpu use",
        "GET",
        task_on_the_agents_node("/job-gpu-use"),
        {**AGENTS_ONLY, "agent": 200, "agent2": 404, "platform": 403},
    ),
    # Open to all.
    Case("healthz", "GET", fixed("/healthz"), {}, 200),
    Case("readyz", "GET", fixed("/readyz"), {}, 200),
    Case("openapi", "GET", fixed("/openapi.json"), {}, 200),
    Case("docs", "GET", fixed("/docs"), {}, 200),
    Case("redoc", "GET", fixed("/redoc"), {}, 200),
    Case("docs oauth2 redirect", "GET", fixed("/docs/oauth2-redirect"), {}, 200),
    # Last: these disable users the rows above act as.
    Case(
        "disable colleague",
        "DELETE",
        on_user("member_a2"),
        {**ADMIN, "admin_a": 200, "admin_b": 404, "platform": 200},
    ),
    Case(
        "disable other org's user",
        "DELETE",
        on_user("member_b"),
        {**ADMIN, "admin_a": 404, "admin_b": 200, "platform": 200},
    ),
]


def app_routes(app: FastAPI) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route, in the order the router tries them."""

    def flat(routes: Iterable[Any]) -> Iterator[Any]:
        for route in routes:
            contexts = getattr(route, "effective_route_contexts", None)
            yield from contexts() if contexts is not None else [route]

    for route in flat(app.routes):
        # A WebSocket route's context has no path of its own: its Starlette route has.
        path = route.path or getattr(route, "starlette_route", route.original_route).path
        for method in sorted(getattr(route, "methods", None) or {"WEBSOCKET"}):
            if method != "HEAD":
                yield method, path


def route_of(app: FastAPI, method: str, path: str) -> tuple[str, str] | None:
    """The route a request reaches (the first that matches, as the router picks)."""
    bare = path.partition("?")[0]
    for route_method, template in app_routes(app):
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if route_method == method and re.match(pattern, bare):
            return route_method, template
    return None


async def more_callers(w: World) -> None:
    """member_a's token past its expiry and a revoked one; a second node's credential."""
    user_id = w.users["member_a"].id
    long_ago = datetime.now(UTC) - timedelta(days=2)
    async with w.app.state.sessionmaker() as session:
        expired = await issue_token(
            session, kind=TokenKind.USER, user_id=user_id, ttl_s=60, now=long_ago
        )
        revoked = await issue_token(session, kind=TokenKind.USER, user_id=user_id, ttl_s=3600)
        revoked.row.revoked_at = datetime.now(UTC)
        node, _ = await factories.node(session, gpus=2)
        agent2 = await issue_token(session, kind=TokenKind.AGENT, node_id=node.id)
        await session.commit()
    w.tokens.update(expired=expired.secret, revoked=revoked.secret, agent2=agent2.secret)


async def test_authorisation_matrix(world: World) -> None:
    await more_callers(world)
    mismatches: list[str] = []
    covered: set[tuple[str, str]] = set()
    checked = 0
    for case in CASES:
        for caller in CALLERS:
            expected = case.expect.get(caller, case.default)
            path, body = await case.target(world)
            route = route_of(world.app, case.method, path)
            assert route is not None, f"{case.name}: {case.method} {path} reaches no route"
            covered.add(route)
            async with world.client(None if caller == "anon" else caller) as c:
                r = await c.request(case.method, path, json=body)
            checked += 1
            if r.status_code != expected:
                mismatches.append(
                    f"{case.name} as {caller}: {case.method} {path} -> {r.status_code}, "
                    f"expected {expected}: {r.text[:160]}"
                )
            elif r.status_code >= 400:
                assert r.headers["content-type"].startswith("application/problem+json"), path
                assert r.json()["status"] == r.status_code
    assert not mismatches, "\n".join(mismatches)
    assert checked == len(CASES) * len(CALLERS)
    unclassified = set(app_routes(world.app)) - covered - set(CHECKED_ELSEWHERE)
    assert not unclassified, (
        f"routes no row of CASES calls: {sorted(unclassified)}. Decide who may call each one "
        "and add its rows (one they cannot drive, e.g. a WebSocket: in CHECKED_ELSEWHERE with "
        "the test that checks its callers)"
    )
    assert {path for _, path in covered} >= OPEN


async def test_other_orgs_job_is_indistinguishable_from_a_missing_one(world: World) -> None:
    other = await world.job("member_b")
    async with world.client("member_a") as c:
        hidden = await c.get(f"/v1/jobs/{other.id}")
        missing = await c.get(f"/v1/jobs/{other.id + 10_000}")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["title"] == missing.json()["title"]
    assert hidden.json()["detail"].replace(str(other.id), "N") == missing.json()["detail"].replace(
        str(other.id + 10_000), "N"
    )


async def test_revoked_and_expired_tokens_are_refused(world: World) -> None:
    async with world.client("member_a") as c:
        created = (await c.post("/v1/tokens", json={"name": "short"})).json()
        r = await c.delete(f"/v1/tokens/{created['id']}")
        assert r.status_code == 200
    async with world.client(None) as c:
        c.headers["Authorization"] = f"Bearer {created['token']}"
        r = await c.get("/v1/jobs")
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        c.headers["Authorization"] = "Basic abc"
        assert (await c.get("/v1/jobs")).status_code == 401
        c.headers["Authorization"] = "Bearer " + "x" * 5000
        assert (await c.get("/v1/jobs")).status_code == 401


async def test_disabled_user_loses_access(world: World) -> None:
    async with world.client("admin_a") as c:
        assert (await c.delete(f"/v1/users/{world.users['member_a2'].id}")).status_code == 200
    async with world.client("member_a2") as c:
        assert (await c.get("/v1/jobs")).status_code == 401


async def test_listing_shows_only_own_org_jobs(world: World) -> None:
    mine = await world.job("member_a")
    theirs = await world.job("member_b")
    async with world.client("member_a") as c:
        ids = {j["id"] for j in (await c.get("/v1/jobs")).json()["data"]}
    assert mine.id in ids
    assert theirs.id not in ids
    async with world.client("platform") as c:
        ids = {j["id"] for j in (await c.get("/v1/jobs")).json()["data"]}
    assert {mine.id, theirs.id} <= ids


async def test_token_secret_shown_once(world: World) -> None:
    async with world.client("member_a") as c:
        created = (await c.post("/v1/tokens", json={"name": "ci"})).json()
        listed = (await c.get("/v1/tokens")).json()["data"]
    assert created["token"].startswith("fg_u_")
    assert all("token" not in t for t in listed)
    assert any(t["id"] == created["id"] for t in listed)
    assert created["token"] not in str(listed)


@pytest.mark.parametrize(("ttl_s", "wait_s"), [(0.2, 0.3), (0.0, 0.0)])
async def test_revocation_elsewhere_takes_effect_within_the_cache_ttl(
    database_url: str, ttl_s: float, wait_s: float
) -> None:
    """A token revoked in the database by another replica stops working within the TTL here;
    with a TTL of 0 at once."""
    async with running_app(database_url, auth_cache_ttl_s=ttl_s) as app:
        world = await seed_world(app)
        async with world.client("member_a") as c:
            assert (await c.get("/v1/jobs")).status_code == 200
            async with app.state.sessionmaker() as s:
                await s.execute(update(ApiToken).values(revoked_at=datetime.now(UTC)))
                await s.commit()
            await asyncio.sleep(wait_s)
            assert (await c.get("/v1/jobs")).status_code == 401


def test_the_route_walk_sees_websocket_routes() -> None:
    """A WebSocket route added to the app must show up as unclassified, like an HTTP one."""
    router = APIRouter(prefix="/v1/jobs")

    @router.websocket("/{job_id}/attach")
    async def attach(websocket: WebSocket, job_id: int) -> None: ...

    app = FastAPI()
    app.include_router(router)
    assert ("WEBSOCKET", "/v1/jobs/{job_id}/attach") in set(app_routes(app))
