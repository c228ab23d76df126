"""What the demo shows: the live queue with progress, and the closing per-org summary."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.jobs import SHORT_STATE
from cli.output import human_duration

if TYPE_CHECKING:
    from cli.demo_run import Observer, Seen
    from scheduler.bench.cluster import Cluster

CAPACITY = {"H100": 16, "A100-80GB": 16}
SHOWN_JOBS = 14
STATE_STYLE = {"RUNNING": "green", "STARTING": "cyan", "PENDING": "yellow"}


def render_view(obs: Observer, now: float, workload_s: float) -> Group:
    seen = list(obs.seen.values())
    running = [s for s in seen if s.state in ("RUNNING", "STARTING")]
    pending = [s for s in seen if s.state == "PENDING"]
    done = [s for s in seen if s.state not in ("RUNNING", "STARTING", "PENDING")]
    head = Text.assemble(
        (f"t={now:4.0f}s ", "bold"),
        f"submitting for {workload_s:.0f}s   jobs: ",
        (f"{len(running)} running", "green"),
        "  ",
        (f"{len(pending)} pending", "yellow"),
        f"  {len(done)} finished",
    )
    gpus = Table.grid(padding=(0, 1))
    for gpu_type, capacity in CAPACITY.items():
        used = sum(_gpus(s) for s in running if s.planned.gpu_type == gpu_type)
        gpus.add_row(
            f"{gpu_type} GPUs",
            ProgressBar(total=capacity, completed=min(used, capacity), width=32),
            f"{used}/{capacity} allocated",
        )
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 2, 0, 0))
    for col in ("JOBID", "ORG", "NAME", "ST", "GPUS", "PROGRESS", "TIME", "WAITING FOR"):
        table.add_column(col, no_wrap=True)
    shown = sorted(running, key=lambda s: s.job["id"]) + sorted(pending, key=lambda s: s.job["id"])
    for s in shown[:SHOWN_JOBS]:
        run_s = _run_s(s)
        bar = ProgressBar(
            total=s.planned.duration_s, completed=min(run_s, s.planned.duration_s), width=16
        )
        table.add_row(
            str(s.job["id"]),
            s.planned.org,
            s.planned.name,
            Text(SHORT_STATE.get(s.state, s.state), style=STATE_STYLE.get(s.state, "")),
            f"{s.job['nodes']}x{s.job['gpus_per_node']} {s.planned.gpu_type}",
            bar if s.state != "PENDING" else Text("queued", style="dim"),
            human_duration(run_s) if s.state != "PENDING" else human_duration(now - s.submitted_s),
            _why(obs, s),
        )
    more = len(shown) - SHOWN_JOBS
    parts: list[Any] = [head, gpus, table]
    if more > 0:
        parts.append(Text(f"... and {more} more", style="dim"))
    if obs.story.highlights:
        parts.append(Text("\n".join(f"* {h}" for h in obs.story.highlights[-6:]), style="magenta"))
    return Group(*parts)


def _gpus(s: Seen) -> int:
    return int(s.job["gpus_per_node"]) * int(s.job["nodes"])


def _run_s(s: Seen) -> float:
    started = s.job.get("started_at")
    if not started:
        return 0.0
    when = datetime.fromisoformat(str(started).replace("Z", "+00:00"))
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - when).total_seconds())


def _why(obs: Observer, s: Seen) -> str:
    if s.state != "PENDING":
        return ""
    info = obs.reasons(s.job["id"])
    codes = [r["code"] for r in info.get("reasons") or []]
    return ",".join(codes)


def summary(
    console: Console,
    obs: Observer,
    admin: httpx.Client,
    cluster: Cluster,
    elapsed_s: float,
    leftover: int,
    total_s: float,
) -> None:
    """Per org: GPU-hours received against guaranteed, waits; the moments; the live URLs."""
    from cli.demo_run import ORGS

    # The ledger keeps one row per allocation per hour: ask from the start of the hour.
    began = datetime.now(UTC) - timedelta(seconds=elapsed_s + 60)
    since = began.replace(minute=0, second=0, microsecond=0).isoformat()
    received: dict[str, float] = {}
    r = admin.get("/v1/usage", params={"by": "org", "period": "day", "since": since})
    if r.status_code == 200:
        for row in r.json()["data"]:
            received[row["key"]] = received.get(row["key"], 0.0) + row["gpu_hours_allocated"]
    table = Table(title="Per organisation", header_style="bold", pad_edge=False)
    for col in (
        "ORG",
        "JOBS",
        "DONE",
        "GPU-h RECEIVED",
        "GPU-h GUARANTEED",
        "RATIO",
        "WAIT p50",
        "WAIT max",
    ):
        table.add_column(col, justify="right" if col != "ORG" else "left")
    for org, spec in ORGS.items():
        mine = [s for s in obs.seen.values() if s.planned.org == org]
        waits = [s.first_start - s.submitted_s for s in mine if s.first_start is not None]
        guaranteed_h = sum(g for g, _ in spec["quota"].values()) * elapsed_s / 3600
        got = received.get(org, 0.0)
        table.add_row(
            org,
            str(len(mine)),
            str(sum(1 for s in mine if s.state == "COMPLETED")),
            f"{got:.3f}",
            f"{guaranteed_h:.3f}",
            f"{got / guaranteed_h:.0%}" if guaranteed_h else "-",
            human_duration(statistics.median(waits)) if waits else "-",
            human_duration(max(waits)) if waits else "-",
        )
    console.print()
    console.print(table)
    console.print(
        "GPU-hours received: the usage ledger (/v1/usage); guaranteed: guaranteed GPUs x "
        f"{human_duration(elapsed_s)} of workload. Waits: submit to first start."
    )
    story = obs.story
    for label, found in (
        ("gang", story.gang),
        ("backfill", story.backfill),
        ("reclaim", story.reclaim),
    ):
        mark = "[green]seen[/green]" if found else "[red]NOT SEEN[/red]"
        console.print(f"{label:>9}: {mark} {', '.join(f'job {j}' for j in found)}")
    for line in story.highlights:
        console.print(f"  * {line}")
    for err in story.errors[:5]:
        console.print(f"[red]error[/red]: {err}")
    if leftover:
        console.print(f"{leftover} job(s) still queued or running at the end were cancelled.")
    console.print("\nWhile it ran, these were live:")
    console.print(f"  API and its docs   {cluster.url}/docs")
    console.print(f"  server metrics     {cluster.url}/metrics")
    for url in cluster.agent_metrics:
        console.print(f"  agent metrics      {url}")
    console.print(f"Total {total_s:.0f} s from start to summary.")
