"""Server and database faults on a private PostgreSQL instance (never the shared one): a server
killed mid-cycle, PostgreSQL restarted under load, and leader failover between two replicas.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from scheduler.bench.procs import PgInstance, wait_for
from tests.conftest import run_async
from tests.faults.helpers import assert_invariants, fleet, setup_org


@pytest.fixture(scope="module")
def pg() -> Iterator[PgInstance]:
    instance = PgInstance()
    instance.start()
    yield instance
    instance.destroy()


def _database(pg: PgInstance) -> str:
    return pg.create_database(f"faults_{uuid.uuid4().hex[:8]}")


def test_server_sigkill_mid_cycle_leaves_no_half_applied_decision(
    tmp_path: Path, pg: PgInstance
) -> None:
    sigkill_mid_cycle(tmp_path, pg, kills=2)


def sigkill_mid_cycle(tmp_path: Path, pg: PgInstance, *, kills: int) -> None:
    """Bursts of submissions, each followed by a SIGKILL at a random moment of the cycles they
    wake; the database is checked while the server is dead, then it restarts on the same port."""
    db = _database(pg)
    rng = random.Random(7)
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        port = int(f.server().rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}"
        org = stack.enter_context(setup_org(url, f.bootstrap(), tmp_path / "pids"))
        for name in ("n1", "n2"):
            f.agent(name, url, org.join_token, gpus="8xH100")
        wait_for("nodes", lambda: org.node_state("n1") == org.node_state("n2") == "ready", 30)
        submitted: list[int] = []
        for kill in range(kills):
            # A burst of submissions (each one wakes the cycle), then a kill at a random moment.
            for _ in range(12):
                gpus, nodes = rng.choice([(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)])
                cmd = ["sleep", str(rng.choice([1, 2, 3]))]
                submitted.append(
                    org.submit(command=cmd, gpus_per_node=gpus, nodes=nodes, preemptible=True)
                )
            time.sleep(rng.uniform(0.0, 0.6))
            f.procs["server"].kill()
            report = assert_invariants(db)  # read while the server is dead: what it left
            assert report.checked["jobs"] == len(submitted), (kill, report.checked)
            f.server(port=port)
        org.wait_states(submitted, {"COMPLETED"}, timeout_s=150)
        assert_invariants(db)


def test_postgres_restart_under_load(tmp_path: Path, pg: PgInstance) -> None:
    """503 + Retry-After while the database is away; retries with the same Idempotency-Key
    create each job exactly once; the server recovers without a restart."""
    db = _database(pg)
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        url = f.server()
        org = stack.enter_context(setup_org(url, f.bootstrap(), tmp_path / "pids"))
        token = org.member.headers["Authorization"]
        statuses: Counter[str] = Counter()
        retry_after: set[str] = set()
        ids: dict[str, set[int]] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def client_loop(worker: int) -> None:
            with httpx.Client(base_url=url, headers={"Authorization": token}, timeout=10) as c:
                n = 0
                while not stop.is_set():
                    key = f"w{worker}-{n}"
                    n += 1
                    while True:  # retry the same key until the server answers for good
                        try:
                            r = c.post(
                                "/v1/jobs",
                                json={"command": ["true"], "time_limit": 60, "hold": True},
                                headers={"Idempotency-Key": key},
                            )
                        except httpx.TransportError as exc:
                            with lock:
                                statuses[type(exc).__name__] += 1
                            time.sleep(0.2)
                            continue
                        with lock:
                            statuses[str(r.status_code)] += 1
                            if r.status_code == 503:
                                retry_after.add(r.headers.get("retry-after", ""))
                            if r.status_code in (200, 201):
                                ids.setdefault(key, set()).add(r.json()["id"])
                        if r.status_code in (200, 201):
                            break
                        time.sleep(0.2)

        workers = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        try:
            time.sleep(2)
            pg.stop("fast")
            time.sleep(4)
            during = dict(statuses)
            pg.start()
            wait_for("ready again", lambda: httpx.get(f"{url}/readyz").status_code == 200, 30)
            time.sleep(2)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=60)
        assert statuses["503"] > 0, statuses
        assert retry_after, statuses
        assert "" not in retry_after, retry_after
        assert not [s for s in statuses if s.startswith("5") and s != "503"], statuses
        assert all(len(v) == 1 for v in ids.values()), "a key made two jobs"
        assert f.procs["server"].alive()

        async def count_jobs() -> int:
            import asyncpg

            conn = await asyncpg.connect(db)
            try:
                n: int = await conn.fetchval("SELECT count(*) FROM jobs")
                return n
            finally:
                await conn.close()

        assert run_async(count_jobs) == len(ids), "every key made exactly one job"
        print(f"statuses during the outage: {during}; in all: {dict(statuses)}")
        assert_invariants(db)


def _leaders(urls: list[str]) -> list[str]:
    out = []
    for u in urls:
        try:
            r = httpx.get(f"{u}/readyz", timeout=2)
        except httpx.TransportError:
            continue
        if r.status_code == 200 and r.json().get("scheduler_leader"):
            out.append(u)
    return out


def test_leader_failover_between_two_replicas(tmp_path: Path, pg: PgInstance) -> None:
    db = _database(pg)
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        a = f.server("server-a")
        b = f.server("server-b")
        org = stack.enter_context(setup_org(a, f.bootstrap(), tmp_path / "pids"))
        f.agent("n1", b, org.join_token)
        wait_for("node ready", lambda: org.node_state("n1") == "ready", 30)
        wait_for("a leader", lambda: _leaders([a, b]), 15)
        for _ in range(5):  # exactly one, steadily
            assert len(_leaders([a, b])) == 1
            time.sleep(0.3)
        first = org.submit(command=["sleep", "1"])
        org.wait_states([first], {"COMPLETED"}, timeout_s=30)

        leader = _leaders([a, b])[0]
        standby = b if leader == a else a
        f.procs["server-a" if leader == a else "server-b"].kill()
        killed_at = time.monotonic()
        wait_for("standby takes over", lambda: _leaders([standby]), 15, interval_s=0.1)
        takeover_s = time.monotonic() - killed_at
        assert takeover_s <= 5 + 2, f"took {takeover_s:.1f} s, lease timeout 5 s"
        org.member.base_url = httpx.URL(standby)
        org.admin.base_url = httpx.URL(standby)
        if leader == b:  # the agent spoke to the dead replica: point it at the survivor
            f.procs["n1"].terminate()
            f.agent("n1", standby, org.join_token)
        second = org.submit(command=["sleep", "1"])
        org.wait_states([second], {"COMPLETED"}, timeout_s=40)
        print(f"takeover in {takeover_s:.2f} s")
        assert_invariants(db)


def test_frozen_leader_loses_its_lease_and_is_fenced(tmp_path: Path, pg: PgInstance) -> None:
    """The leader is frozen (SIGSTOP) and its lock connection dropped, as when a host stalls
    and the network drops its sessions: the standby takes over; when the old leader thaws it
    must not lead again beside the new one, nor apply what it decided before."""
    db = _database(pg)
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        a = f.server("server-a")
        b = f.server("server-b")
        org = stack.enter_context(setup_org(b, f.bootstrap(), tmp_path / "pids"))
        leader = wait_for("a leader", lambda: _leaders([a, b]), 15)[0]
        standby = b if leader == a else a
        old = f.procs["server-a" if leader == a else "server-b"]
        org.member.base_url = org.admin.base_url = httpx.URL(standby)
        f.agent("n1", standby, org.join_token, gpus="8xH100")
        wait_for("node ready", lambda: org.node_state("n1") == "ready", 30)
        jobs = [org.submit(command=["sleep", "2"], gpus_per_node=2) for _ in range(4)]

        old.popen.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            _terminate_lock_holders(pg, db)
            wait_for("standby takes over", lambda: _leaders([standby]), 15, interval_s=0.1)
            jobs += [org.submit(command=["sleep", "2"], gpus_per_node=2) for _ in range(4)]
        finally:
            old.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        for _ in range(30):  # never two leaders once the old one runs again
            assert len(_leaders([a, b])) <= 1, "two replicas lead at once"
            time.sleep(0.2)
        assert _leaders([a, b]) == [standby]
        org.wait_states(jobs, {"COMPLETED"}, timeout_s=90)
        assert_invariants(db)


def _terminate_lock_holders(pg: PgInstance, db: str) -> None:
    """Drop the connections holding advisory locks in `db`: the frozen leader's lease."""

    async def terminate() -> int:
        import asyncpg

        conn = await asyncpg.connect(pg.url())
        try:
            rows = await conn.fetch(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = $1",
                db.rsplit("/", 1)[1],
            )
            return len(rows)
        finally:
            await conn.close()

    assert run_async(terminate) >= 1
