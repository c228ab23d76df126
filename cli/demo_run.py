"""The demo's story: orgs, a Philly-shaped workload with three scripted moments, a live queue.

The cluster has 16 H100 (site A) and 16 A100 (site B). Quotas are chosen so that:

- gang: aurora's 2x8 H100 pre-training job starts at once, borrowing borealis's idle guarantee;
- reclaim: borealis then asks for its guaranteed H100s, and the scheduler preempts aurora's
  borrowed work to give them back (aurora's job is requeued, not lost);
- backfill: on the A100s, cirrus's 8-GPU job waits for a whole node and holds a reservation,
  while a short low-priority 2-GPU job of cirrus starts in the gap because it ends before the
  reservation. (A100 guarantees add up to more than the A100s: a platform may overcommit.)

Everything shown comes from the API: job states, events (`job.preempt`) and `explain` reasons.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import typer
from rich.console import Console, Group
from rich.live import Live

from cli.demo_view import render_view, summary
from cli.workload import generate
from scheduler.bench.cluster import add_org

if TYPE_CHECKING:
    from scheduler.bench.cluster import Cluster

H100 = "H100"
A100 = "A100-80GB"
ORGS: dict[str, dict[str, Any]] = {
    # name: shares, user, quotas {type: (guaranteed, limit)}, GPU type of its background jobs
    "aurora": {"shares": 2.0, "user": "ada", "quota": {H100: (8, 16), A100: (0, 8)}},
    "borealis": {"shares": 1.0, "user": "bo", "quota": {H100: (8, 16), A100: (8, 8)}},
    "cirrus": {"shares": 1.0, "user": "cy", "quota": {H100: (0, 8), A100: (16, 16)}},
}
BACKGROUND_TYPE = {"aurora": H100, "borealis": H100, "cirrus": A100}
SUBMIT_SHARE = {"aurora": 0.5, "borealis": 0.3, "cirrus": 0.2}  # Philly: one tenant ~half
TIME_SCALE = 360.0  # one trace hour = ten demo seconds
CIRRUS_QUIET_UNTIL_S = 16.0  # keep the A100 gap free for the backfill moment
DRAIN_S = 25.0  # after the last submission, time for running jobs to end
POLL_S = 0.5
EXPLAINED_PER_POLL = 8
CLASS_RANK = {"low": 0, "normal": 1, "high": 2}


@dataclass(frozen=True)
class Planned:
    at_s: float
    org: str
    name: str
    gpus_per_node: int
    gpu_type: str
    duration_s: float
    nodes: int = 1
    preemptible: bool = False
    priority: str = "normal"
    limit_s: int | None = None

    def body(self) -> dict[str, Any]:
        d = round(self.duration_s, 1)
        script = f"echo {self.name} on $(hostname) GPUs $CUDA_VISIBLE_DEVICES; sleep {d}; echo done"
        return {
            "name": self.name,
            "command": ["sh", "-c", script],
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "gpu_type": self.gpu_type,
            "time_limit": self.limit_s or int(self.duration_s * 1.5 + 8),
            "preemptible": self.preemptible,
            "priority_class": self.priority,
        }


SCRIPTED = (
    Planned(0.0, "aurora", "pretrain-gang", 8, H100, 30.0, nodes=2, preemptible=True),
    Planned(0.0, "borealis", "a100-blocker", 8, A100, 30.0, limit_s=36),
    Planned(0.5, "cirrus", "a100-eval", 4, A100, 30.0, limit_s=36),
    Planned(4.0, "cirrus", "a100-finetune", 8, A100, 12.0, limit_s=30),
    Planned(7.0, "cirrus", "quick-eval", 2, A100, 6.0, priority="low", limit_s=12),
    Planned(11.0, "borealis", "h100-train", 8, H100, 18.0, limit_s=40),
)


def plan(seed: int, workload_s: float) -> list[Planned]:
    """The scripted moments plus a generated Philly-shaped background, sorted by time."""
    rng = random.Random(seed)
    jobs = generate(
        rng,
        trace_hours=max(1, int(workload_s * TIME_SCALE / 3600)),
        orgs=SUBMIT_SHARE,
        time_scale=TIME_SCALE,
        rate_scale=0.5,
        max_gpus=8,
        min_duration_s=3.0,
        max_duration_s=20.0,
    )
    out = list(SCRIPTED)
    for i, j in enumerate(jobs[:45]):
        at = 2.0 + j.submit_at_s
        if j.org == "cirrus" and at < CIRRUS_QUIET_UNTIL_S:
            continue
        out.append(
            Planned(
                at_s=at,
                org=j.org,
                name=f"{j.org[:3]}-{i:02d}-{j.gpus}g",
                gpus_per_node=j.gpus,
                gpu_type=BACKGROUND_TYPE[j.org],
                duration_s=j.duration_s,
                preemptible=j.org == "aurora" or rng.random() < 0.3,
            )
        )
    return sorted(out, key=lambda p: p.at_s)


@dataclass
class Seen:
    """What the demo learnt about one job from the API."""

    job: dict[str, Any]
    planned: Planned
    submitted_s: float = 0.0  # seconds since the workload began
    first_start: float | None = None
    state: str = "PENDING"
    requeues: int = 0


@dataclass
class Story:
    highlights: list[str] = field(default_factory=list)
    gang: list[int] = field(default_factory=list)
    backfill: list[int] = field(default_factory=list)
    reclaim: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    echo: bool = False  # print each moment as it happens (no live display)

    def add(self, kind: list[int], job_id: int, line: str) -> None:
        if job_id not in kind:
            kind.append(job_id)
            self.highlights.append(line)
            if self.echo:
                typer.echo(f"* {line}")


def setup_orgs(http: httpx.Client) -> dict[str, httpx.Client]:
    """Orgs, quotas, one user each with a token; returns a client per org."""
    clients: dict[str, httpx.Client] = {}
    for name, spec in ORGS.items():
        token = add_org(http, name, quotas=spec["quota"], user=spec["user"], shares=spec["shares"])
        clients[name] = httpx.Client(
            base_url=str(http.base_url), headers={"Authorization": f"Bearer {token}"}
        )
    return clients


def run_scenario(
    cluster: Cluster, *, seed: int, live: bool, workload_s: float, started: float
) -> None:
    console = Console()
    admin = httpx.Client(
        base_url=cluster.url,
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        timeout=15.0,
    )
    clients = setup_orgs(admin)
    todo = plan(seed, workload_s)
    cluster.wait_nodes()
    console.print(f"4 nodes ready ({time.monotonic() - started:.1f} s after start)")
    console.print(
        f"3 orgs, {len(todo)} jobs over {workload_s:.0f} s "
        f"(Philly-shaped, time compressed {TIME_SCALE:.0f}x: one trace hour = "
        f"{3600 / TIME_SCALE:.0f} s)"
    )
    observer = Observer(admin, console)
    observer.story.echo = not live
    t0 = time.monotonic()
    deadline = t0 + workload_s + DRAIN_S
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as display:
            if not live:
                display.stop()
            while True:
                now = time.monotonic() - t0
                while todo and todo[0].at_s <= now:
                    p = todo.pop(0)
                    r = clients[p.org].post("/v1/jobs", json=p.body())
                    if r.status_code >= 400:
                        observer.story.errors.append(
                            f"submit {p.name}: {r.status_code} {r.text[:120]}"
                        )
                        continue
                    observer.track(r.json(), p, now)
                observer.poll(now)
                if live:
                    display.update(observer.view(now, workload_s))
                if not todo and observer.active() == 0 and now > workload_s / 2:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
        leftover = observer.cancel_active(clients)
        elapsed_s = time.monotonic() - t0
        summary(console, observer, admin, cluster, elapsed_s, leftover, time.monotonic() - started)
    finally:
        for c in clients.values():
            c.close()
        admin.close()


class Observer:
    def __init__(self, admin: httpx.Client, console: Console) -> None:
        self.admin = admin
        self.console = console
        self.seen: dict[int, Seen] = {}
        self.story = Story()
        self._pending_before: set[int] = set()
        self._explain: dict[int, dict[str, Any]] = {}
        self._explained_at: dict[int, float] = {}

    def track(self, job: dict[str, Any], planned: Planned, now: float) -> None:
        self.seen[job["id"]] = Seen(job=job, planned=planned, submitted_s=now)

    def active(self) -> int:
        return sum(1 for s in self.seen.values() if s.state in ("PENDING", "STARTING", "RUNNING"))

    def poll(self, now: float) -> None:
        r = self.admin.get("/v1/jobs", params={"limit": 500})
        if r.status_code != 200:
            self.story.errors.append(f"list jobs: {r.status_code}")
            return
        newly_started: list[Seen] = []
        for job in r.json()["data"]:
            s = self.seen.get(job["id"])
            if s is None:
                continue
            before, s.job = s.state, job
            s.state = job["state"]
            if job["state"] in ("STARTING", "RUNNING") and before == "PENDING":
                newly_started.append(s)
                if s.first_start is None:
                    s.first_start = now
            if job["requeue_count"] > s.requeues or job["state"] == "PREEMPTED":
                s.requeues = job["requeue_count"]
                self._preempted(s)
        for s in newly_started:
            if s.job["nodes"] > 1:
                self.story.add(
                    self.story.gang,
                    s.job["id"],
                    f"gang: job {s.job['id']} ({s.planned.name}, {s.job['nodes']}x"
                    f"{s.job['gpus_per_node']} {s.planned.gpu_type}) started on "
                    f"{s.job['nodes']} nodes at once",
                )
            self._check_backfill(s)
        self._pending_before = {i for i, s in self.seen.items() if s.state == "PENDING"}
        self._refresh_reasons(now)

    def _refresh_reasons(self, now: float) -> None:
        """Why the first few pending jobs wait, for the live view; each at most every 2 s."""
        pending = sorted(self._pending_before)[:EXPLAINED_PER_POLL]
        for job_id in pending:
            if now - self._explained_at.get(job_id, -10.0) >= 2.0:
                self._explained(job_id, fresh=True)
                self._explained_at[job_id] = now

    def _preempted(self, s: Seen) -> None:
        r = self.admin.get(f"/v1/jobs/{s.job['id']}/events", params={"limit": 500})
        if r.status_code != 200:
            return
        for e in r.json()["data"]:
            details = e.get("details") or {}
            if e["kind"] == "job.preempt" and details.get("reason") == "reclaim":
                by = self.seen.get(int(details.get("preemptor_job_id", 0)))
                who = f"{by.planned.org}'s job {by.job['id']} ({by.planned.name})" if by else "?"
                self.story.add(
                    self.story.reclaim,
                    s.job["id"],
                    f"reclaim: job {s.job['id']} ({s.planned.org}, {s.planned.name}, borrowed) "
                    f"preempted to give {who} its guaranteed GPUs; requeued",
                )

    def _check_backfill(self, s: Seen) -> None:
        """Started while an older job of higher priority waits for Resources with a reservation."""
        mine = self._explained(s.job["id"])
        for pid in sorted(self._pending_before):
            p = self.seen[pid]
            if p.state != "PENDING" or pid >= s.job["id"]:
                continue
            if p.planned.gpu_type != s.planned.gpu_type:
                continue
            info = self._explained(pid, fresh=True)
            held = [
                r
                for r in info.get("reasons") or []
                if r["code"] == "Resources" and "reservation_start" in (r.get("details") or {})
            ]
            if not held or not _lower(mine, s.planned, info, p.planned):
                continue
            self.story.add(
                self.story.backfill,
                s.job["id"],
                f"backfill: job {s.job['id']} ({s.planned.name}, {s.planned.priority} priority, "
                f"{s.job['gpus_per_node']} {s.planned.gpu_type}) started ahead of job {pid} "
                f"({p.planned.name}), which holds a reservation it ends before",
            )
            return

    def _explained(self, job_id: int, fresh: bool = False) -> dict[str, Any]:
        if fresh or job_id not in self._explain:
            r = self.admin.get(f"/v1/jobs/{job_id}/explain")
            self._explain[job_id] = r.json() if r.status_code == 200 else {}
        return self._explain[job_id]

    def reasons(self, job_id: int) -> dict[str, Any]:
        """The last `explain` seen for a job (no request)."""
        return self._explain.get(job_id) or {}

    def cancel_active(self, clients: dict[str, httpx.Client]) -> int:
        left = 0
        for s in self.seen.values():
            if s.state in ("PENDING", "STARTING", "RUNNING"):
                left += 1
                clients[s.planned.org].post(f"/v1/jobs/{s.job['id']}/cancel")
        return left

    def view(self, now: float, workload_s: float) -> Group:
        return render_view(self, now, workload_s)


def _lower(mine: dict[str, Any], me: Planned, other: dict[str, Any], them: Planned) -> bool:
    """Lower priority: by the cycle's numbers when both have them, else by priority class."""
    a, b = mine.get("priority"), other.get("priority")
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a < b
    return CLASS_RANK[me.priority] < CLASS_RANK[them.priority]
