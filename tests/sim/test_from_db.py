"""`fairgpu simulate --from-db`: a small recorded history replayed under proposed quotas.

The history is written straight into a real database (SQLite and PostgreSQL) with the row
factories, then the what-if runs through the CLI as an operator would run it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from protocol.states import JobState
from scheduler.db.engine import make_engine, make_sessionmaker
from tests import factories
from tests.conftest import run_async

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
WINDOW = ["--since", "2026-11-01T00:00:00+00:00", "--until", "2026-11-02T00:00:00+00:00"]
H = 3_600.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def _borrowers_history(url: str) -> None:
    """One 8-GPU node. B's two 4-GPU borrowers hold it for 2 h from T0; A's 4-GPU job,
    submitted 10 min later with no guarantee to reclaim, waits for them and runs 1 h."""
    engine = make_engine(url)
    async with make_sessionmaker(engine)() as session, session.begin():
        node, gpus = await factories.node(session, gpus=8, model="H100")
        a, b = await factories.org(session, "A"), await factories.org(session, "B")
        ua, ub = await factories.user(session, a), await factories.user(session, b)
        for half in (gpus[:4], gpus[4:]):
            job = await factories.job(
                session, b, ub, gpus_per_node=4, time_limit_s=7200, preemptible=True,
                state=JobState.COMPLETED, submitted_at=at(0), started_at=at(0), ended_at=at(2 * H),
            )  # fmt: skip
            await factories.attempt(session, job, node, half, start=at(0), end=at(2 * H),
                                    borrowed=True)  # fmt: skip
        job = await factories.job(
            session, a, ua, gpus_per_node=4, time_limit_s=3600, preemptible=True,
            state=JobState.COMPLETED, submitted_at=at(600), started_at=at(2 * H),
            ended_at=at(3 * H),
        )  # fmt: skip
        await factories.attempt(session, job, node, gpus[:4], start=at(2 * H), end=at(3 * H),
                                borrowed=True)  # fmt: skip
    await engine.dispose()


def whatif(url: str, tmp_path: Path, quotas: str, *extra: str) -> Any:
    path = tmp_path / "proposed.csv"
    path.write_text(quotas)
    args = ["simulate", "--from-db", "--database-url", url, "--quotas", str(path),
            "--out", str(tmp_path / "out"), *WINDOW, *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def summary(tmp_path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((tmp_path / "out" / "summary.json").read_text())
    return document


PROPOSED = "org,gpu_type,guaranteed,limit\nA,H100,4,8\nB,H100,4,4\n"


def test_a_guarantee_ends_the_wait_behind_borrowers(database_url: str, tmp_path: Path) -> None:
    run_async(lambda: _borrowers_history(database_url))
    result = whatif(database_url, tmp_path, PROPOSED, "--policy", "fairgpu")
    assert result.exit_code == 0, result.output
    assert "recorded" in result.stdout
    assert "fairgpu" in result.stdout
    doc = summary(tmp_path)
    assert set(doc["policies"]) == {"recorded", "fairgpu"}
    rec, sim = doc["policies"]["recorded"], doc["policies"]["fairgpu"]
    # What happened: A waited 1 h 50 min behind B's borrowers, then ran 1 h.
    assert rec["tenants"]["A"]["wait_s"]["mean"] == 6_600.0
    assert rec["tenants"]["A"]["jct_s"]["mean"] == 10_200.0
    assert rec["tenants"]["B"]["wait_s"]["mean"] == 0.0
    assert rec["wait_s"]["all"]["mean"] == 2_200.0
    assert rec["tenants"]["B"]["borrowed_gpu_h"] == 16.0
    assert rec["tenants"]["A"]["guaranteed_gpus"] == 0
    # Under the proposal A's job starts on arrival; B, capped at 4 GPUs, runs its jobs in turn.
    assert sim["tenants"]["A"]["wait_s"]["mean"] == 0.0
    assert sim["tenants"]["A"]["jct_s"]["mean"] == 3_600.0
    assert sim["tenants"]["B"]["wait_s"]["mean"] == 3_600.0  # 0 and 2 h
    assert sim["tenants"]["B"]["jct_s"]["mean"] == 10_800.0  # 2 h and 4 h
    assert sim["tenants"]["A"]["guaranteed_gpus"] == 4
    assert sim["tenants"]["B"]["borrowed_gpu_h"] == 0.0
    for column in (rec, sim):  # the same work, delivered in full in both
        assert column["jobs"]["completed"] == 3
        assert column["tenants"]["A"]["received_gpu_h"] == 4.0
        assert column["tenants"]["B"]["received_gpu_h"] == 16.0
    assert doc["inputs"]["quotas_proposed"]["B"]["limit"] == {"H100": 4}
    assert doc["inputs"]["quotas_recorded"]["B"]["limit"] == {}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| A | none; shares 1 | H100 4 / 8; shares 1 |" in report
    assert (tmp_path / "out" / "wait_cdf.png").read_bytes()[:4] == b"\x89PNG"


async def _requeued_history(url: str) -> None:
    """A job preempted after 40 min and requeued, then done in 20 min; one still running at
    the end of the window, whose GPUs were given 5 ms before its recorded submission; one
    pending; one cancelled before it ever ran."""
    engine = make_engine(url)
    async with make_sessionmaker(engine)() as session, session.begin():
        node, gpus = await factories.node(session, gpus=8, model="H100")
        c = await factories.org(session, "C")
        await factories.quota(session, c, "H100", guaranteed=8)
        uc = await factories.user(session, c)
        job = await factories.job(
            session, c, uc, gpus_per_node=2, time_limit_s=7200, preemptible=True,
            state=JobState.COMPLETED, requeue_count=1, submitted_at=at(0),
            started_at=at(3000), ended_at=at(4200),
        )  # fmt: skip
        await factories.attempt(session, job, node, gpus[:2], start=at(0), end=at(2400),
                                state=JobState.PREEMPTED, borrowed=True)  # fmt: skip
        await factories.attempt(session, job, node, gpus[2:4], start=at(3000), end=at(4200),
                                number=1)  # fmt: skip
        # GPUs given 5 ms before the submission: a cycle's clock is read before it loads.
        running = await factories.job(
            session, c, uc, gpus_per_node=4, time_limit_s=86_400, state=JobState.RUNNING,
            submitted_at=at(10 * H + 0.005), started_at=at(10 * H),
        )  # fmt: skip
        await factories.attempt(session, running, node, gpus[4:], start=at(10 * H), end=None)
        await factories.job(session, c, uc, submitted_at=at(5 * H))  # still PENDING
        await factories.job(
            session, c, uc, state=JobState.CANCELLED, submitted_at=at(H), ended_at=at(2 * H)
        )
    await engine.dispose()


def test_requeues_censored_and_left_out_jobs(database_url: str, tmp_path: Path) -> None:
    run_async(lambda: _requeued_history(database_url))
    quotas = "org,gpu_type,guaranteed,limit,shares\nC,H100,8,,2\n"
    result = whatif(database_url, tmp_path, quotas, "--policy", "fairgpu")
    assert result.exit_code == 0, result.output
    assert "not replayed: 1 never_held_gpus, 1 pending_at_read" in result.stderr
    doc = summary(tmp_path)
    inputs = doc["inputs"]
    assert inputs["jobs"] == 2
    assert inputs["jobs_left_out"] == {"never_held_gpus": 1, "pending_at_read": 1}
    assert inputs["jobs_censored_running_at_read"] == 1
    assert inputs["quotas_proposed"]["C"]["shares"] == 2.0
    rec, sim = doc["policies"]["recorded"], doc["policies"]["fairgpu"]
    # Recorded: 40 min run, killed, 10 min requeued, 20 min run. With 30-min checkpoints the
    # first attempt kept 30 min and lost 10 min on 2 GPUs.
    # Delivered: those 2 GPUs for 60 min, and the censored job's 4 GPUs for 6 h.
    assert rec["preemptions"] == {"count": 1, "gpu_hours_lost": round(600 * 2 / H, 2),
                                  "jobs_preempted": 1, "gpu_hours_delivered": 26.0,
                                  "lost_over_delivered": round(600 * 2 / H / 26, 6)}  # fmt: skip
    assert rec["wait_s"]["2-8"]["count"] == 2
    assert rec["wait_s"]["2-8"]["p50"] == 300.0  # 600 s requeued, 0 s (not -5 ms)
    # The running job is censored at the window's end: 14 h on 4 GPUs so far.
    assert rec["tenants"]["C"]["received_gpu_h"] == round((2400 + 1200) * 2 / H + 6 * 4, 2)
    # Replayed: the requeued job needs 30 + 20 min of work and, in the empty cluster, waits 0.
    assert sim["jct_s"]["2-8"]["p50"] == pytest.approx((3000 + 6 * H) / 2, abs=1)
    assert sim["wait_s"]["all"]["mean"] == 0.0
    assert sim["preemptions"]["count"] == 0
    assert sim["tenants"]["C"]["received_gpu_h"] == round(3000 * 2 / H + 6 * 4, 2)


@pytest.mark.parametrize(
    ("quotas", "message"),
    [
        ("org,gpu_type,guaranteed,limit\nA,H100,4,8\nZ,H100,1,\n",
         "proposed.csv:3: unknown org 'Z'"),
        ("org,gpu_type,guaranteed,limit\nA,H100,-4,8\n",
         "proposed.csv:2: guaranteed must not be negative, got -4"),
        ("org,gpu_type,guaranteed,limit\nA,H100,4,2\n",
         "proposed.csv:2: limit 2 is below guaranteed 4 for A"),
        ("org,gpu_type,guaranteed,limit,shares\nA,H100,4,8,-1\n",
         "proposed.csv:2: shares must be positive, got -1"),
        ("org,gpu_type,guaranteed,limit\nA,A100,4,8\n",
         "proposed.csv:2: no 'A100' GPUs in the cluster (H100)"),
        ("org,gpu_type,guaranteed\nA,H100,4\n", "proposed.csv: missing column(s) limit"),
        ("org,gpu_type,guaranteed,limit\n", "proposed.csv: no quotas"),
    ],
)  # fmt: skip
def test_bad_quota_files_are_one_line_errors(
    database_url: str, tmp_path: Path, quotas: str, message: str
) -> None:
    run_async(lambda: _borrowers_history(database_url))
    result = whatif(database_url, tmp_path, quotas)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_empty_window_is_a_one_line_error(database_url: str, tmp_path: Path) -> None:
    run_async(lambda: _borrowers_history(database_url))
    path = tmp_path / "proposed.csv"
    path.write_text(PROPOSED)
    args = ["simulate", "--from-db", "--database-url", database_url, "--quotas", str(path),
            "--since", "2026-10-01", "--until", "2026-10-02"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no jobs to replay: none submitted between 2026-10-01T00:00:00+00:00 and " in lines[0]
    backwards = [*args[:-4], "--since", "2026-11-02", "--until", "2026-11-01"]
    result = CliRunner().invoke(app, backwards)
    assert result.exit_code == 2
    assert "empty window" in result.stderr


def test_from_db_refuses_a_trace_and_wants_since(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--from-db", "--quotas", "q.csv"])
    assert result.exit_code == 2
    assert "--since" in result.output
    result = runner.invoke(app, ["simulate", "--from-db", "--trace", "t.csv", "--since", "1d"])
    assert result.exit_code == 2
    assert "--trace" in result.output
