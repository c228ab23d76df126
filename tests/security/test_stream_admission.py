"""A tenant flooding the WebSocket stream routes (attach, port-forward) or a node flooding the
agent's side: each opening is bounded per token before the token is looked up, per user and
per org after, and while it waits for its node; past a bound, 429 with Retry-After as the
handshake's answer, and another org's streams still open. Real server (uvicorn on loopback),
real WebSockets, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from typer.testing import CliRunner
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from api.admission import Admission
from api.app import create_app
from cli.main import app as cli_app
from protocol.agent import MAX_TASKS_PER_HEARTBEAT
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.services.streams import StreamHub
from scheduler.settings import Settings
from tests.cli.test_interactive_streams import FakeAgent
from tests.harness.served import Served, seed_admin, serve_app, wait_for


def _ws(url: str, path: str, token: str) -> ClientConnection:
    ws_url = url.replace("http://", "ws://") + path
    return connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10)


def _refusal(url: str, path: str, token: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    with pytest.raises(InvalidStatus) as refused:
        _ws(url, path, token)
    response = refused.value.response
    body = json.loads(response.body or b"{}")
    assert body["status"] == response.status_code  # a problem (RFC 9457)
    return response.status_code, body, {k.lower(): v for k, v in response.headers.raw_items()}


@dataclass
class Pool:
    served: Served
    node: FakeAgent
    tokens: dict[str, str]
    jobs: dict[str, int]
    reports: list[dict[str, Any]]

    def attach(self, who: str, job: str) -> ClientConnection:
        return _ws(self.served.url, f"/v1/jobs/{self.jobs[job]}/attach", self.tokens[who])

    def streams_of(self, job: str) -> list[dict[str, Any]]:
        """The streams the node is asked to open into `job`'s task."""
        task = next(r["task_id"] for r in self.reports if r["job_id"] == self.jobs[job])
        streams = self.node.heartbeat(tasks=self.reports)["streams"]
        return [s for s in streams if s["task_id"] == task]


def _pool(served: Served) -> Pool:
    """Two orgs, a user each (two in acme), one node, one running interactive job per org."""
    served.ok("org", "create", "acme")
    served.ok("org", "create", "rival")
    for org in ("acme", "rival"):
        served.ok("quota", "set", org, "--gpu-type", "H100", "--guaranteed", "1")
    tokens = {}
    for name, org in (("ada", "acme"), ("bob", "acme"), ("eve", "rival")):
        out = served.ok("user", "create", name, "--org", org, "--token", "-o", "json")
        tokens[name] = json.loads(out)["token"]
    node = FakeAgent(served, "n1", gpus=2)
    jobs = {}
    for who in ("ada", "eve"):
        response = httpx.post(
            served.url + "/v1/jobs",
            json={"command": ["bash"], "gpus_per_node": 1, "time_limit": 600, "interactive": True},
            headers={"Authorization": f"Bearer {tokens[who]}"},
        )
        assert response.status_code == 201, response.text
        jobs[who] = response.json()["id"]
    starts: dict[int, dict[str, Any]] = {}

    def started() -> bool:
        for spec in node.heartbeat(wait_s=1)["start"]:
            starts[spec["job_id"]] = spec
        return len(starts) == 2

    wait_for(started)
    at = datetime.now(UTC).isoformat()
    reports = [
        {"task_id": s["task_id"], "job_id": j, "state": "running", "started_at": at}
        for j, s in starts.items()
    ]
    node.heartbeat(tasks=reports)
    return Pool(served, node, tokens, jobs, reports)


@pytest.fixture
def limited(database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pool]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = Settings(
        database_url=database_url,
        migrate_on_start=False,
        cycle_interval_s=0.5,
        **{"heartbeat_long_poll_s": 1.0, **overrides},
    )
    token = seed_admin(database_url)
    with serve_app(create_app(settings)) as url:
        yield _pool(Served(url=url, admin_token=token, config_dir=tmp_path / "config"))


# A token's burst of 3 openings, refilled one per 1000 s: the fourth is refused.
@pytest.mark.parametrize(
    "limited", [{"stream_rate_per_s": 0.001, "stream_burst": 3}], indirect=True
)
def test_a_token_flooding_attach_gets_429_before_any_lookup(limited: Pool) -> None:
    url, path = limited.served.url, f"/v1/jobs/{limited.jobs['ada']}/attach"
    for _ in range(3):
        with limited.attach("ada", "ada"):
            pass
    status, body, headers = _refusal(url, path, limited.tokens["ada"])
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    assert "streams per second" in body["detail"]
    assert body["retry_after_s"] >= 1
    # Refused before the token is looked up: a made-up token pays from its own bucket alike.
    for _ in range(3):
        assert _refusal(url, path, "made-up")[0] == 401
    assert _refusal(url, path, "made-up")[0] == 429
    # Another org's user has a bucket of its own.
    with limited.attach("eve", "eve"):
        pass


