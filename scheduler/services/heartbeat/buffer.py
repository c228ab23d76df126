"""Quiet heartbeats' liveness and GPU samples, kept in memory and written in batches.

Most heartbeats say only "still here, here are my GPUs". Writing each one at once costs a write
transaction per heartbeat; instead each server process remembers the newest heartbeat time per
node and the samples per GPU, and `flush()` writes them every `heartbeat_flush_interval_s`
(default 1 s) in one transaction: one statement for `nodes.last_heartbeat_at`, one for
`gpus.last_sample`, one upsert of busy seconds and energy into the usage ledger.

What this costs: the database sees liveness up to one flush interval late (node timeouts are
tens of seconds, so a node still goes down on time), and a process that crashes loses at most
one interval of samples (busy seconds and energy of that interval). Several replicas each flush
their own buffer; the GPU rows are locked while a flush computes usage from them, so two
replicas never count the same interval twice (a sample not newer than the stored one is skipped,
as a resend is). A failed flush keeps its data for the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any

from sqlalchemy import BigInteger, Table, and_, bindparam, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol.agent import GpuSample
from protocol.states import GpuHealth
from scheduler.db import Allocation, Gpu, Node
from scheduler.db.engine import run_to_end
from scheduler.services.accounting import (
    HeldGpu,
    SampleUsage,
    record_sample_usage,
    sample_usage,
)
from scheduler.services.heartbeat.events import gpu_health_event
from scheduler.settings import Settings

log = logging.getLogger("fairgpu.heartbeats")

_NODES: Table = Node.__table__  # type: ignore[assignment]
_GPUS: Table = Gpu.__table__  # type: ignore[assignment]
_ALLOCS: Table = Allocation.__table__  # type: ignore[assignment]

# GPUs a flush reads, computes and writes at a time (see `_write`).
FLUSH_CHUNK_GPUS = 500

# Samples kept per GPU between flushes; more (a database away for long) drops the oldest.
MAX_SAMPLES_PER_GPU = 32

# What this process must know of a node's GPUs to take its samples in a quiet heartbeat:
# index → (uuid, health). A sample that disagrees takes the full path.
KnownGpus = dict[int, tuple[str, GpuHealth]]


@dataclass(frozen=True, slots=True)
class OpenAllocation:
    """The fields of an open allocation that usage accounting needs (no ORM object)."""

    id: int
    org_id: int
    user_id: int
    job_id: int
    gpu_type: str
    started_at: datetime


@dataclass
class FlushResult:
    nodes: int = 0
    gpus: int = 0
    health_changed: bool = False


@dataclass
class HeartbeatBuffer:
    """Per process: the newest heartbeat per node and the samples per GPU not yet written."""

    liveness: dict[int, datetime] = field(default_factory=dict)
    samples: dict[int, dict[int, list[GpuSample]]] = field(default_factory=dict)
    known: dict[int, KnownGpus] = field(default_factory=dict)
    flushes: int = 0
    failures: int = 0

    def note(self, node_id: int, at: datetime, samples: Iterable[GpuSample]) -> None:
        previous = self.liveness.get(node_id)
        if previous is None or at > previous:
            self.liveness[node_id] = at
        per_gpu = self.samples.setdefault(node_id, {})
        for sample in samples:
            kept = per_gpu.setdefault(sample.index, [])
            kept.append(sample)
            if len(kept) > MAX_SAMPLES_PER_GPU:
                del kept[0]

    def matches(self, node_id: int, samples: Iterable[GpuSample]) -> bool:
        """True when every sample is of a GPU we know, with the health we know it has.

        A node this process has not seen yet (a heartbeat that another replica, or before a
        restart this one, used to answer) passes when all its GPUs say healthy: the flush
        compares them with the database and applies any difference, as the full path would.
        """
        known = self.known.get(node_id)
        if known is None:
            return all(sample.health == "healthy" for sample in samples)
        for sample in samples:
            entry = known.get(sample.index)
            if entry is None or entry[0] != sample.uuid or entry[1] != sample.health:
                return False
        return True

    def learn(self, node_id: int, gpus: KnownGpus) -> None:
        self.known[node_id] = gpus

    def forget(self, node_id: int) -> None:
        self.known.pop(node_id, None)

    def take_node(self, node_id: int) -> list[GpuSample]:
        """The node's buffered samples, oldest first, for a full heartbeat to apply itself:
        it may end the allocation they must be counted to."""
        per_gpu = self.samples.pop(node_id, {})
        return sorted((s for kept in per_gpu.values() for s in kept), key=lambda s: s.sampled_at)

    def put_back_node(self, node_id: int, samples: Iterable[GpuSample]) -> None:
        """After a failed full heartbeat: keep what `take_node` took for the next flush."""
        per_gpu: dict[int, list[GpuSample]] = {}
        for sample in samples:
            per_gpu.setdefault(sample.index, []).append(sample)
        self._put_back({}, {node_id: per_gpu})

    def pending(self) -> bool:
        return bool(self.liveness or self.samples)

    def _take(self) -> tuple[dict[int, datetime], dict[int, dict[int, list[GpuSample]]]]:
        taken = self.liveness, self.samples
        self.liveness, self.samples = {}, {}
        return taken

    def _put_back(
        self, liveness: Mapping[int, datetime], samples: Mapping[int, dict[int, list[GpuSample]]]
    ) -> None:
        """Merge what a failed flush took back in front of what arrived since."""
        for node_id, at in liveness.items():
            now_at = self.liveness.get(node_id)
            if now_at is None or at > now_at:
                self.liveness[node_id] = at
        for node_id, per_gpu in samples.items():
            mine = self.samples.setdefault(node_id, {})
            for index, older in per_gpu.items():
                merged = older + mine.get(index, [])
                mine[index] = merged[-MAX_SAMPLES_PER_GPU:]

    async def flush(
        self, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, now: datetime
    ) -> FlushResult:
        """Write everything buffered in one transaction; on failure keep it and re-raise."""
        if not self.pending():
            return FlushResult()
        liveness, samples = self._take()
        committed = False

        async def write() -> FlushResult:
            nonlocal committed
            async with sessionmaker() as session, session.begin():
                result = await _write(session, liveness, samples, settings, now, self)
            committed = True
            return result

        try:
            result = await run_to_end(write())
        except BaseException:
            # A cancellation raised after the commit (run_to_end) is not a failure: what was
            # written must not be written again by the next flush.
            if not committed:
                self.failures += 1
                self._put_back(liveness, samples)
            raise
        self.flushes += 1
        return result


_TOUCH = (
    update(_NODES)
    .where(
        _NODES.c.id == bindparam("n_id"),
        or_(_NODES.c.last_heartbeat_at.is_(None), _NODES.c.last_heartbeat_at < bindparam("n_at")),
    )
    .values(last_heartbeat_at=bindparam("n_at"))
)
_STORE_SAMPLE = (
    update(_GPUS)
    .where(_GPUS.c.id == bindparam("g_id"))
    .values(last_sample=bindparam("g_sample"), last_sample_at=bindparam("g_at"))
)


# PostgreSQL: the same two writes as one statement of array parameters each (thousands of
# rows a flush: per-row parameters cost more server CPU than the database spends on them).
_TOUCH_PG = text(
    "UPDATE nodes SET last_heartbeat_at = v.at"
    " FROM unnest(CAST(:ids AS INTEGER[]), CAST(:ats AS TIMESTAMPTZ[])) AS v(id, at)"
    " WHERE nodes.id = v.id"
    " AND (nodes.last_heartbeat_at IS NULL OR nodes.last_heartbeat_at < v.at)"
)
_STORE_SAMPLES_PG = text(
    "UPDATE gpus SET last_sample = CAST(v.sample AS JSON), last_sample_at = v.at"
    " FROM unnest(CAST(:ids AS BIGINT[]), CAST(:samples AS TEXT[]), CAST(:ats AS TIMESTAMPTZ[]))"
    " AS v(id, sample, at) WHERE gpus.id = v.id"
)


def sample_json(sample: GpuSample) -> dict[str, Any]:
    data = sample.model_dump(mode="json", exclude={"processes"})
    data["process_count"] = len(sample.processes)
    return data


def max_sample_gap_s(settings: Settings) -> float:
    """The longest interval one sample may stand for (an agent away claims no more)."""
    return max(settings.node_timeout_s, 3 * settings.heartbeat_interval_s)


def usage_of(
    allocation: HeldGpu,
    sample: GpuSample,
    *,
    previous_at: datetime | None,
    previous_energy: float | None,
    max_gap_s: float,
) -> SampleUsage | None:
    """What `sample` adds to the allocation holding its GPU, since the previous sample."""
    return sample_usage(
        allocation,
        previous_at=previous_at,
        previous_energy_joules=previous_energy,
        at=sample.sampled_at,
        utilization_ratio=sample.utilization_ratio,
        energy_joules=sample.energy_joules,
        max_gap_s=max_gap_s,
    )


def sample_json_text(sample: GpuSample) -> str:
    """`sample_json` as JSON text, serialised by pydantic (PostgreSQL's bulk write)."""
    text = sample.model_dump_json(exclude={"processes"})
    return f'{text[:-1]},"process_count":{len(sample.processes)}}}'


_HEALTH = {h.value: h for h in GpuHealth}
_SAMPLED_AT = attrgetter("sampled_at")


async def _write(
    session: AsyncSession,
    liveness: Mapping[int, datetime],
    samples: Mapping[int, dict[int, list[GpuSample]]],
    settings: Settings,
    now: datetime,
    buffer: HeartbeatBuffer,
) -> FlushResult:
    result = FlushResult(nodes=len(liveness))
    conn = await session.connection()
    if liveness and conn.dialect.name == "postgresql":
        ordered = sorted(liveness.items())
        await conn.execute(
            _TOUCH_PG, {"ids": [n for n, _ in ordered], "ats": [at for _, at in ordered]}
        )
    elif liveness:
        await conn.execute(_TOUCH, [{"n_id": n, "n_at": at} for n, at in sorted(liveness.items())])
    if not samples:
        return result
    open_alloc = and_(_ALLOCS.c.gpu_id == _GPUS.c.id, _ALLOCS.c.ended_at.is_(None))
    columns = (
        _GPUS.c.id, _GPUS.c.node_id, _GPUS.c.index, _GPUS.c.uuid, _GPUS.c.health,
        _GPUS.c.last_sample_at, _GPUS.c.last_sample["energy_joules"].as_float(), _ALLOCS.c.id,
        _ALLOCS.c.org_id, _ALLOCS.c.user_id, _ALLOCS.c.job_id, _ALLOCS.c.gpu_type,
        _ALLOCS.c.started_at,
    )  # fmt: skip
    stmt = select(*columns).select_from(_GPUS.outerjoin(_ALLOCS, open_alloc)).order_by(_GPUS.c.id)
    node_ids = sorted(samples)
    if conn.dialect.name == "postgresql":
        # One array parameter rather than an IN list rendered with a thousand parameters.
        ids = bindparam("node_ids", node_ids, type_=ARRAY(BigInteger))
        stmt = stmt.where(_GPUS.c.node_id == func.any(ids))
        # Two replicas flushing the same GPU must not both count the interval since the stored
        # sample. NO KEY UPDATE: allocations referencing the GPU (KEY SHARE) are not blocked.
        stmt = stmt.with_for_update(of=_GPUS, key_share=True)
    else:
        stmt = stmt.where(_GPUS.c.node_id.in_(node_ids))
    max_gap_s = max_sample_gap_s(settings)
    known: dict[int, KnownGpus] = {}
    # In chunks, each written before the next is read: a flush of thousands of GPUs lets the
    # server's event loop answer requests in between instead of stalling it for its duration.
    streamed = await conn.stream(stmt)
    async for rows in streamed.partitions(FLUSH_CHUNK_GPUS):
        usages: list[SampleUsage] = []
        stored: list[dict[str, Any]] = []
        for row in rows:
            gpu_id, node_id, index, uuid, health, last_at, previous_energy = row[:7]
            health = _HEALTH[health]
            kept = samples[node_id].get(index, ())
            alloc = (
                OpenAllocation(row[7], row[8], row[9], row[10], row[11], row[12])
                if row[7] is not None and kept
                else None
            )
            previous_at: datetime | None = last_at
            newest: GpuSample | None = None
            for sample in sorted(kept, key=_SAMPLED_AT) if len(kept) > 1 else kept:
                seen = previous_at is not None and sample.sampled_at <= previous_at
                if sample.uuid != uuid or seen:
                    continue  # another GPU now, or already counted (a resend, another replica)
                if alloc is not None:
                    usage = usage_of(
                        alloc,
                        sample,
                        previous_at=previous_at,
                        previous_energy=previous_energy,
                        max_gap_s=max_gap_s,
                    )
                    if usage is not None:
                        usages.append(usage)
                previous_at, previous_energy, newest = (
                    sample.sampled_at,
                    sample.energy_joules,
                    sample,
                )
            if newest is not None:
                stored.append({"g_id": gpu_id, "g_sample": newest, "g_at": newest.sampled_at})
                reported = _HEALTH[newest.health]
                if reported is not health:
                    # Stale knowledge let it through as quiet: apply it now, as the full path
                    # would have.
                    await _health_change(session, gpu_id, node_id, index, uuid, health, newest, now)
                    health = reported
                    result.health_changed = True
            known.setdefault(node_id, {})[index] = (uuid, health)
        if stored and conn.dialect.name == "postgresql":
            await conn.execute(
                _STORE_SAMPLES_PG,
                {
                    "ids": [r["g_id"] for r in stored],
                    "samples": [sample_json_text(r["g_sample"]) for r in stored],
                    "ats": [r["g_at"] for r in stored],
                },
            )
        elif stored:
            for r in stored:
                r["g_sample"] = sample_json(r["g_sample"])
            await conn.execute(_STORE_SAMPLE, stored)
        await record_sample_usage(session, usages)
        result.gpus += len(stored)
    buffer.known.update(known)
    return result


async def _health_change(
    session: AsyncSession,
    gpu_id: int,
    node_id: int,
    index: int,
    uuid: str,
    was: GpuHealth,
    sample: GpuSample,
    now: datetime,
) -> None:
    health = GpuHealth(sample.health)
    await session.execute(
        update(_GPUS)
        .where(_GPUS.c.id == gpu_id)
        .values(health=health, health_reason=sample.health_reason or None)
    )
    session.add(
        gpu_health_event(
            node_id,
            gpu_index=index,
            uuid=uuid,
            was=was,
            to=health,
            reason=sample.health_reason,
            xids=sample.xid_events,
            actor=f"agent:{node_id}",
            at=now,
        )
    )
