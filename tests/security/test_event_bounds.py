"""A tenant looping attaches (or forwarded connections) into its job writes at most
`max_job_events_per_kind` event rows of that kind on it; every later one is counted in one
`<kind>.more` row, so `describe` still says how many, the first and the last. Real server
(uvicorn on loopback), real WebSockets, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from scheduler.settings import Settings
from tests.harness.served import Served, seed_admin, serve_app
from tests.security.test_stream_admission import Pool, _pool

BOUND = 3


@pytest.fixture
def pool(database_url: str, tmp_path: Path) -> Iterator[Pool]:
    settings = Settings(
        database_url=database_url,
        migrate_on_start=False,
        cycle_interval_s=0.5,
        heartbeat_long_poll_s=1.0,
        max_job_events_per_kind=BOUND,
    )
    token = seed_admin(database_url)
    with serve_app(create_app(settings)) as url:
        yield _pool(Served(url=url, admin_token=token, config_dir=tmp_path / "config"))


def _events(pool: Pool, who: str, job: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{pool.served.url}/v1/jobs/{pool.jobs[job]}/events",
        params={"limit": 500},
        headers={"Authorization": f"Bearer {pool.tokens[who]}"},
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def test_a_loop_of_attaches_stores_a_bounded_number_of_events(pool: Pool) -> None:
    for _ in range(BOUND + 4):
        with pool.attach("ada", "ada"):
            pass
    events = _events(pool, "ada", "ada")
    attaches = [e for e in events if e["kind"] == "job.attach"]
    (more,) = [e for e in events if e["kind"] == "job.attach.more"]
    assert len(attaches) == BOUND
    assert more["details"]["count"] == 4
    assert more["actor"] == "user:ada"
    assert more["id"] > attaches[-1]["id"]  # after the stored ones, in the job's history
    first, last = (datetime.fromisoformat(more["details"][k]) for k in ("first_at", "last_at"))
    assert datetime.fromisoformat(attaches[-1]["at"]) <= first <= last
    assert datetime.fromisoformat(more["at"]) == last
    assert "4 more job.attach events" in more["reason"]

    # The other org's job is bounded apart: its attaches are all stored, up to its own bound.
    with pool.attach("eve", "eve"):
        pass
    assert [e["kind"] for e in _events(pool, "eve", "eve")].count("job.attach") == 1

    # describe tells the count.
    out = pool.served.ok("describe", str(pool.jobs["ada"]))
    assert "job.attach.more" in out
    assert "4 more job.attach events" in out