# The org may open 3 streams at once and one per 1000 s after; each user has plenty.
@pytest.mark.parametrize(
    "limited", [{"org_stream_rate_per_s": 0.001, "org_stream_burst": 3}], indirect=True
)
def test_one_orgs_flood_does_not_starve_another_orgs_attach(limited: Pool) -> None:
    url, path = limited.served.url, f"/v1/jobs/{limited.jobs['ada']}/attach"
    with limited.attach("ada", "ada"), limited.attach("ada", "ada"):
        pass
    # A colleague who may not attach (403) has still spent one of the org's openings.
    assert _refusal(url, path, limited.tokens["bob"])[0] == 403
    status, body, headers = _refusal(url, path, limited.tokens["ada"])
    assert status == 429
    assert "users of this org" in body["detail"]
    assert int(headers["retry-after"]) >= 1
    # rival's user attaches, and its terminal is relayed as before the flood.
    with limited.attach("eve", "eve") as user:
        streams = limited.streams_of("eve")
        assert len(streams) == 1
        with _ws(url, f"/v1/agent/streams/{streams[0]['id']}", limited.node.credential) as agent:
            user.send(b"typed")
            assert agent.recv(timeout=10) == b"typed"


@pytest.mark.parametrize("limited", [{"max_pending_streams_per_job": 3}], indirect=True)
def test_streams_waiting_for_their_node_are_bounded_per_job(limited: Pool) -> None:
    url, path = limited.served.url, f"/v1/jobs/{limited.jobs['ada']}/attach"
    with ExitStack() as held:
        for _ in range(3):
            held.enter_context(limited.attach("ada", "ada"))
        status, body, _ = _refusal(url, path, limited.tokens["ada"])
        assert status == 429
        assert "wait for its node" in body["detail"]
        # Another org's job on the same node: its stream is admitted and reaches the node.
        with limited.attach("eve", "eve"):
            assert len(limited.streams_of("eve")) == 1
        # Once the node has opened its sides, the job's streams no longer wait.
        for stream in limited.streams_of("ada"):
            held.enter_context(
                _ws(url, f"/v1/agent/streams/{stream['id']}", limited.node.credential)
            )

        def admitted() -> bool:
            try:
                held.enter_context(limited.attach("ada", "ada"))
            except InvalidStatus:
                return False
            return True

        wait_for(admitted)


@pytest.mark.parametrize("limited", [{"max_streams_per_user": 2}], indirect=True)
def test_open_streams_are_bounded_per_user_and_the_cli_says_so_in_one_line(
    limited: Pool,
) -> None:
    with limited.attach("ada", "ada"), limited.attach("ada", "ada"):
        status, body, _ = _refusal(
            limited.served.url, f"/v1/jobs/{limited.jobs['ada']}/attach", limited.tokens["ada"]
        )
        assert status == 429
        assert "streams of yours are open" in body["detail"]
        env = limited.served.env(limited.tokens["ada"])
        result = CliRunner().invoke(
            cli_app, ["attach", str(limited.jobs["ada"])], env={**env, "FAIRGPU_RETRY_MAX_S": "0"}
        )
        assert result.exit_code != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "streams of yours are open" in lines[0]
        assert "Traceback" not in result.output
        # Given time, the CLI waits as the server says (one line each), then gives up.
        result = CliRunner().invoke(
            cli_app, ["attach", str(limited.jobs["ada"])], env={**env, "FAIRGPU_RETRY_MAX_S": "2"}
        )
        assert result.exit_code != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 3, result.stderr
        assert all("server busy (HTTP 429)" in line for line in lines[:2])
        assert "retrying in 1 s" in lines[0]
        assert "streams of yours are open" in lines[2]


@pytest.mark.parametrize(
    "limited", [{"agent_stream_rate_per_s": 0.001, "agent_stream_burst": 3}], indirect=True
)
def test_a_node_flooding_its_side_of_streams_is_bounded_before_lookup(limited: Pool) -> None:
    url = limited.served.url
    for _ in range(3):
        assert _refusal(url, "/v1/agent/streams/" + "x" * 32, limited.node.credential)[0] == 404
    status, _, headers = _refusal(url, "/v1/agent/streams/" + "x" * 32, limited.node.credential)
    assert status == 429
    assert int(headers["retry-after"]) >= 1


