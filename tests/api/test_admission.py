"""What a request must pass before its body is read (api/admission.py): the agent protocol's
bearer, and the per-token rate limits on submissions and heartbeats, on the ordinary routes and
the hot paths alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from api.admission import TokenBuckets
from tests.scheduling.harness import Cluster, fast_settings, running_cluster

HOT = [pytest.param(False, id="routed"), pytest.param(True, id="hot")]
CHUNK = b"x" * (64 * 1024)


def _skip_hot_on_sqlite(hot: bool, database_url: str) -> None:
    if hot and "postgresql" not in database_url:
        pytest.skip("the direct routes (api/direct.py) exist only on PostgreSQL")


def _retry_after(r: Any) -> int:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return int(r.headers["retry-after"])


async def _post(cluster: Cluster, path: str, token: str, body: Any) -> Any:
    return await cluster.http.post(path, json=body, headers={"Authorization": f"Bearer {token}"})


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    buckets = TokenBuckets(rate_per_s=2.0, burst=3)
    assert [buckets.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", now=0.0) == pytest.approx(0.5)
    assert buckets.take("b", now=0.0) == 0.0  # each token its own bucket
    assert buckets.take("a", now=0.5) == 0.0
    assert TokenBuckets(rate_per_s=0.0, burst=1).take("a", now=0.0) == 0.0  # 0: no limit


def test_an_agent_at_its_cadence_never_meets_the_default_heartbeat_limit() -> None:
    """Default settings: a busy node whose short tasks start and end all the time (a heartbeat
    every 0.2 s for an hour) and a restart's catch-up after it are never refused."""
    settings = fast_settings("sqlite:///unused.db")
    buckets = TokenBuckets(settings.heartbeat_rate_per_s, settings.heartbeat_burst)
    now = 0.0
    for _ in range(5 * 3600):
        assert buckets.take("node", now=now) == 0.0
        now += 0.2
    burst = [buckets.take("node", now=now) for _ in range(150)]  # a restart's catch-up
    assert burst == [0.0] * 150


@pytest.mark.parametrize("hot", HOT)
async def test_submissions_past_the_rate_are_429_with_retry_after(
    database_url: str, hot: bool
) -> None:
    _skip_hot_on_sqlite(hot, database_url)
    settings = fast_settings(database_url, hot_paths=hot, submit_rate_per_s=0.5, submit_burst=3)
    async with running_cluster(settings) as cluster:
        org = await cluster.org()
        user, other = await cluster.user_token(org), await cluster.user_token(org)
        body = {"command": ["x"], "time_limit": 60}
        codes = [(await _post(cluster, "/v1/jobs", user, body)).status_code for _ in range(3)]
        assert codes == [201, 201, 201]
        refused = await _post(cluster, "/v1/jobs", user, body)
        assert _retry_after(refused) == 2
        problem = refused.json()
        assert (problem["rate_per_s"], problem["burst"], problem["retry_after_s"]) == (0.5, 3, 2)
        assert "submissions per second" in problem["detail"]
        assert (await _post(cluster, "/v1/jobs", other, body)).status_code == 201


async def test_an_array_counts_as_its_jobs_against_the_submission_rate(
    database_url: str,
) -> None:
    settings = fast_settings(database_url, submit_rate_per_s=0.1, submit_burst=10)
    async with running_cluster(settings) as cluster:
        org = await cluster.org()
        user, other = await cluster.user_token(org), await cluster.user_token(org)
        array = {"command": ["x"], "time_limit": 60, "array": "0-5"}
        assert (await _post(cluster, "/v1/jobs", user, array)).status_code == 201  # 6 of 10
        refused = await _post(cluster, "/v1/jobs", user, array)  # 6 more: over the burst
        assert refused.status_code == 429
        assert _retry_after(refused) >= 2
        assert "an array of 6 jobs counts as 6 submissions" in refused.json()["detail"]
        assert (await _post(cluster, "/v1/jobs", user, {**array, "array": "0"})).status_code == 201
        # One array larger than the burst still passes from a full bucket, and empties it.
        assert (
            await _post(cluster, "/v1/jobs", other, {**array, "array": "0-99"})
        ).status_code == 201
        assert (await _post(cluster, "/v1/jobs", other, {**array, "array": "0"})).status_code == 429
        listed = (await cluster.call("GET", "/v1/jobs?limit=500", user))["data"]
        assert len(listed) == 6 + 1 + 100  # the refused array stored nothing


@pytest.mark.parametrize("hot", HOT)
async def test_heartbeats_past_the_rate_are_429(database_url: str, hot: bool) -> None:
    _skip_hot_on_sqlite(hot, database_url)
    settings = fast_settings(
        database_url, hot_paths=hot, heartbeat_rate_per_s=0.25, heartbeat_burst=4
    )
    async with running_cluster(settings) as cluster:
        node = await cluster.register(await cluster.join_token(), gpus=1)
        cred = node["credential"]
        for _ in range(4):
            assert (await _post(cluster, "/v1/agent/heartbeat", cred, {})).status_code == 200
        refused = await _post(cluster, "/v1/agent/heartbeat", cred, {"wait_s": 5})
        # One heartbeat's worth at 0.25/s is 4 s, less what the four took to send (3 once at a
        # slow moment): never the long poll's 5 s, never 0.
        assert 1 <= _retry_after(refused) <= 4
        assert "heartbeats per second" in refused.json()["detail"]
        # An agent's reads about its tasks count against the same rate.
        read = await cluster.http.get(
            "/v1/agent/tasks/1/job-gpu-use", headers={"Authorization": f"Bearer {cred}"}
        )
        assert read.status_code == 429, read.text


class Streamed:
    """A large body sent in chunks without a Content-Length; counts what the server pulled."""

    def __init__(self, size_bytes: int) -> None:
        self.chunks = size_bytes // len(CHUNK)
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield CHUNK


@pytest.mark.parametrize("hot", HOT)
async def test_the_agent_protocol_refuses_a_stranger_before_reading_its_body(
    database_url: str, hot: bool
) -> None:
    _skip_hot_on_sqlite(hot, database_url)
    async with running_cluster(fast_settings(database_url, hot_paths=hot)) as cluster:
        user = await cluster.user_token(await cluster.org())
        node = await cluster.register(await cluster.join_token(), gpus=1)
        cases = [
            ("/v1/agent/heartbeat", None, 401),
            ("/v1/agent/heartbeat", "fg_a_not-a-token", 401),
            ("/v1/agent/heartbeat", user, 403),
            ("/v1/agent/register", None, 401),
            ("/v1/agent/register", "fg_j_not-a-token", 401),
        ]
        for path, token, status in cases:
            body = Streamed(40 * 1024 * 1024)
            headers = {"Content-Type": "application/json"}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            r = await cluster.http.post(path, content=body, headers=headers)
            assert r.status_code == status, (path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert body.pulled <= 1, (path, body.pulled)  # 40 MiB offered, none read

        # A live agent credential's large body is read (and still bound by the 32 MiB limit).
        body = Streamed(40 * 1024 * 1024)
        r = await cluster.http.post(
            "/v1/agent/heartbeat",
            content=body,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {node['credential']}",
            },
        )
        assert r.status_code == 413, r.text
        assert body.pulled > 1
        # An ordinary heartbeat (small, with its length) pays nothing more and is answered.
        assert (await cluster.heartbeat(node["credential"]))["heartbeat_interval_s"] > 0
