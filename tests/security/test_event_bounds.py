"""A tenant looping attaches (or forwarded connections, holds, releases, updates) on its job
writes at most `max_job_events_per_kind` event rows of each such kind; every later one is
counted in one `<kind>.more` row, so `describe` still says how many, the first and the last.
Real server (uvicorn on loopback or the app over httpx), real WebSockets, SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from scheduler.settings import Settings
from tests.api.helpers import World, running_app, seed_world
from tests.harness.served import Served, seed_admin, serve_app
from tests.security.test_stream_admission import Pool, _pool

BOUND = 3
JOB = {"command": ["python", "train.py"], "gpus_per_node": 1, "time_limit": 60}


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


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url, max_job_events_per_kind=2) as app:
        yield await seed_world(app)


async def _kinds(c: httpx.AsyncClient, job: int | str) -> dict[str, list[dict[str, Any]]]:
    response = await c.get(f"/v1/jobs/{job}/events", params={"limit": 500})
    assert response.status_code == 200, response.text
    kinds: dict[str, list[dict[str, Any]]] = {}
    for event in response.json()["data"]:
        kinds.setdefault(event["kind"], []).append(event)
    return kinds


async def test_a_loop_of_hold_release_and_update_stores_a_bounded_number_of_events(
    world: World,
) -> None:
    """A pending job held and released, or renamed, in a loop: each kind keeps its first two
    events and one counted row; an array's elements are each bounded alike, and the job's
    state changes stay exactly what they were."""
    async with world.client("member_a") as c:
        single = await c.post("/v1/jobs", json=JOB)
        array = await c.post("/v1/jobs", json={**JOB, "array": "0-2"})
        assert single.status_code == array.status_code == 201, (single.text, array.text)
        job, first = single.json()["id"], array.json()["id"]
        for target in (job, first):
            for round_ in range(5):
                assert (await c.post(f"/v1/jobs/{target}/hold")).status_code == 200
                assert (await c.post(f"/v1/jobs/{target}/release")).status_code == 200
                renamed = await c.patch(f"/v1/jobs/{target}", json={"name": f"n{round_}"})
                assert renamed.status_code == 200, renamed.text
        kinds = await _kinds(c, job)
        for kind in ("job.hold", "job.release", "job.update"):
            assert len(kinds[kind]) == 2
            (more,) = kinds[kind + ".more"]
            assert more["details"]["count"] == 3
            assert more["actor"] == "user:member-a"
        assert kinds["job.update.more"][0]["details"]["last"] == {"name": "n4"}
        assert len(kinds["job.state"]) == 1  # the submission, unfolded
        element = await c.get(f"/v1/jobs/{first}_2")
        assert element.json()["name"] == "n4"  # the whole array was renamed
        for ref in (f"{first}_0", f"{first}_2"):
            kinds = await _kinds(c, ref)
            assert [len(kinds["job.hold"]), kinds["job.hold.more"][0]["details"]["count"]] == [2, 3]
        # The job can still be held, and it is: the folded rows change nothing but the count.
        assert (await c.post(f"/v1/jobs/{job}/hold")).json()["held"] is True
        assert (await _kinds(c, job))["job.hold.more"][0]["details"]["count"] == 4
