"""Retention cursors in the database: each pass reads where it got to from the row its last
batch wrote in the same transaction as its deletions, so that a restarted or new leader
carries on from there instead of walking again through what is purged already."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import RetentionCursor
from scheduler.db.engine import dialect_insert
from scheduler.db.types import utcnow

_TABLE: Table = RetentionCursor.__table__  # type: ignore[assignment]


async def load_cursor(session: AsyncSession, name: str) -> tuple[datetime, int | None] | None:
    """(through_at, through_id) as the pass named `name` last committed it; None: never."""
    row = (
        await session.execute(
            select(RetentionCursor.through_at, RetentionCursor.through_id).where(
                RetentionCursor.name == name
            )
        )
    ).first()
    return None if row is None else (row.through_at, row.through_id)


async def save_cursor(
    session: AsyncSession, name: str, through_at: datetime, through_id: int | None = None
) -> None:
    """Store the pass's cursor in the caller's transaction: it commits with what it covers."""
    values = {"through_at": through_at, "through_id": through_id, "updated_at": utcnow()}
    stmt = dialect_insert(session, _TABLE).values(name=name, **values)
    await session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=values))
