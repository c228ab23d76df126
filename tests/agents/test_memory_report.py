"""A strict agent reports its GPUs' memory share, and the server places `--mem` by it: a job
asking more than any GPU's share waits with the reason instead of failing at start on the node
(the agent refuses such a task: agents/isolation.py `limits`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.isolation import Confinement, IsolationConfig
from tests.agents.helpers import require_cgroups
from tests.agents.test_daemon import Harness, harnessed
from tests.scheduling.harness import fast_settings

GIB = 2**30


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnessed(tmp_path, fast_settings(database_url)) as h:
        yield h


def test_an_unconfined_agent_knows_no_share() -> None:
    """Without task cgroups nothing is limited nor refused: the share is unknown (None), and the
    server places on the node as it always did."""
    assert Confinement(IsolationConfig()).memory_per_gpu_bytes is None


async def test_a_job_no_gpus_share_holds_waits_instead_of_failing_at_start(
    harness: Harness, tmp_path: Path
) -> None:
    require_cgroups()
    isolation = IsolationConfig(
        mode="strict",
        task_root=tmp_path / "tasks",
        task_uid_base=60_000,
        memory_per_gpu_bytes=GIB,
        cgroup_parent=f"fairgpu-test-{uuid.uuid4().hex[:8]}",
    )
    agent = harness.start(isolation=isolation)
    try:
        await asyncio.wait_for(agent.connected.wait(), 30)
        [registration] = harness.wire.registrations
        assert registration.isolation == "strict"
        assert registration.memory_per_gpu_bytes == GIB

        # Two GiB on one GPU is more than its share; on the node's two GPUs it fits.
        large = await harness.submit(["true"], memory_bytes=2 * GIB)
        fits = await harness.cluster.submit(
            harness.token, command=["true"], gpus_per_node=2, memory_bytes=2 * GIB
        )
        await harness.reaches(int(fits["id"]), "COMPLETED")
        assert await harness.state(large) == "PENDING"
        explain = await harness.cluster.call("GET", f"/v1/jobs/{large}/explain", harness.token)
        (reason,) = explain["reasons"]
        assert reason["code"] == "BadConstraints", reason
        assert "no node gives a GPU more than 1.0 GiB" in reason["message"]
    finally:
        await harness.stop(agent)
        assert agent.runner.confinement.cgroups is not None
        agent.runner.confinement.cgroups.remove()
