"""`Transactions`, the shape every retention pass shares: each step in a transaction of its
own, committed before the next; `committed` only after its commit; the budget shared by the
steps of one pass; a failing step rolls its transaction back and ends the pass. Real SQLite
and PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from scheduler.db import Site
from scheduler.db.engine import make_sessionmaker
from scheduler.services.batches import Batch, Transactions


@pytest.fixture
def maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)


async def _sites(maker: async_sessionmaker[AsyncSession]) -> int:
    async with maker() as session:
        return int(await session.scalar(select(func.count()).select_from(Site)) or 0)


async def test_each_step_commits_before_the_next_and_stops_when_done(
    maker: async_sessionmaker[AsyncSession],
) -> None:
    seen: list[int] = []  # sites committed, as each step finds them in a fresh session
    believed: list[int] = []

    async def step(session: AsyncSession) -> Batch:
        seen.append(int(await session.scalar(select(func.count()).select_from(Site)) or 0))
        session.add(Site(name=f"site-{len(seen)}"))
        n = len(seen)
        return Batch(more=n < 3, committed=lambda: believed.append(n))

    transactions = Transactions(10)
    await transactions.run(maker, step)
    assert seen == [0, 1, 2]
    assert believed == [1, 2, 3]
    assert transactions.left == 7
    assert await _sites(maker) == 3


async def test_steps_of_one_pass_share_its_budget(
    maker: async_sessionmaker[AsyncSession],
) -> None:
    calls = {"a": 0, "b": 0}

    def endless(name: str) -> Callable[[AsyncSession], Awaitable[Batch]]:
        async def step(session: AsyncSession) -> Batch:
            calls[name] += 1
            return Batch(more=True)

        return step

    transactions = Transactions(5)
    await transactions.run(maker, endless("a"))
    await transactions.run(maker, endless("b"))
    assert calls == {"a": 5, "b": 0}
    assert transactions.left == 0


async def test_a_failing_step_rolls_back_and_believes_nothing(
    maker: async_sessionmaker[AsyncSession],
) -> None:
    believed: list[str] = []

    async def step(session: AsyncSession) -> Batch:
        session.add(Site(name="half-done"))
        await session.flush()
        if await _sites(maker) >= 0:  # always: the row above is not committed yet
            raise RuntimeError("the batch failed")
        return Batch(more=False, committed=lambda: believed.append("done"))

    with pytest.raises(RuntimeError):
        await Transactions(3).run(maker, step)
    assert believed == []
    assert await _sites(maker) == 0
