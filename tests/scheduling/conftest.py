"""Fixtures for the scheduling service: a running app per test on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.scheduling.harness import Cluster, fast_settings, running_cluster


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c
