"""Writing a comparison: `summary.json` (every figure), `report.md` (tables) and the short table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scheduler.sim.metrics import SIZE_BUCKETS

HEADLINE: tuple[tuple[str, str], ...] = (
    ("allocation (arrivals)", "allocation.during_arrivals_ratio"),
    ("allocation while waiting", "allocation.while_waiting_ratio"),
    ("wait mean (h)", "wait_s.all.mean"),
    ("wait p99 (h)", "wait_s.all.p99"),
    ("wait 9-32 mean (h)", "wait_s.9-32.mean"),
    ("wait 9-32 p99 (h)", "wait_s.9-32.p99"),
    ("wait 33+ mean (h)", "wait_s.33+.mean"),
    ("JCT mean (h)", "jct_s.all.mean"),
    ("bounded slowdown mean", "bounded_slowdown.all.mean"),
    ("preemptions", "preemptions.count"),
    ("GPU-h lost to preemption", "preemptions.gpu_hours_lost"),
    ("Jain's index", "fairness.jain_index"),
    ("worst 1-h shortfall (GPUs)", "fairness.worst_1h_shortfall_gpus"),
    ("longest in-quota wait (h)", "fairness.longest_in_quota_wait_s"),
    ("makespan (h)", "makespan_s"),
)


def lookup(summary: Mapping[str, Any], path: str) -> Any:
    value: Any = summary
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def fmt(path: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (path.endswith("_s") or "_s." in path):
        return f"{value / 3600:.2f}"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def headline_rows(summaries: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[label] + [fmt(path, lookup(s, path)) for s in summaries] for label, path in HEADLINE]


def write_summary(
    path: Path, inputs: Mapping[str, Any], summaries: Sequence[Mapping[str, Any]]
) -> None:
    document = {"inputs": inputs, "policies": {s["policy"]: s for s in summaries}}
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def render_markdown(
    inputs: Mapping[str, Any],
    summaries: Sequence[Mapping[str, Any]],
    timings: Mapping[str, Mapping[str, float]],
    plots: Sequence[str],
) -> str:
    names = [s["policy"] for s in summaries]
    out = ["# Simulation report", ""]
    out += [f"- {key}: `{value}`" for key, value in inputs.items()]
    out += ["", "## Headline (times in hours)", ""]
    out += _table(["figure", *names], headline_rows(summaries))
    for title, key in (("Queueing delay", "wait_s"), ("Job completion time", "jct_s")):
        out += [f"## {title} by job size (hours: mean / p50 / p95 / p99, jobs)", ""]
        rows = []
        for bucket in ["all", *(b[0] for b in SIZE_BUCKETS)]:
            row = [bucket]
            for s in summaries:
                d = s[key][bucket]
                row.append(
                    "-"
                    if not d["count"]
                    else " / ".join(f"{d[k] / 3600:.2f}" for k in ("mean", "p50", "p95", "p99"))
                    + f" ({d['count']:,})"
                )
            rows.append(row)
        out += _table(["GPUs", *names], rows)
    out += ["## Bounded slowdown (mean / p99)", ""]
    out += _table(
        ["GPUs", *names],
        [
            [b] + [_pair(s["bounded_slowdown"][b]) for s in summaries]
            for b in ["all", *(x[0] for x in SIZE_BUCKETS)]
        ],
    )
    out += ["## Outcomes", ""]
    out += _table(
        ["policy", "completed", "timeout", "unschedulable", "unfinished", "preempted jobs"],
        [
            [s["policy"]]
            + [f"{s['jobs'][k]:,}" for k in ("completed", "timeout", "unschedulable", "unfinished")]
            + [f"{s['preemptions']['jobs_preempted']:,}"]
            for s in summaries
        ],
    )
    for s in summaries:
        out += [f"## Tenants under {s['policy']}", ""]
        header = [
            "tenant",
            "guarantee",
            "jobs",
            "received GPU-h",
            "entitled (guar.)",
            "entitled (fair)",
            "recv/fair",
            "borrowed GPU-h",
            "worst 1-h short",
            "longest in-quota wait (h)",
        ]
        rows = [
            [
                name,
                str(t["guaranteed_gpus"]),
                f"{t['jobs']:,}",
                f"{t['received_gpu_h']:,.0f}",
                f"{t['entitled_guarantee_gpu_h']:,.0f}",
                f"{t['entitled_fair_gpu_h']:,.0f}",
                f"{t.get('received_over_fair', 0.0):.3f}",
                f"{t['borrowed_gpu_h']:,.0f}",
                f"{t['worst_1h_shortfall_gpus']:.1f}",
                f"{t['longest_in_quota_wait_s'] / 3600:.2f}",
            ]
            for name, t in s["tenants"].items()
        ]
        out += _table(header, rows)
    out += ["## Run", ""]
    out += _table(
        ["policy", "wall s", "core s", "cycles", "max pending"],
        [
            [
                n,
                f"{t['wall_s']:.1f}",
                f"{t['core_s']:.1f}",
                f"{t['cycles']:,.0f}",
                f"{t['max_pending']:,.0f}",
            ]
            for n, t in timings.items()
        ],
    )
    out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def _pair(d: Mapping[str, Any]) -> str:
    return "-" if not d["count"] else f"{d['mean']:.2f} / {d['p99']:.2f}"
