"""A lock on one owner's row (an org, a user) held to the end of the transaction, so that
a count against a cap and the insert it allows happen in turn for every request of that owner;
also on any row that is read, then written on what was read (a job cancelled as pending).

Without it, two requests both count, both see room and both insert: a burst of N concurrent
requests overshoots a cap by up to N - 1, on either database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession


async def lock_owner_row(session: AsyncSession, model: Any, row_id: int) -> None:
    """Queue behind every other transaction that locked the same row, until it ends.

    PostgreSQL: `FOR NO KEY UPDATE`, which inserts that only reference the row (a token of
    the user, a job of the org) do not wait on; each later statement of the transaction
    (READ COMMITTED) then reads what the previous holder committed. SQLite: an UPDATE that
    changes nothing, which takes the database's one write lock now, before the count, where
    a plain SELECT would run outside any transaction and count a state already stale.
    """
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            select(model.id).where(model.id == row_id).with_for_update(key_share=True)
        )
        return
    await session.execute(
        update(model)
        .where(model.id == row_id)
        .values(id=model.id)
        .execution_options(synchronize_session=False)
    )
