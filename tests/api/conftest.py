"""Fixtures for API tests: the real app (lifespan running) on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.helpers import World, running_app, seed_world


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    # The authorisation matrix sends every route an expired and a revoked token, all from one
    # address: the bound on an address's failed authentications (its own tests:
    # tests/api/test_auth_failures.py) is off here, as the rates are off in `bench api`.
    async with running_app(database_url, auth_failure_rate_per_s=0) as app:
        yield await seed_world(app)
