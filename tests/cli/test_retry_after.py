"""The CLI honours Retry-After: a command refused with 429 waits as the server says (one line
on stderr per wait) and goes on, within FAIRGPU_RETRY_MAX_S; with no time left it fails in one
line. Real server (uvicorn on loopback) on SQLite and PostgreSQL, the real CLI."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import deps
from api.app import create_app
from scheduler.settings import Settings
from tests.harness.served import Served, seed_admin, serve_app


@pytest.fixture
def slow_changes(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Served]:
    """A server that lets one token make one change, then one every 1 / param s."""
    settings = Settings(
        database_url=database_url,
        migrate_on_start=False,
        change_rate_per_s=request.param,
        change_burst=1,
    )
    token = seed_admin(database_url)
    with serve_app(create_app(settings)) as url:
        yield Served(url=url, admin_token=token, config_dir=tmp_path / "config")


# One change per 5 s after the first: the second, sent at once, is refused for 1-5 s.
@pytest.mark.parametrize("slow_changes", [0.2], indirect=True)
def test_a_refused_change_waits_as_told_then_succeeds(slow_changes: Served) -> None:
    slow_changes.ok("org", "create", "acme")
    started = time.monotonic()
    result = slow_changes.run("org", "create", "rival")
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 1.0  # it waited rather than hammered
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "POST /v1/orgs: server busy (HTTP 429)" in lines[0]
    assert re.search(r"; retrying in [1-5] s$", lines[0]), lines[0]
    assert "rival" in slow_changes.ok("org", "list")


@pytest.mark.parametrize("slow_changes", [0.2], indirect=True)
def test_a_slow_authentication_makes_no_client_wait_twice(
    slow_changes: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token's bucket is charged on arrival, the user's after authentication: seconds
    apart on a loaded server (here 1.5 s for the first change). Charged at their own instants
    they refilled apart, so a client that waited the token bucket's Retry-After met the user's
    still short (a second 429, which spent the token's bucket again: a third, as CI saw); both
    are charged at the request's arrival now."""
    real = deps.authenticate
    calls = []

    async def slow(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # the first change's: the second's is charged in time
            await asyncio.sleep(1.5)
        return await real(*args, **kwargs)

    monkeypatch.setattr(deps, "authenticate", slow)
    slow_changes.ok("org", "create", "acme")
    result = slow_changes.run("org", "create", "rival")
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "from this token" in lines[0], lines[0]


# One change per 1000 s after the first: however slow the machine, the next ones are refused.
@pytest.mark.parametrize("slow_changes", [0.001], indirect=True)
def test_without_patience_a_429_is_one_line_and_a_failure(
    slow_changes: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_changes.ok("org", "create", "acme")
    monkeypatch.setenv("FAIRGPU_RETRY_MAX_S", "0")
    result = slow_changes.run("org", "create", "rival")
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "(HTTP 429)" in lines[0]
    monkeypatch.setenv("FAIRGPU_RETRY_MAX_S", "soon")
    result = slow_changes.run("org", "list")
    assert result.exit_code == 0  # a read that is not refused never looks at it
    result = slow_changes.run("org", "create", "rival")
    assert result.exit_code == 2
    assert "FAIRGPU_RETRY_MAX_S='soon'" in result.stderr
