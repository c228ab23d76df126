"""Made-up tokens (api/authfailures.py): each 401 to a request with a bearer takes one from its
client address's bucket; past it, that address's requests with a token are 429 with Retry-After
before any lookup, on HTTP and WebSocket alike, while other addresses go on. X-Forwarded-For
counts only from a trusted proxy. Real server (uvicorn on loopback), SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from api.admission import TokenBuckets
from api.app import create_app
from api.authfailures import AuthFailures, client_address, parse_proxies
from scheduler.settings import Settings
from tests.harness.served import seed_admin, serve_app


def _scope(peer: str, *forwarded: str) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return {"type": "http", "client": (peer, 40000), "headers": headers}


def test_the_client_is_the_peer_unless_the_peer_is_a_trusted_proxy() -> None:
    proxies = parse_proxies("10.0.0.0/8, 192.0.2.7")
    # An untrusted peer's header is its own invention.
    assert client_address(_scope("198.51.100.9", "203.0.113.1"), ()) == "198.51.100.9"
    assert client_address(_scope("198.51.100.9", "203.0.113.1"), proxies) == "198.51.100.9"
    # Through trusted proxies: the rightmost address that is not one of them; what the client
    # put to the left of it (a spoofed start of the chain) does not count.
    assert client_address(_scope("10.1.2.3", "203.0.113.1"), proxies) == "203.0.113.1"
    chain = _scope("10.1.2.3", "1.1.1.1, 203.0.113.1, 192.0.2.7")
    assert client_address(chain, proxies) == "203.0.113.1"
    split = _scope("10.1.2.3", "1.1.1.1", "203.0.113.1")  # the header sent twice
    assert client_address(split, proxies) == "203.0.113.1"
    # Garbage or nothing: the last trusted hop is all that is known.
    assert client_address(_scope("10.1.2.3", "not-an-address"), proxies) == "10.1.2.3"
    assert client_address(_scope("10.1.2.3"), proxies) == "10.1.2.3"
    assert client_address({"type": "http", "headers": []}, proxies) == "unknown"


def test_ipv6_clients_count_per_64_block() -> None:
    one = client_address(_scope("2001:db8:1:2::1"), ())
    assert one == client_address(_scope("2001:db8:1:2:ffff::9"), ()) == "2001:db8:1:2::/64"
    assert client_address(_scope("2001:db8:1:3::1"), ()) != one
    assert client_address(_scope("::ffff:198.51.100.9"), ()) == "198.51.100.9"


def test_a_bad_trusted_proxy_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="does not appear to be an IPv4 or IPv6"):
        Settings(trusted_proxies="10.0.0.0/8, proxy.example")


def test_looking_at_a_bucket_takes_nothing_and_remembers_no_new_key() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=2)
    assert buckets.wait_s("a", now=0.0) == 0.0
    assert len(buckets) == 0
    buckets.take("a", now=0.0)
    buckets.take("a", now=0.0)
    assert buckets.wait_s("a", now=0.0) == pytest.approx(1.0)
    assert buckets.wait_s("a", now=0.5) == pytest.approx(0.5)
    assert buckets.wait_s("a", now=1.0) == 0.0


def test_sprayed_addresses_take_bounded_memory_and_keep_the_drained_ones() -> None:
    failures = AuthFailures(rate_per_s=0.001, burst=2, proxies=())
    failures.buckets.max_keys = 1_000
    for _ in range(2):
        failures.buckets.take("198.51.100.9", now=0.0)
    for i in range(10_000):  # one failure from each of many addresses
        failures.buckets.take(f"10.{i // 256 % 256}.{i % 256}.1", now=0.0)
        assert len(failures.buckets) <= 1_000
    assert failures.buckets.wait_s("198.51.100.9", now=0.0) > 0


@pytest.fixture
def server(database_url: str, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = Settings(
        database_url=database_url,
        migrate_on_start=False,
        auth_failure_rate_per_s=0.001,
        auth_failure_burst=3,
        **overrides,
    )
    token = seed_admin(database_url)
    with serve_app(create_app(settings)) as url:
        yield url, token


def _get(url: str, token: str, forwarded: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return httpx.get(url + "/v1/orgs", headers=headers)


def test_an_address_spraying_made_up_tokens_is_refused_before_any_lookup(
    server: tuple[str, str],
) -> None:
    url, admin = server
    for i in range(3):
        assert _get(url, f"made-up-{i}").status_code == 401
    refused = _get(url, "made-up-3")
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert int(refused.headers["retry-after"]) >= 1
    assert "failed authentications" in refused.json()["detail"]
    # The address, not the token: a live token from it waits too, and so do its streams.
    assert _get(url, admin).status_code == 429
    with pytest.raises(InvalidStatus) as ws_refused:
        connect(
            url.replace("http://", "ws://") + "/v1/jobs/1/attach",
            additional_headers={"Authorization": "Bearer made-up"},
            open_timeout=10,
        )
    assert ws_refused.value.response.status_code == 429
    # Without a trusted proxy, a forwarded address is the client's own invention.
    assert _get(url, admin, forwarded="203.0.113.1").status_code == 429
    # A request without a token costs no lookup and is answered as before.
    assert httpx.get(url + "/v1/orgs").status_code == 401


@pytest.mark.parametrize("server", [{"trusted_proxies": "127.0.0.1"}], indirect=True)
def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(
    server: tuple[str, str],
) -> None:
    url, admin = server
    for i in range(3):
        assert _get(url, f"made-up-{i}", forwarded="203.0.113.1").status_code == 401
    assert _get(url, admin, forwarded="203.0.113.1").status_code == 429
    # Another client behind the same proxy, and the proxy's own requests, go on.
    assert _get(url, admin, forwarded="203.0.113.2").status_code == 200
    assert _get(url, admin).status_code == 200
    # Live tokens pay nothing, however often.
    for _ in range(10):
        assert _get(url, admin, forwarded="203.0.113.3").status_code == 200
    # A WebSocket's failed authentication counts as well.
    for _ in range(3):
        with pytest.raises(InvalidStatus) as refused:
            connect(
                url.replace("http://", "ws://") + "/v1/jobs/1/attach",
                additional_headers={
                    "Authorization": "Bearer made-up",
                    "X-Forwarded-For": "203.0.113.4",
                },
                open_timeout=10,
            )
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body or b"{}")["status"] == 401
    assert _get(url, "made-up-4", forwarded="203.0.113.4").status_code == 429


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_seen_working_here_pass_while_their_address_is_refused(
    server: tuple[str, str],
) -> None:
    """A task spraying made-up tokens from its node must not silence the node's agent (its
    tasks would be lost, other orgs' among them), nor the users already working from that
    address; a stranger's token waits, and a vouched token that fails is forgotten."""
    url, admin = server
    assert _get(url, admin).status_code == 200
    join = httpx.post(url + "/v1/join-tokens", json={}, headers=_bearer(admin))
    node = {
        "name": "n1",
        "site": "dc1",
        "domain": "rack1",
        "hostname": "n1",
        "address": "127.0.0.1",
        "agent_version": "test",
        "gpus": [{"index": 0, "uuid": "GPU-n1-0", "model": "H100", "memory_bytes": 80 << 30}],
    }
    registered = httpx.post(
        url + "/v1/agent/register", json=node, headers=_bearer(join.json()["token"])
    )
    assert registered.status_code in (200, 201), registered.text
    credential = registered.json()["credential"]
    mine = httpx.post(url + "/v1/tokens", json={"name": "ci"}, headers=_bearer(admin)).json()
    assert _get(url, mine["token"]).status_code == 200

    for i in range(3):
        assert _get(url, f"made-up-{i}").status_code == 401
    assert _get(url, "made-up-3").status_code == 429  # a stranger's token: refused, no lookup
    for _ in range(3):  # the agent's first heartbeat uses the credential its registration gave
        beat = httpx.post(url + "/v1/agent/heartbeat", json={}, headers=_bearer(credential))
        assert beat.status_code == 200, beat.text
    assert _get(url, admin).status_code == 200

    revoked = httpx.delete(url + f"/v1/tokens/{mine['id']}", headers=_bearer(admin))
    assert revoked.status_code == 200
    assert _get(url, mine["token"]).status_code == 401  # still looked up once: it is revoked
    assert _get(url, mine["token"]).status_code == 429  # then a stranger like the others