@pytest.mark.parametrize("limited", [{"heartbeat_long_poll_s": 30.0}], indirect=True)
def test_a_stream_already_sent_does_not_end_the_nodes_next_poll(limited: Pool) -> None:
    """Once a reply has carried acme's stream, the node's next poll is held as usual: rival's
    attach a moment later comes with that poll. (When any waiting stream ended the hold, the
    poll came straight back with acme's stream alone, and the agent then waited out its
    heartbeat interval: one tenant's attaching delayed another's by up to an interval.)"""
    eve_task = next(r["task_id"] for r in limited.reports if r["job_id"] == limited.jobs["eve"])
    with limited.attach("ada", "ada"):
        assert len(limited.streams_of("ada")) == 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            poll = pool.submit(limited.node.heartbeat, tasks=limited.reports, wait_s=25)
            time.sleep(0.5)  # the poll reaches the server first (were it later, it holds too)
            with limited.attach("eve", "eve"):
                reply = poll.result(timeout=60)
    assert eve_task in {s["task_id"] for s in reply["streams"]}


def test_a_hub_hands_a_stream_as_news_once() -> None:
    hub = StreamHub(async_sessionmaker())  # the waiting streams are in memory: no database
    first, second = "acme-stream-" + "1" * 20, "rival-stream-" + "2" * 20
    news = {"op": "open", "node": 5, "job": 1, "id": first, "task_id": 10, "kind": "attach"}
    assert hub.heard(json.dumps(news)) == [5]
    assert hub.has_news(5)
    assert [s.id for s in hub.for_node(5)] == [first]
    assert not hub.has_news(5)
    assert [s.id for s in hub.for_node(5)] == [first]  # still asked for until claimed
    assert hub.heard(json.dumps({**news, "id": second, "job": 2, "task_id": 20})) == [5]
    assert hub.has_news(5)
    assert not hub.has_news(6)


async def test_a_hub_resynced_from_the_rows_forgets_what_it_had_handed(
    database_url: str,
) -> None:
    """A stream handed and then missed as news (its end came while the channel was down) is
    gone from the rows: the resync forgets it whole, not only from the waiting ones."""
    engine = make_engine(database_url)
    try:
        hub = StreamHub(make_sessionmaker(engine))
        news = {"op": "open", "node": 5, "job": 1, "id": "s" * 32, "task_id": 10}
        hub.heard(json.dumps({**news, "kind": "attach"}))
        assert len(hub.for_node(5)) == 1
        assert await hub.resync() == []
        assert not hub._handed  # noqa: SLF001 - memory no public call shows
    finally:
        await engine.dispose()


def test_a_hub_flooded_by_one_job_still_asks_for_every_other_jobs_streams() -> None:
    hub = StreamHub(async_sessionmaker())  # the waiting streams are in memory: no database

    def waiting(stream_id: str, job_id: int, kind: str) -> None:
        news = {"op": "open", "node": 5, "job": job_id, "id": stream_id, "task_id": job_id * 10}
        assert hub.heard(json.dumps({**news, "kind": kind, "port": 80})) == [5]

    for i in range(MAX_TASKS_PER_HEARTBEAT + 50):
        waiting(f"flood-{i:04d}-of-job-one", 1, "port")
    waiting("the-other-jobs-stream", 2, "attach")
    asked = hub.for_node(5)
    assert len(asked) == MAX_TASKS_PER_HEARTBEAT
    assert "the-other-jobs-stream" in {s.id for s in asked}


