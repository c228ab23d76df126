"""Interactive streams across server replicas: two servers on loopback sharing one PostgreSQL
database, the node's agent heartbeating to B while the CLI attaches through A, so that every
stream's agent side reaches a process that does not hold its user side and is relayed there
(api/relayhop.py). Also the walls: the relay route takes only the claiming replica's secret,
a node claims only its own streams, once; the per-job caps count every replica's streams; and
a holder that is gone ends the agent's stream cleanly and the CLI with one line; the per-user
and per-org stream bounds count every replica's streams."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from websockets.sync.client import connect

from api.app import create_app
from scheduler.db import Stream
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.metrics import PROCESS_REGISTRY
from scheduler.settings import Settings
from tests.agents.test_transport import Pki, pki  # noqa: F401 - the certificates
from tests.cli.test_interactive import REMOTE, Terminal, fairgpu
from tests.cli.test_interactive_streams import FakeAgent, _refused, _ws
from tests.conftest import run_async
from tests.harness.served import Served, seed_admin, serve_app, simulated_agent, wait_for

pytestmark = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
FAIRGPU = str(Path(sys.executable).parent / "fairgpu")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        migrate_on_start=False,
        cycle_interval_s=0.5,
        heartbeat_long_poll_s=1.0,
    )


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[tuple[Served, Served, str]]:
    """Replica A and replica B, in threads: each holds the user sides that reach it. A takes
    the hop on a relay port of its own (as the Kubernetes manifest sets it), B on its
    server's port (FAIRGPU_SERVER_RELAY_URL unset)."""
    token = seed_admin(database_url)
    relay_a = f"http://127.0.0.1:{_free_port()}"
    settings_a = _settings(database_url).model_copy(update={"server_relay_url": relay_a})
    with (
        serve_app(create_app(settings_a)) as url_a,
        serve_app(create_app(_settings(database_url))) as url_b,
    ):
        yield (
            Served(url=url_a, admin_token=token, config_dir=tmp_path / "a"),
            Served(url=url_b, admin_token=token, config_dir=tmp_path / "b"),
            relay_a,
        )


def _owner(served: Served) -> str:
    served.ok("org", "create", "acme")
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "2")
    made = served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json")
    return str(json.loads(made)["token"])


