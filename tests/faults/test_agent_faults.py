"""An agent killed with SIGKILL, and an agent cut off from the server for longer than the node
timeout (a cuttable TCP proxy between them: no root, no namespaces): the node goes down, its
tasks end NODE_FAIL and preemptible jobs requeue; when the agent is back its stale processes are
stopped, and no job ever has two live processes.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from scheduler.bench.procs import wait_for
from scheduler.bench.proxy import CuttableProxy
from tests.faults.helpers import Org, assert_invariants, fleet, settle, setup_org

NODE_DOWN_S = 20.0  # node timeout 5 s + cycles, on a busy two-core machine


def _start_jobs(org: Org) -> tuple[list[int], int]:
    requeued = [org.tracked(preemptible=True) for _ in range(2)]
    failing = org.tracked(preemptible=False)
    org.wait_states([*requeued, failing], {"RUNNING"}, timeout_s=40)
    wait_for("every job's process", lambda: all(org.live_pids(j) for j in [*requeued, failing]), 20)
    return requeued, failing


def _after_node_loss(org: Org, requeued: list[int], failing: int) -> None:
    org.wait_states([failing], {"NODE_FAIL"}, timeout_s=NODE_DOWN_S)
    for job_id in requeued:
        job = org.job(job_id)
        assert job["requeue_count"] >= 1, job


def _never_duplicated(org: Org, ids: list[int]) -> None:
    """Over a few seconds of sampling, no job ever has two live processes at once."""
    for _ in range(10):
        for job_id in ids:
            assert len(org.live_pids(job_id)) <= 1, (job_id, org.pids(job_id))
        settle(0.3)


def test_agent_sigkill_then_restart(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fairgpu.db'}"
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        url = f.server()
        org = stack.enter_context(setup_org(url, f.bootstrap(), tmp_path / "pids"))
        agent = f.agent("n1", url, org.join_token)
        wait_for("node ready", lambda: org.node_state("n1") == "ready", 30)
        requeued, failing = _start_jobs(org)
        old = {j: org.live_pids(j)[0] for j in [*requeued, failing]}

        agent.kill()
        wait_for("node down", lambda: org.node_state("n1") == "down", NODE_DOWN_S)
        _after_node_loss(org, requeued, failing)
        assert_invariants(db)

        f.agent("n1", url, org.join_token)  # same state dir: it finds its orphans
        wait_for("node ready again", lambda: org.node_state("n1") == "ready", 30)
        org.wait_states(requeued, {"RUNNING"}, timeout_s=40)
        wait_for(
            "old processes stopped",
            lambda: not any(org.live_pids(j) and old[j] in org.live_pids(j) for j in old),
            30,
        )
        _never_duplicated(org, [*requeued, failing])
        assert not org.live_pids(failing)
        wait_for("requeued jobs run again", lambda: all(org.live_pids(j) for j in requeued), 20)
        assert_invariants(db)


def test_network_cut_longer_than_node_timeout(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fairgpu.db'}"
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        url = f.server()
        org = stack.enter_context(setup_org(url, f.bootstrap(), tmp_path / "pids"))
        proxy = CuttableProxy(int(url.rsplit(":", 1)[1]))
        proxy.start()
        agent = f.agent("n1", proxy.url, org.join_token)
        wait_for("node ready", lambda: org.node_state("n1") == "ready", 30)
        requeued, failing = _start_jobs(org)
        old = {j: org.live_pids(j)[0] for j in [*requeued, failing]}

        proxy.cut()
        wait_for("node down", lambda: org.node_state("n1") == "down", NODE_DOWN_S)
        _after_node_loss(org, requeued, failing)
        assert agent.alive()
        assert all(org.live_pids(j) for j in old), "the agent keeps running tasks while cut off"
        assert_invariants(db)

        proxy.restore()
        wait_for("node ready again", lambda: org.node_state("n1") == "ready", 30)
        wait_for(
            "stale processes stopped",
            lambda: not any(old[j] in org.live_pids(j) for j in old),
            30,
        )
        org.wait_states(requeued, {"RUNNING"}, timeout_s=40)
        _never_duplicated(org, [*requeued, failing])
        assert not org.live_pids(failing)
        assert org.states([failing]) == {failing: "NODE_FAIL"}
        assert_invariants(db)
        proxy.cut()
