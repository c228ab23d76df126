"""An admin's hold is not its member's to lift: a job held by an org admin or a platform admin
(Slurm's `scontrol hold`, JobHeldAdmin) cannot be released by its owner, through release, PATCH
or an array's id; a user hold (`uhold`, JobHeldUser) can. Who held it and why shows in the job,
explain, the queue's reason and the events. The real app on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protocol.states import JobState
from tests.api.helpers import World, running_app, seed_world

JOB = {"command": ["python", "train.py"], "gpus_per_node": 1, "time_limit": 60}


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url) as app:
        yield await seed_world(app)


@pytest.mark.parametrize("admin", ["admin_a", "platform"])
async def test_a_member_cannot_release_an_admins_hold(world: World, admin: str) -> None:
    job = await world.job("member_a")
    async with world.client(admin) as c:
        held = await c.post(f"/v1/jobs/{job.id}/hold", json={"reason": "uses the wrong data"})
    assert held.status_code == 200, held.text
    assert held.json()["hold_level"] == "admin"
    # A platform admin reads apart from an org's user of the same name (names are per org).
    actor = f"{'admin' if admin == 'platform' else 'user'}:{world.users[admin].name}"
    assert held.json()["held_by"] == actor
    assert held.json()["hold_reason"] == "uses the wrong data"
    async with world.client("member_a") as c:
        refused = await c.post(f"/v1/jobs/{job.id}/release")
        patched = await c.patch(f"/v1/jobs/{job.id}", json={"hold": False})
        # A user hold over it changes nothing: it stays an admin hold.
        again = await c.post(f"/v1/jobs/{job.id}/hold")
        explained = (await c.get(f"/v1/jobs/{job.id}/explain")).json()
        listed = (await c.get("/v1/jobs", params={"state": "PENDING"})).json()["data"]
        got = (await c.get(f"/v1/jobs/{job.id}")).json()
    for answer in (refused, patched):
        assert answer.status_code == 403, answer.text
        assert actor in answer.json()["detail"]
        assert "uses the wrong data" in answer.json()["detail"]
    assert again.status_code == 200
    assert again.json()["hold_level"] == "admin"
    assert got["held"] is True
    assert got["hold_level"] == "admin"
    first = explained["reasons"][0]
    assert first["code"] == "JobHeldAdmin"
    assert actor in first["message"]
    assert "uses the wrong data" in first["message"]
    assert next(j for j in listed if j["id"] == job.id)["pending_reason"]["code"] == "JobHeldAdmin"
    # The admin releases it; the events say who held it, at which level and why.
    async with world.client(admin) as c:
        released = await c.post(f"/v1/jobs/{job.id}/release")
        events = (await c.get(f"/v1/jobs/{job.id}/events")).json()["data"]
    assert released.status_code == 200
    assert released.json()["held"] is False
    assert released.json()["hold_level"] is None
    holds = [e for e in events if e["kind"] in ("job.hold", "job.release")]
    assert [(e["kind"], e["actor"]) for e in holds] == [("job.hold", actor), ("job.release", actor)]
    assert holds[0]["reason"] == "admin hold: uses the wrong data"


async def test_a_member_releases_its_own_hold_and_an_admins_user_hold(world: World) -> None:
    job = await world.job("member_a")
    async with world.client("member_a") as c:
        held = (await c.post(f"/v1/jobs/{job.id}/hold", json={"reason": "later"})).json()
        explained = (await c.get(f"/v1/jobs/{job.id}/explain")).json()
        assert (await c.post(f"/v1/jobs/{job.id}/release")).status_code == 200
    assert held["hold_level"] == "user"
    assert explained["reasons"][0]["code"] == "JobHeldUser"
    assert "later" in explained["reasons"][0]["message"]
    async with world.client("admin_a") as c:
        uhold = await c.post(f"/v1/jobs/{job.id}/hold", json={"level": "user"})
    assert uhold.json()["hold_level"] == "user"
    async with world.client("member_a") as c:
        released = await c.post(f"/v1/jobs/{job.id}/release")
        # A member cannot ask for an admin hold.
        refused = await c.post(f"/v1/jobs/{job.id}/hold", json={"level": "admin"})
    assert released.status_code == 200
    assert released.json()["held"] is False
    assert refused.status_code == 403


async def test_an_admin_hold_replaces_a_user_hold(world: World) -> None:
    job = await world.job("member_a")
    async with world.client("member_a") as c:
        await c.post(f"/v1/jobs/{job.id}/hold")
    async with world.client("admin_a") as c:
        upgraded = (await c.post(f"/v1/jobs/{job.id}/hold", json={"reason": "audit"})).json()
    assert upgraded["hold_level"] == "admin"
    assert upgraded["held_by"] == "user:admin-a"
    async with world.client("member_a") as c:
        assert (await c.post(f"/v1/jobs/{job.id}/release")).status_code == 403


async def test_an_arrays_admin_hold_is_not_released_through_its_id(world: World) -> None:
    async with world.client("member_a") as c:
        array = (await c.post("/v1/jobs", json={**JOB, "array": "0-2"})).json()
    ref = str(array["array_job_id"])
    async with world.client("admin_a") as c:
        assert (await c.post(f"/v1/jobs/{ref}/hold")).status_code == 200
    async with world.client("member_a") as c:
        refused = await c.post(f"/v1/jobs/{ref}/release")
        patched = await c.patch(f"/v1/jobs/{ref}", json={"hold": False})
        listed = (await c.get("/v1/jobs", params={"state": "PENDING"})).json()["data"]
    assert refused.status_code == 403
    assert patched.status_code == 403
    elements = [j for j in listed if j.get("array_job_id") == array["array_job_id"]]
    assert len(elements) == 3
    assert all(j["held"] and j["hold_level"] == "admin" for j in elements)
    async with world.client("admin_a") as c:
        assert (await c.post(f"/v1/jobs/{ref}/release")).status_code == 200


async def test_another_orgs_admin_cannot_hold_or_release(world: World) -> None:
    job = await world.job("member_a")
    async with world.client("admin_a") as c:
        await c.post(f"/v1/jobs/{job.id}/hold")
    async with world.client("admin_b") as c:
        assert (await c.post(f"/v1/jobs/{job.id}/release")).status_code == 404
        assert (await c.post(f"/v1/jobs/{job.id}/hold", json={"level": "user"})).status_code == 404
    done = await world.job("member_a", state=JobState.COMPLETED)
    async with world.client("admin_a") as c:
        assert (await c.post(f"/v1/jobs/{done.id}/hold")).status_code == 409


async def test_a_hold_reason_cannot_drive_a_readers_terminal(world: World) -> None:
    """The reason is shown to every member of the org by describe and explain."""
    job = await world.job("member_a")
    async with world.client("admin_a") as c:
        refused = await c.post(
            f"/v1/jobs/{job.id}/hold", json={"reason": "\x1b]52;c;cm0gLXJmIH4=\x07 ok"}
        )
        too_long = await c.post(f"/v1/jobs/{job.id}/hold", json={"reason": "x" * 1025})
        got = (await c.get(f"/v1/jobs/{job.id}")).json()
    assert refused.status_code == 422
    assert too_long.status_code == 422
    assert got["held"] is False
