"""ORM row for interactive streams: one per open attach or forwarded connection.

The row names the server process holding the user's side (its relay URL and a random id of
that process), so that whichever replica the node's agent reaches can hand the agent's side over
(docs/INTERACTIVE.md, "Several server replicas"). It also makes the per-job caps hold across
replicas, and so do the per-user and per-org ones: they count rows, not what one process holds.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from scheduler.db.base import Base
from scheduler.db.types import BigId, utcnow


class Stream(Base):
    """Pending until the node's agent claims it (once, only that node, before `expires_at`);
    open until either side ends it, when its holder deletes it. A holder refreshes `alive_at`
    while it lives: rows of a holder that died are no longer counted, and are swept."""

    __tablename__ = "streams"
    __table_args__ = (Index("ix_streams_job_id_kind", "job_id", "kind"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(BigId, ForeignKey("tasks.id", ondelete="CASCADE"))
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int | None] = mapped_column(Integer, index=True)
    """Who opened it (None on rows older than the column); no foreign key: a row lives for
    seconds to hours and is swept with its holder, and it must never hold a user's deletion."""
    org_id: Mapped[int | None] = mapped_column(Integer, index=True)
    """The org it counts against: its user's (None for a platform admin's)."""
    kind: Mapped[str] = mapped_column(String(16))  # "attach" | "new" | "port"
    port: Mapped[int | None] = mapped_column(Integer)
    holder_id: Mapped[str] = mapped_column(String(64), index=True)
    holder_url: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    """An unclaimed stream is not handed out after this."""
    claimed_at: Mapped[datetime | None] = mapped_column()
    alive_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    relay_secret_hash: Mapped[str | None] = mapped_column(String(64))
    """sha256 of the secret a claiming replica other than the holder presents to the holder's
    relay endpoint; the secret itself lives only in that replica's memory."""
