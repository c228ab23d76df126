"""schemathesis against the live server's /openapi.json: every operation, generated inputs (valid
and invalid), each sent with the token of every role. No 5xx; every documented response matches
its schema and content type. The WebSocket routes, which OpenAPI does not describe, get the same
from hypothesis: hostile path and query values with every role's token, never a 5xx. `make test`
runs a few examples per operation (FAIRGPU_FUZZ_EXAMPLES changes it); `make test-faults` runs 40
(tests/faults/full_suite.py).
"""

from __future__ import annotations

import os
import urllib.parse
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from scheduler.bench.procs import Fleet
from tests.security.conftest import FUZZ_ENV, Live, seed

EXAMPLES = int(os.environ.get("FAIRGPU_FUZZ_EXAMPLES", "4"))
ROLES = ("platform", "admin_a", "member_a", "member_b", "agent", "join", None)
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
SEEN: Counter[str] = Counter()


def _call_as_every_role(case: schemathesis.Case[Any], live: Live) -> None:
    if case.path == "/v1/agent/heartbeat" and isinstance(case.body, dict):
        case.body["wait_s"] = 0  # a held long-poll would only slow the run down
    for role in ROLES:
        headers = {"Authorization": f"Bearer {live.tokens[role]}"} if role else {}
        response = case.call(base_url=live.url, headers=headers, timeout=30)
        SEEN[f"{case.method} {response.status_code}"] += 1
        case.validate_response(response, checks=CHECKS)


def test_every_operation_as_every_role(live: Live) -> None:
    fuzz(live, examples=EXAMPLES)
    fuzz_websockets(live, examples=EXAMPLES)


def test_every_operation_as_every_role_on_postgresql(database_url: str, tmp_path: Path) -> None:
    """PostgreSQL refuses what SQLite stores (a NUL character, a number beyond a column), so the
    same fuzz runs against a server on it: both were 500s that the SQLite server never showed."""
    if not database_url.startswith("postgresql"):
        pytest.skip("on SQLite: test_every_operation_as_every_role")
    fleet = Fleet(workdir=tmp_path, database_url=database_url)
    try:
        admin = fleet.bootstrap()
        url = fleet.server(**FUZZ_ENV)
        live = Live(url=url, fleet=fleet)
        seed(live, admin)
        fuzz(live, examples=EXAMPLES)
        fuzz_websockets(live, examples=EXAMPLES)
    finally:
        fleet.close()


def fuzz(live: Live, *, examples: int) -> None:
    api = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in api.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case: schemathesis.Case[Any]) -> None:
            _call_as_every_role(case, live)

        try:
            run()
        except (AssertionError, BaseExceptionGroup) as exc:  # report every operation's failure
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    print(
        f"schemathesis: {operations} operations, requests by method and status: "
        f"{dict(sorted(SEEN.items()))}"
    )
    assert live.fleet.procs["server"].alive()
    assert not failures, "\n\n".join(failures)
    assert operations >= 30
    assert sum(SEEN.values()) >= operations * len(ROLES)


WEBSOCKET_ROUTES = (
    "/v1/jobs/{ref}/attach?rank={rank}",
    "/v1/jobs/{ref}/forward?port={port}&rank={rank}",
    "/v1/agent/streams/{ref}",
    "/v1/relay/streams/{ref}",
)
HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["1", "1_0", "0_1", "2_99999999999999999999", "1e3", "", "..", "%00"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=80),
)


def _websocket_cases(
    live: Live, route: str, examples: int, statuses: Counter[int]
) -> Callable[[], None]:
    @given(ref=HOSTILE, rank=HOSTILE, port=HOSTILE)
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(ref: str, rank: str, port: str) -> None:
        quoted = {k: urllib.parse.quote(v, safe="") for k, v in
                  (("ref", ref), ("rank", rank), ("port", port))}  # fmt: skip
        url = live.url.replace("http://", "ws://") + route.format(**quoted)
        for role in ROLES:
            headers = {"Authorization": f"Bearer {live.tokens[role]}"} if role else {}
            try:
                with connect(url, additional_headers=headers, open_timeout=30):
                    statuses[101] += 1
            except InvalidStatus as refused:
                status = refused.response.status_code
                statuses[status] += 1
                body = refused.response.body
                if status >= 500:
                    raise AssertionError(f"{url} as {role}: {status} {body!r}") from None

    return run  # type: ignore[no-any-return]


def fuzz_websockets(live: Live, *, examples: int) -> None:
    """Each WebSocket route, hostile values in its path and query, with every role's token:
    refused with a 4xx problem or accepted (then closed at once), never a 5xx."""
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for route in WEBSOCKET_ROUTES:
        run = _websocket_cases(live, route, examples, statuses)
        try:
            run()
        except (AssertionError, BaseExceptionGroup) as exc:
            failures.append(f"{route}: {exc}"[:3000])
    print(f"websocket fuzz: handshakes by status: {dict(sorted(statuses.items()))}")
    assert not failures, "\n\n".join(failures)
    assert sum(statuses.values()) >= len(WEBSOCKET_ROUTES) * len(ROLES)
