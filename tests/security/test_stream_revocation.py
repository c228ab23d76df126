"""An open stream does not outlive its user's right to it: the server checks the token behind a
relayed attach or port-forward again every `stream_auth_recheck_s` (0.5 s here), and closes the
user's side with 1008 and the reason, and the node's side as for any ending, once the token is
revoked or expired, the user disabled, or the user may no longer act on the job. Real server
(uvicorn on loopback), real WebSockets, the node's side driven by hand; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from api.app import create_app
from scheduler.db import User
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.settings import Settings
from scheduler.states import Role
from tests.harness.served import Served, seed_admin, serve_app
from tests.security.test_stream_admission import Pool, _pool, _ws

RECHECK_S = 0.5


@pytest.fixture
def pool(database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pool]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = Settings(
        database_url=database_url,
        migrate_on_start=False,
        cycle_interval_s=0.5,
        heartbeat_long_poll_s=1.0,
        **{"stream_auth_recheck_s": RECHECK_S, **overrides},
    )
    token = seed_admin(database_url)
    with serve_app(create_app(settings)) as url:
        yield _pool(Served(url=url, admin_token=token, config_dir=tmp_path / "config"))


def _token(pool: Pool, who: str, **body: object) -> tuple[int, str]:
    """A new token of `who`'s own: (its id, its secret)."""
    response = httpx.post(
        pool.served.url + "/v1/tokens",
        json=body,
        headers={"Authorization": f"Bearer {pool.tokens[who]}"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["token"]


@contextmanager
def _relayed(
    pool: Pool, path: str, token: str, job: str
) -> Iterator[tuple[ClientConnection, ClientConnection]]:
    """The user's side of a stream at `path` and the node's side of it, relaying."""
    with _ws(pool.served.url, path, token) as user:
        streams = pool.streams_of(job)
        assert len(streams) == 1
        node_path = f"/v1/agent/streams/{streams[0]['id']}"
        with _ws(pool.served.url, node_path, pool.node.credential) as agent:
            user.send(b"typed")
            assert agent.recv(timeout=10) == b"typed"
            yield user, agent


def _closed_for(user: ClientConnection, agent: ClientConnection, reason: str) -> float:
    """Seconds until the server closed the user's side with 1008 and `reason` (after an error
    frame saying so) and the node's side normally."""
    start = time.monotonic()
    error = json.loads(user.recv(timeout=15))
    took = time.monotonic() - start
    assert error == {"type": "error", "message": f"the stream was closed: {reason}"}
    with pytest.raises(ConnectionClosed):
        user.recv(timeout=10)
    assert user.protocol.close_rcvd is not None
    assert (user.protocol.close_rcvd.code, user.protocol.close_rcvd.reason) == (1008, reason)
    with pytest.raises(ConnectionClosed):
        agent.recv(timeout=10)
    assert agent.protocol.close_rcvd is not None
    assert agent.protocol.close_rcvd.code == 1000
    return took


def test_revoking_the_token_closes_an_open_attach(pool: Pool) -> None:
    token_id, secret = _token(pool, "ada")
    with _relayed(pool, f"/v1/jobs/{pool.jobs['ada']}/attach", secret, "ada") as (user, agent):
        # A token still good: the stream outlives several checks and still relays.
        time.sleep(4 * RECHECK_S)
        agent.send(b"printed")
        assert user.recv(timeout=10) == b"printed"
        revoked = httpx.delete(
            f"{pool.served.url}/v1/tokens/{token_id}",
            headers={"Authorization": f"Bearer {pool.tokens['ada']}"},
        )
        assert revoked.status_code == 200, revoked.text
        assert _closed_for(user, agent, "token revoked") < 5
    # Ada's other token was not revoked: her streams into the job still open.
    with _relayed(pool, f"/v1/jobs/{pool.jobs['ada']}/attach", pool.tokens["ada"], "ada"):
        pass


def test_disabling_the_user_closes_their_port_forward(pool: Pool) -> None:
    path = f"/v1/jobs/{pool.jobs['ada']}/forward?port=8888"
    with _relayed(pool, path, pool.tokens["ada"], "ada") as (user, agent):
        me = httpx.get(
            pool.served.url + "/v1/users/me",
            headers={"Authorization": f"Bearer {pool.tokens['ada']}"},
        )
        assert me.status_code == 200, me.text
        disabled = httpx.delete(
            f"{pool.served.url}/v1/users/{me.json()['id']}",
            headers={"Authorization": f"Bearer {pool.served.admin_token}"},
        )
        assert disabled.status_code == 200, disabled.text
        assert _closed_for(user, agent, "user disabled") < 5
    # Another org's stream is untouched: eve's stays open across the checks.
    eve = pool.tokens["eve"]
    with _relayed(pool, f"/v1/jobs/{pool.jobs['eve']}/attach", eve, "eve") as (user, agent):
        time.sleep(4 * RECHECK_S)
        agent.send(b"still here")
        assert user.recv(timeout=10) == b"still here"


def test_an_expiring_token_closes_its_attach(pool: Pool) -> None:
    _, secret = _token(pool, "ada", ttl=3)
    path = f"/v1/jobs/{pool.jobs['ada']}/attach?new=true"
    with _relayed(pool, path, secret, "ada") as (user, agent):
        assert _closed_for(user, agent, "token expired") < 8


# Checks a minute apart: the token's expiry, 3 s after its issue, comes first.
@pytest.mark.parametrize("pool", [{"stream_auth_recheck_s": 60}], indirect=True)
def test_a_stream_closes_at_its_tokens_expiry_before_the_next_check(pool: Pool) -> None:
    _, secret = _token(pool, "ada", ttl=3)
    with _relayed(pool, f"/v1/jobs/{pool.jobs['ada']}/attach", secret, "ada") as (user, agent):
        assert _closed_for(user, agent, "token expired") < 8


def test_losing_the_right_to_act_on_the_job_closes_the_stream(
    pool: Pool, database_url: str
) -> None:
    """An org-admin attached to a colleague's job, made a member (here in the database, as
    another replica would): no longer the job's owner nor an admin, the stream closes."""
    out = pool.served.ok(
        "user", "create", "cy", "--org", "acme", "--role", "org-admin", "--token", "-o", "json"
    )
    created = json.loads(out)
    path = f"/v1/jobs/{pool.jobs['ada']}/attach"
    with _relayed(pool, path, created["token"], "ada") as (user, agent):

        async def demote() -> None:
            engine = make_engine(database_url)
            try:
                async with make_sessionmaker(engine)() as session:
                    await session.execute(
                        update(User).where(User.name == "cy").values(role=Role.MEMBER)
                    )
                    await session.commit()
            finally:
                await engine.dispose()

        asyncio.run(demote())
        # Within the auth cache's TTL (2 s) plus a check.
        reason = f"no longer allowed to reach job {pool.jobs['ada']}"
        assert _closed_for(user, agent, reason) < 8
