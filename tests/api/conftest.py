"""Fixtures for API tests: the real app (lifespan running) on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.helpers import World, running_app, seed_world


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url) as app:
        yield await seed_world(app)
