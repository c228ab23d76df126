"""SQLite's single writer under heartbeats: a busy database means a wait, never an error.

SQLite lets one connection write at a time; the others wait up to the busy timeout. Two things
must hold for the embedded default to be dependable: a heartbeat that arrives while another
connection writes waits and succeeds, and a heartbeat whose request is cancelled mid-transaction
(the agent gives up on it, or the server shuts down) never leaves the write lock held.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.scheduling.harness import Cluster, fast_settings, now, running_cluster, sample


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "fairgpu.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
async def cluster(sqlite_url: str) -> AsyncIterator[Cluster]:
    settings = fast_settings(sqlite_url, run_scheduler=False, heartbeat_flush_interval_s=0.05)
    async with running_cluster(settings) as c:
        yield c


@pytest.fixture
async def unflushed(sqlite_url: str) -> AsyncIterator[Cluster]:
    """A cluster whose buffer only the test flushes: no flush loop takes what it puts there."""
    settings = fast_settings(sqlite_url, run_scheduler=False, heartbeat_flush_interval_s=3600)
    async with running_cluster(settings) as c:
        yield c


async def take_write_lock(url: str, timeout_s: float) -> None:
    """Take and release the write lock, waiting up to `timeout_s`, from a thread: waiting in
    the event loop would stop a server transaction that holds the lock (the flush loop's, say)
    from ever reaching its commit, and the wait would end in "database is locked"."""

    def take() -> None:
        with write_lock(url, timeout_s):
            pass

    await asyncio.to_thread(take)


@contextmanager
def write_lock(url: str, timeout_s: float = 0.0) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock from another connection (as another process would)."""
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=timeout_s, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


async def _node(cluster: Cluster) -> tuple[str, list[str]]:
    node = await cluster.register(await cluster.join_token(), gpus=2)
    return str(node["credential"]), list(node["gpu_uuids"])


def _samples(uuids: list[str]) -> list[dict[str, object]]:
    at = now()
    return [sample(i, uuid, at, utilization_ratio=0.5) for i, uuid in enumerate(uuids)]


async def test_heartbeats_wait_for_a_held_write_lock(cluster: Cluster, sqlite_url: str) -> None:
    credential, uuids = await _node(cluster)
    with write_lock(sqlite_url):
        quiet = [
            asyncio.create_task(cluster.heartbeat(credential, samples=_samples(uuids)))
            for _ in range(5)
        ]
        # A full heartbeat (the isolation mode is news) writes in its own transaction.
        full = asyncio.create_task(cluster.heartbeat(credential, isolation="none"))
        flush = asyncio.create_task(cluster.runtime.flush_heartbeats())
        await asyncio.sleep(1.0)  # all of them now wait for the lock
    replies = await asyncio.wait_for(asyncio.gather(*quiet, full), 20)
    assert all(r["start"] == [] for r in replies)
    await asyncio.wait_for(flush, 20)
    await cluster.runtime.flush_heartbeats()
    await take_write_lock(sqlite_url, timeout_s=5.0)


@pytest.mark.parametrize("wait_before_cancel_s", [0.0, 0.05, 0.3])
async def test_a_cancelled_heartbeat_leaves_no_lock(
    cluster: Cluster, sqlite_url: str, wait_before_cancel_s: float
) -> None:
    credential, uuids = await _node(cluster)
    await cluster.heartbeat(credential, samples=_samples(uuids))
    with write_lock(sqlite_url):
        # Held for the lock, then cancelled while their transactions wait or just after they
        # began: a full heartbeat (a new isolation mode) and a flush of buffered samples.
        task = asyncio.create_task(cluster.heartbeat(credential, isolation="strict", wait_s=5))
        await cluster.heartbeat(credential, samples=_samples(uuids))
        flush = asyncio.create_task(cluster.runtime.flush_heartbeats())
        await asyncio.sleep(0.3)
    await asyncio.sleep(wait_before_cancel_s)
    task.cancel()
    flush.cancel()
    await asyncio.gather(task, flush, return_exceptions=True)
    began = time.monotonic()
    # Every transaction has finished: another writer gets the lock at once.
    await take_write_lock(sqlite_url, timeout_s=5.0)
    assert time.monotonic() - began < 5.0
    reply = await asyncio.wait_for(cluster.heartbeat(credential, isolation="none"), 10)
    assert reply["stop"] == []
    await asyncio.wait_for(cluster.runtime.flush_heartbeats(), 10)


async def test_a_heartbeat_and_flush_cancelled_after_their_commit_put_nothing_back(
    unflushed: Cluster, sqlite_url: str
) -> None:
    # The full heartbeat applied the buffered samples it took, the flush wrote the liveness it
    # took; a cancellation raised after their commits must not hand either to the next flush as
    # if it had not been written (a flush the test did not ask for would then run meanwhile).
    cluster = unflushed
    credential, uuids = await _node(cluster)
    await cluster.heartbeat(credential, samples=_samples(uuids))  # the credential's first use
    await cluster.runtime.flush_heartbeats()
    with write_lock(sqlite_url):
        await cluster.heartbeat(credential, samples=_samples(uuids))
        task = asyncio.create_task(cluster.heartbeat(credential, isolation="strict", wait_s=5))
        await asyncio.sleep(0.3)  # the full heartbeat took the samples and waits for the lock
        assert not cluster.runtime.live.samples
        flush = asyncio.create_task(cluster.runtime.flush_heartbeats())
        await asyncio.sleep(0.3)  # the flush took the liveness and waits for the lock
        assert not cluster.runtime.live.pending()
    task.cancel()
    flush.cancel()
    await asyncio.gather(task, flush, return_exceptions=True)
    assert not cluster.runtime.live.pending()
