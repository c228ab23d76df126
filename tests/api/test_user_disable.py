"""Disabling a user, as Slurm's users expect of removing one: its tokens stop at once, its
pending jobs (held ones too) are cancelled with an event naming why, its running jobs and every
other user's jobs are left alone, and its history stays for accounting."""

from __future__ import annotations

from sqlalchemy import select

from protocol.states import JobState
from scheduler.db import Event, Job
from tests.api.helpers import World


async def _state(world: World, job_id: int) -> JobState:
    async with world.app.state.sessionmaker() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return job.state


async def test_disabling_a_user_cancels_its_pending_jobs_and_keeps_the_rest(world: World) -> None:
    pending = await world.job("member_a2")
    held = await world.job("member_a2", held=True)
    running = await world.job("member_a2", state=JobState.RUNNING)
    done = await world.job("member_a2", state=JobState.COMPLETED)
    colleague = await world.job("member_a")
    async with world.client("admin_a") as c:
        r = await c.delete(f"/v1/users/{world.users['member_a2'].id}")
        assert r.status_code == 200, r.text
        assert r.json()["disabled_at"] is not None
    async with world.client("member_a2") as c:
        assert (await c.get("/v1/jobs")).status_code == 401
    assert await _state(world, pending.id) is JobState.CANCELLED
    assert await _state(world, held.id) is JobState.CANCELLED
    assert await _state(world, running.id) is JobState.RUNNING
    assert await _state(world, done.id) is JobState.COMPLETED
    assert await _state(world, colleague.id) is JobState.PENDING
    async with world.client("admin_a") as c:
        events = (await c.get(f"/v1/jobs/{pending.id}/events")).json()["data"]
    (cancel,) = [e for e in events if e.get("to_state") == "CANCELLED"]
    assert cancel["reason"] == "user member-a2 was disabled by user:admin-a", cancel
    async with world.app.state.sessionmaker() as session:
        disable = (await session.scalars(select(Event).where(Event.kind == "user.disable"))).one()
        assert disable.details == {"user": "member-a2", "cancelled_jobs": 2}
        assert await session.get(Job, done.id) is not None  # history kept


async def test_disabling_again_changes_nothing(world: World) -> None:
    await world.job("member_a2")
    async with world.client("admin_a") as c:
        for _ in range(2):
            assert (await c.delete(f"/v1/users/{world.users['member_a2'].id}")).status_code == 200
    async with world.app.state.sessionmaker() as session:
        events = (await session.scalars(select(Event).where(Event.kind == "user.disable"))).all()
    assert len(events) == 1