def test_without_the_denial_extension_a_refusal_is_a_close_with_its_reason() -> None:
    admission = Admission(Settings(stream_rate_per_s=0.001, stream_burst=1))
    scope = {
        "type": "websocket",
        "path": "/v1/jobs/1/attach",
        "query_string": b"",
        "headers": [(b"authorization", b"Bearer abc")],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    async def run() -> tuple[bool, bool]:
        return (
            await admission.admit_websocket(scope, receive, send),
            await admission.admit_websocket(scope, receive, send),
        )

    assert asyncio.run(run()) == (True, False)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == 1013
    assert sent[1]["reason"].startswith("more than 0.001 streams per second")
    assert len(sent[1]["reason"].encode()) <= 123


@pytest.mark.parametrize("rank", ["-1", str(2**31), str(2**63), "99999999999999999999999"])
def test_a_rank_beyond_any_column_is_a_clear_refusal(limited: Pool, rank: str) -> None:
    url, job = limited.served.url, limited.jobs["ada"]
    for path in (
        f"/v1/jobs/{job}/attach?rank={rank}",
        f"/v1/jobs/{job}/forward?port=80&rank={rank}",
    ):
        status, body, _ = _refusal(url, path, limited.tokens["ada"])
        assert status in (409, 422), body
        assert "rank" in body["detail"]


def test_a_streams_bad_path_or_query_is_a_422_problem(limited: Pool) -> None:
    """Not the bare 403 ("forbidden") a failed parameter gave, nor a job other than the one
    named: `0_7` (an array's element) was read as job 7, `1e3` refused as forbidden."""
    url, job, token = limited.served.url, limited.jobs["ada"], limited.tokens["ada"]
    for path in (
        f"/v1/jobs/{job}/attach?rank=abc",
        f"/v1/jobs/{job}/forward",
        f"/v1/jobs/{job}/forward?port=80&rank=x",
        "/v1/jobs/1e3/attach",
        "/v1/jobs/-1/forward?port=80",
    ):
        status, body, _ = _refusal(url, path, token)
        assert status == 422, (path, body)
        assert body["errors"], path
    for path in (f"/v1/jobs/0_{job}/attach", f"/v1/jobs/0_{job}/forward?port=80"):
        status, body, _ = _refusal(url, path, token)
        assert status == 404, (path, body)
        assert f"job 0_{job} not found" in body["detail"]


@pytest.mark.parametrize("limited", [{"max_streams_per_process": 2}], indirect=True)
def test_a_process_holds_a_bounded_number_of_streams_of_all_orgs(limited: Pool) -> None:
    """Each org within its own bounds, their sum still stops at the process's; the node's
    sides of the streams it holds are bounded apart, so they still come."""
    url = limited.served.url
    with limited.attach("ada", "ada") as ada, limited.attach("eve", "eve"):
        status, body, headers = _refusal(
            url, f"/v1/jobs/{limited.jobs['ada']}/attach", limited.tokens["bob"]
        )
        assert status == 429
        assert "of every org together" in body["detail"]
        assert body["limit"] == 2
        assert headers["retry-after"] == "1"
        (stream,) = limited.streams_of("ada")
        with _ws(url, f"/v1/agent/streams/{stream['id']}", limited.node.credential) as agent:
            ada.send(b"typed")
            assert agent.recv(timeout=10) == b"typed"

    def admitted() -> bool:  # the places are free again once the server has seen them leave
        try:
            with limited.attach("eve", "eve"):
                return True
        except InvalidStatus as refused:
            if refused.response.status_code != 429:
                raise
            return False

    wait_for(admitted)


@pytest.mark.parametrize("limited", [{"max_pending_streams_per_user": 1}], indirect=True)
def test_a_user_who_leaves_while_waiting_frees_their_place_at_once(
    limited: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node never comes, and the server would wait an hour for it: the user's second
    attach gets the one waiting place only because the first one's leaving gave it back. What a
    user sends before the node's side comes (a resize, keystrokes) reaches it."""
    monkeypatch.setattr("api.routers.streams.AGENT_WAIT_S", 3600.0)  # the server's thread
    with limited.attach("ada", "ada"):
        pass

    def admitted() -> bool:
        try:
            with limited.attach("ada", "ada") as second:
                second.send(b"early")
                (stream,) = limited.streams_of("ada")
                agent_path = f"/v1/agent/streams/{stream['id']}"
                with _ws(limited.served.url, agent_path, limited.node.credential) as agent:
                    assert agent.recv(timeout=10) == b"early"
        except InvalidStatus as refused:
            if refused.response.status_code != 429:
                raise
            return False
        return True

    wait_for(admitted)


def test_what_a_user_said_before_leaving_still_reaches_the_node(
    limited: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --jupyter` attaches, says the window size (which starts the terminal's program) and
    leaves at once: the stream waits on for the node's side, which hears it."""
    monkeypatch.setattr("api.routers.streams.AGENT_WAIT_S", 3600.0)  # the server's thread
    resize = json.dumps({"type": "resize", "rows": 5, "cols": 7})
    with limited.attach("ada", "ada") as said:
        said.send(resize)
    (stream,) = limited.streams_of("ada")
    path = f"/v1/agent/streams/{stream['id']}"
    with _ws(limited.served.url, path, limited.node.credential) as agent:
        assert agent.recv(timeout=10) == resize
