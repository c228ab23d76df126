"""`/metrics`: Prometheus exposition of the scheduler and the cluster, closed by default.

It names every org with its jobs by state, quota, allocation and fair-share factor, which
competing tenants must not read of each other. With `FAIRGPU_METRICS_TOKEN` set, it asks every
client for that bearer token; unset, it answers only the server's own machine's services: the
connection's peer is a loopback address, no proxy forwarded the request, and the peer's socket
is the server's uid's or root's (api/peercred.py). That keeps `fairgpu demo` and a Prometheus
run by the same user working while nobody else reaches it, not even a task on this machine
(which shares its loopback when it has no network of its own, as its org's uid). User
tokens never open it: the scraper's credential is not a person's, and a platform admin's token
kept in a Prometheus config would be a far larger one at rest. A refused client without a
bearer pays into its address's bucket of failed authentications (api/authfailures.py), as a
bearer that fails does, so guessing is as slow here as on the API; the metrics token, once
it has worked, passes that bucket as a user's working token does.

The cluster's gauges are a few aggregate queries. Scrapes that arrive while a read is under
way share it: without a metrics token anyone may scrape, and each concurrent scrape held a
connection of the pool every tenant's requests share (20 at once took them all, for as long as
the client kept asking). A process now reads the cluster once at a time.
"""

from __future__ import annotations

import hmac
import math
import os

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.authfailures import AuthFailures, client_address
from api.deps import parse_bearer
from api.peercred import Endpoint, LookupUnavailable, socket_uid
from api.shared import shared_call
from scheduler.metrics import ClusterStats, read_cluster, render
from scheduler.services.errors import TooManyRequests, Unauthenticated
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.tokens import hash_token

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Scheduler instruments of this replica plus cluster gauges read now with a few queries
    (shared with the scrapes that arrive while they run)."""
    _admit(request)
    runtime: SchedulerRuntime = request.app.state.runtime
    stats = await shared_call(request.app, "metrics_read", lambda: _read(request.app))
    return Response(content=render(runtime.metrics, stats), media_type=CONTENT_TYPE_LATEST)


FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
"""What a reverse proxy adds: a request carrying one came from elsewhere through the proxy,
whatever its peer's address."""


def _admit(request: Request) -> None:
    """Return when the client may scrape; otherwise 401 (429 once its address has failed too
    often)."""
    expected = request.app.state.settings.metrics_token
    header = request.headers.get("authorization")
    if expected is not None:
        given = parse_bearer(header or "") or ""
        if hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            # Seen to work, as a user's token that authenticated is (api/authfailures.py):
            # a client flooding from Prometheus' address does not lock Prometheus out.
            request.app.state.auth_cache.vouch(hash_token(given))
            return
        detail = "/metrics needs the metrics token (FAIRGPU_METRICS_TOKEN)"
    else:
        if _on_this_machine(request):
            return
        detail = (
            "/metrics answers only this machine's services (the server's uid or root) while "
            "FAIRGPU_METRICS_TOKEN is unset: set it on the server and give Prometheus the same "
            "token"
        )
    failures: AuthFailures | None = getattr(request.app, "auth_failures", None)
    if failures is not None and header is None:
        # A bearer's 401 is charged by the app itself (api/app.py); an anonymous one here.
        address = client_address(request.scope, failures.proxies)
        wait_s = failures.buckets.take(address)
        if wait_s > 0:
            raise TooManyRequests(
                "too many refused requests from this address; retry later",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
    raise Unauthenticated(detail)


def _on_this_machine(request: Request) -> bool:
    """The peer is a loopback address, no proxy stands between (a proxy on this machine that
    adds none of FORWARDING_HEADERS hides its clients: set the token there), and the peer's
    socket belongs to the server's own uid or root (api/peercred.py): a task on this machine
    that shares its network runs as its org's uid, and is not one of the machine's services.

    A request whose server is named by a host name rather than a socket's address is no TCP
    connection's: the app called inside its own process (the tests' in-process transport), so
    the process's own. When the kernel cannot be asked, or knows no such socket, the answer is
    no."""
    if request.client is None or any(h in request.headers for h in FORWARDING_HEADERS):
        return False
    peer = Endpoint.of(request.client.host, request.client.port)
    if peer is None or not peer.address.is_loopback:
        return False
    server = request.scope.get("server")
    if not server:
        return False
    local = Endpoint.of(server[0], server[1] or 0)
    if local is None:
        return True
    try:
        uid = socket_uid(peer, local)
    except LookupUnavailable:
        return False
    return uid is not None and uid in (0, os.geteuid())


async def _read(app: FastAPI) -> ClusterStats:
    async with app.state.sessionmaker() as session:
        return await read_cluster(session, app.state.settings.policy.to_policy_config())
