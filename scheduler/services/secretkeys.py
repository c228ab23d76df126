"""Key rotation for jobs' secret_env: re-seal every stored value with the first key.

Needed only before an old key is dropped from `FAIRGPU_SECRET_KEYS`: while it is still listed,
values it sealed decrypt as they are. Jobs whose values no listed key opens are counted and left
as they are (their tasks fail alone, with that reason, if they ever start).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.fernet import MultiFernet
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Job
from scheduler.secretenv import SecretsUnreadable, rotate

ROTATE_BATCH = 500


@dataclass(frozen=True, slots=True)
class Rotated:
    rotated: int
    unreadable: list[int]
    """Jobs none of the keys could decrypt."""


async def rotate_secret_env(
    session: AsyncSession, *, secret_cipher: MultiFernet, after_id: int = 0
) -> tuple[Rotated, int | None]:
    """Re-seal one batch of jobs with an id above `after_id`; returns the batch's result and
    the id to continue after (None when done). Flushes; the caller commits each batch."""
    rows = (
        await session.execute(
            select(Job.id, Job.secret_env_ciphertext)
            .where(Job.id > after_id, Job.secret_env_ciphertext.is_not(None))
            .order_by(Job.id)
            .limit(ROTATE_BATCH)
        )
    ).all()
    rotated, unreadable = 0, []
    for job_id, sealed in rows:
        try:
            fresh = rotate(secret_cipher, sealed or {})
        except SecretsUnreadable:
            unreadable.append(job_id)
            continue
        await session.execute(
            update(Job).where(Job.id == job_id).values(secret_env_ciphertext=fresh)
        )
        rotated += 1
    await session.flush()
    last = rows[-1][0] if len(rows) == ROTATE_BATCH else None
    return Rotated(rotated, unreadable), last
