"""Running the other side of a race to the point where it waits on the first side's locks."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


async def done_or_waiting(engine: AsyncEngine, task: asyncio.Task[Any]) -> None:
    """Until `task` ended, or (PostgreSQL) some session waits on a row lock: the other side has
    gone as far as it can while the first holds its transaction open. SQLite: its first write
    waits on the first side's write lock whatever it is, so one turn of the loop lets it read
    and reach that wait."""
    await asyncio.sleep(0)
    if engine.dialect.name != "postgresql":
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    async with engine.connect() as conn:
        while not task.done() and loop.time() < deadline:
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )
            await conn.rollback()
            if waiting:
                return
            await asyncio.sleep(0.05)
