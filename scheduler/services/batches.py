"""The shape every retention pass shares: a bounded number of short transactions between two
scheduling cycles, each committed before the next, so that no pass holds locks or the leader
for long and what is left waits for the next pass."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


@dataclass(frozen=True, slots=True)
class Batch:
    """What one transaction's step found: whether another transaction has work, and what the
    pass may believe once this one is committed (a cursor moved past its rows)."""

    more: bool
    committed: Callable[[], None] | None = None


@dataclass
class Transactions:
    """The transactions one pass may still run; several steps may share them."""

    left: int

    async def run(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        step: Callable[[AsyncSession], Awaitable[Batch]],
    ) -> None:
        """Run `step` in fresh transactions until it has no more work or none are left."""
        while self.left > 0:
            self.left -= 1
            async with sessionmaker() as session:
                batch = await step(session)
                await session.commit()
            if batch.committed is not None:
                batch.committed()
            if not batch.more:
                return