def _running_interactive_job(served: Served, owner: str, node: FakeAgent) -> dict[str, Any]:
    response = httpx.post(
        served.url + "/v1/jobs",
        json={"command": ["bash"], "gpus_per_node": 1, "time_limit": 600, "interactive": True},
        headers={"Authorization": f"Bearer {owner}"},
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    starts: list[dict[str, Any]] = []

    def started() -> bool:
        starts.extend(s for s in node.heartbeat(wait_s=1)["start"] if s["job_id"] == job_id)
        return bool(starts)

    wait_for(started)
    at = datetime.now(UTC).isoformat()
    report = {
        "task_id": starts[0]["task_id"],
        "job_id": job_id,
        "state": "running",
        "started_at": at,
    }
    node.heartbeat(tasks=[report])
    return {"job_id": job_id, "task_id": starts[0]["task_id"], "report": report}


def _streams_asked(node: FakeAgent, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The streams the node's heartbeat replies ask it to open, once they ask for any."""
    found: list[dict[str, Any]] = []

    def asked() -> bool:
        found.extend(node.heartbeat(tasks=[job["report"]]).get("streams", []))
        return bool(found)

    wait_for(asked)
    return found


def test_a_stream_held_by_a_reaches_the_agent_through_b(
    replicas: tuple[Served, Served, str], database_url: str
) -> None:
    a, b, relay_a = replicas
    # A and B share this process's registry; only a claiming process meters a hop (B here).
    hops, hop_to_job, hop_from_job = (
        _sample("fairgpu_interactive_hops_total", kind="attach"),
        _sample("fairgpu_interactive_hop_bytes_total", direction="to_job"),
        _sample("fairgpu_interactive_hop_bytes_total", direction="from_job"),
    )
    owner = _owner(a)
    node = FakeAgent(b, "n1")
    other = FakeAgent(b, "n2")
    job = _running_interactive_job(a, owner, node)

    with _ws(a, f"/v1/jobs/{job['job_id']}/attach", owner) as user:
        # B carries A's stream in n1's heartbeat replies (A told it through PostgreSQL).
        found = _streams_asked(node, job)
        assert [s["task_id"] for s in found] == [job["task_id"]]
        stream_id = found[0]["id"]
        relay = f"/v1/relay/streams/{stream_id}"
        # Nobody reaches the holder's relay route without the claimer's secret.
        relay_port = Served(url=relay_a, admin_token="", config_dir=Path())
        for token in (owner, node.credential, a.admin_token, "x" * 43):
            assert _refused(a, relay, token) == 404
            assert _refused(relay_port, relay, token) == 404
        path = f"/v1/agent/streams/{stream_id}"
        assert _refused(b, path, owner) == 404  # a user token
        assert _refused(b, path, other.credential) == 404  # another node
        assert _refused(a, path, other.credential) == 404
        with _ws(b, path, node.credential) as agent:  # B claims it and hops to A
            user.send(b"typed")
            assert agent.recv(timeout=10) == b"typed"
            user.send(json.dumps({"type": "resize", "rows": 5, "cols": 7}))
            assert json.loads(agent.recv(timeout=10)) == {"type": "resize", "rows": 5, "cols": 7}
            agent.send(b"printed")
            assert user.recv(timeout=10) == b"printed"
            # Claimed: the secret B chose is not for anybody else, nor a second claim.
            assert _refused(a, relay, node.credential) == 404
            assert _refused(a, path, node.credential) == 404
            assert _sample("fairgpu_interactive_hops_open", kind="attach") == 1
            agent.send(json.dumps({"type": "exit", "code": 7}))
            assert json.loads(user.recv(timeout=10)) == {"type": "exit", "code": 7}
    assert _refused(b, path, node.credential) == 404
    # B metered its end of the hop: one hop, the bytes each way (the holder, A, the stream).
    assert _sample("fairgpu_interactive_hops_total", kind="attach") == hops + 1
    assert _sample("fairgpu_interactive_hop_bytes_total", direction="to_job") == hop_to_job + 5
    assert _sample("fairgpu_interactive_hop_bytes_total", direction="from_job") == hop_from_job + 7
    wait_for(lambda: _sample("fairgpu_interactive_hops_open", kind="attach") == 0)
    wait_for(lambda: _stream_rows(database_url) == 0)  # the holder deleted its row


def _sample(name: str, **labels: str) -> float:
    return PROCESS_REGISTRY.get_sample_value(name, labels) or 0.0


def _stream_rows(database_url: str) -> int:
    async def count() -> int:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return len(list(await session.scalars(select(Stream))))
        finally:
            await engine.dispose()

    return run_async(count)


def test_the_caps_count_every_replicas_streams(
    replicas: tuple[Served, Served, str], database_url: str
) -> None:
    a, b, _ = replicas
    owner = _owner(a)
    node = FakeAgent(b, "n1")
    job = _running_interactive_job(a, owner, node)
    attach = f"/v1/jobs/{job['job_id']}/attach"
    with contextlib.ExitStack() as users:
        for i in range(8):
            users.enter_context(_ws(a if i % 2 else b, attach, owner))
        assert _stream_rows(database_url) == 8
        assert _refused(a, attach, owner) == 429  # 8 clients per terminal, four through each
        assert _refused(b, attach, owner) == 429


def test_the_per_user_and_per_org_bounds_count_every_replicas_streams(
    database_url: str, tmp_path: Path
) -> None:
    """Two replicas, each allowing a user 2 open streams and an org 3: a user spread over both
    still holds 2, and the org 3, not twice as many; one that leaves frees its place on the
    other replica."""
    token = seed_admin(database_url)
    bounds = {"max_streams_per_user": 2, "max_streams_per_org": 3}
    settings = _settings(database_url).model_copy(update=bounds)
    with (
        serve_app(create_app(settings)) as url_a,
        serve_app(create_app(settings)) as url_b,
    ):
        a = Served(url=url_a, admin_token=token, config_dir=tmp_path / "a")
        b = Served(url=url_b, admin_token=token, config_dir=tmp_path / "b")
        owner = _owner(a)
        made = a.ok(
            "user", "create", "bea", "--org", "acme", "--role", "org-admin", "--token", "-o", "json"
        )  # an org-admin may attach to ada's job
        colleague = str(json.loads(made)["token"])
        node = FakeAgent(b, "n1")
        attach = f"/v1/jobs/{_running_interactive_job(a, owner, node)['job_id']}/attach"
        with contextlib.ExitStack() as users:
            first = users.enter_context(_ws(a, attach, owner))
            users.enter_context(_ws(b, attach, owner))
            assert _refused(a, attach, owner) == 429  # yours: one here, one there
            assert _refused(b, attach, owner) == 429
            users.enter_context(_ws(b, attach, colleague))
            assert _refused(a, attach, colleague) == 429  # the org's 3, over both
            first.close()
            wait_for(lambda: _stream_rows(database_url) == 2)
            users.enter_context(_ws(b, attach, owner))


def test_a_holder_that_is_gone_refuses_the_agent_with_502(
    replicas: tuple[Served, Served, str], database_url: str
) -> None:
    a, b, _ = replicas
    owner = _owner(a)
    node = FakeAgent(b, "n1")
    job = _running_interactive_job(a, owner, node)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nobody listens there

    async def orphan() -> None:  # what a replica killed while its stream waited leaves
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                now = datetime.now(UTC)
                session.add(
                    Stream(
                        id="orphan" + "x" * 26,
                        job_id=job["job_id"],
                        task_id=job["task_id"],
                        node_id=1,
                        rank=0,
                        kind="attach",
                        holder_id="gone",
                        holder_url=gone,
                        expires_at=now + timedelta(seconds=30),
                        alive_at=now,
                    )  # fmt: skip
                )
                await session.commit()
        finally:
            await engine.dispose()

    run_async(orphan)
    assert _refused(b, "/v1/agent/streams/orphan" + "x" * 26, node.credential) == 502


def test_the_cli_attaches_through_a_while_the_agent_reports_to_b(
    replicas: tuple[Served, Served, str], tmp_path: Path
) -> None:
    a, b, _ = replicas
    owner = _owner(a)
    with simulated_agent(b, tmp_path):
        code, out, err = fairgpu(
            a, owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
            "bash", "-c", "stty size; echo gpus=$CUDA_VISIBLE_DEVICES; exit 3",
        )  # fmt: skip
    assert code == 3, (out, err)
    lines = out.replace("\r", "").splitlines()
    assert "31 97" in lines, out
    assert "gpus=0" in lines, out


def test_the_holder_killed_ends_the_cli_with_one_line_and_b_attaches_again(
    database_url: str, tmp_path: Path
) -> None:
    """Replica A as a real `fairgpu server` process, killed with SIGKILL mid-session."""
    token = seed_admin(database_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "FAIRGPU_DATABASE_URL": database_url,
        "FAIRGPU_MIGRATE_ON_START": "false",
        "FAIRGPU_CYCLE_INTERVAL_S": "0.5",
        "FAIRGPU_HEARTBEAT_LONG_POLL_S": "1",
    }
    holder = _server(tmp_path / "a.log", env, "--port", str(port))
    try:
        a = Served(url=f"http://127.0.0.1:{port}", admin_token=token, config_dir=tmp_path / "a")
        _wait_up(holder, a.url, tmp_path / "a.log")
        with serve_app(create_app(_settings(database_url))) as url_b:
            b = Served(url=url_b, admin_token=token, config_dir=tmp_path / "b")
            owner = _owner(b)
            with simulated_agent(b, tmp_path):
                run = Terminal.start(
                    a, owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
                    "python3", "-u", "-c", REMOTE, rows=30, cols=100,
                )  # fmt: skip
                job = run.expect(r"job (\d+) submitted")[1]
                run.expect(r"user=0")
                holder.send_signal(signal.SIGKILL)
                holder.wait(timeout=10)
                assert run.wait() == 255, run.seen
                tail = run.seen[run.read_upto :].replace("\r", "").strip().splitlines()
                assert len(tail) == 1, run.seen
                assert tail[0].startswith("fairgpu: "), run.seen
                # The job runs on; through B, its terminal is there again.
                again = Terminal.start(b, owner, "attach", job, rows=20, cols=90)
                again.expect(r"size=20x90")
                again.type(b"quit\r")
                assert again.wait() == 5, again.seen
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def _server(log: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """`fairgpu server ARGS` as a real process, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [FAIRGPU, "server", "--log-level", "warning", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_up(server: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Until the server answers (a loaded machine takes a while to start one)."""

    def up() -> bool:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout_s=120)


def test_the_workers_of_one_server_hand_streams_to_each_other(
    database_url: str, tmp_path: Path
) -> None:
    """`fairgpu server --workers 2`: the workers share the users' port, so the agent's side of
    a stream reaches the worker holding its user's side only half of the time; each worker's
    relay listener (api/relaylisten.py) takes the other half. Sessions go on until one has
    crossed between the workers (the claiming worker's hop counter on /metrics, summed over
    the workers, says so) and one has not: a broken hand-off fails the first that crosses,
    whichever session that is, instead of going unseen when all land on their holder."""
    token = seed_admin(database_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "FAIRGPU_DATABASE_URL": database_url,
        "FAIRGPU_MIGRATE_ON_START": "false",
        "FAIRGPU_CYCLE_INTERVAL_S": "0.5",
        "FAIRGPU_HEARTBEAT_LONG_POLL_S": "1",
    }
    server = _server(tmp_path / "server.log", env, "--port", str(port), "--workers", "2")
    try:
        served = Served(
            url=f"http://127.0.0.1:{port}", admin_token=token, config_dir=tmp_path / "cfg"
        )
        _wait_up(server, served.url, tmp_path / "server.log")
        owner = _owner(served)
        with simulated_agent(served, tmp_path):
            crossed = direct = 0
            for session in range(MAX_SESSIONS):
                hops = _scraped(served, "fairgpu_interactive_hops_total", 'kind="attach"')
                status = 3 + session % 100
                # The node's network (not a namespace per task): what is tested is the relay.
                code, out, err = fairgpu(
                    served, owner, "run", "--pty", "-G", "H100:1", "-t", "10m",
                    "--network", "host", "--",
                    "sh", "-c", f"echo session-{status}; exit {status}",
                )  # fmt: skip
                assert code == status, (out, err)
                assert f"session-{status}" in out
                if _scraped(served, "fairgpu_interactive_hops_total", 'kind="attach"') > hops:
                    crossed += 1
                else:
                    direct += 1
                if crossed and direct:
                    break
            # Each session lands on its holder half of the time: 2 in a billion runs go on
            # this long, and the count says so rather than passing without a hand-off.
            assert crossed, (crossed, direct)
            assert direct, (crossed, direct)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


MAX_SESSIONS = 30


def _scraped(served: Served, name: str, labels: str) -> float:
    """A counter on the server's /metrics (whichever worker answers sums them all)."""
    for line in httpx.get(served.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_the_hop_to_a_holder_on_https_checks_its_certificate(
    database_url: str,
    tmp_path: Path,
    pki: Pki,  # noqa: F811 - the fixture imported above
    trusted: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A holder serving HTTPS (its relay URL: the wss:// address the user's side reached)
    is reached over TLS, its certificate checked against the system's CAs (SSL_CERT_FILE):
    one the claiming replica cannot verify is no holder (502 to the agent)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca if trusted else pki.client_cert))
    token = seed_admin(database_url)
    with (
        serve_app(
            create_app(_settings(database_url)),
            ssl_certfile=str(pki.server_cert),
            ssl_keyfile=str(pki.server_key),
        ) as url_a,
        serve_app(create_app(_settings(database_url))) as url_b,
    ):
        b = Served(url=url_b, admin_token=token, config_dir=tmp_path / "b")
        owner = _owner(b)
        node = FakeAgent(b, "n1")
        job = _running_interactive_job(b, owner, node)
        user_side = connect(
            url_a.replace("https://", "wss://") + f"/v1/jobs/{job['job_id']}/attach",
            additional_headers={"Authorization": f"Bearer {owner}"},
            ssl=ssl.create_default_context(cafile=str(pki.ca)),
            open_timeout=10,
        )
        with user_side as user:
            found = _streams_asked(node, job)
            path = f"/v1/agent/streams/{found[0]['id']}"
            if not trusted:
                assert _refused(b, path, node.credential) == 502
                return
            with _ws(b, path, node.credential) as agent:
                user.send(b"over-tls")
                assert agent.recv(timeout=10) == b"over-tls"
                agent.send(json.dumps({"type": "exit", "code": 0}))
                assert json.loads(user.recv(timeout=10)) == {"type": "exit", "code": 0}
