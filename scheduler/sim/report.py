"""Writing a comparison: `summary.json` (every figure), `report.md` (tables) and the short table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scheduler.sim.config import POLICIES
from scheduler.sim.idle import IDLE_CAUSES
from scheduler.sim.metrics import SIZE_BUCKETS

HEADLINE: tuple[tuple[str, str], ...] = (
    ("allocation (arrivals)", "allocation.during_arrivals_ratio"),
    ("allocation while waiting", "allocation.while_waiting_ratio"),
    ("wait mean (h)", "wait_s.all.mean"),
    ("wait p99 (h)", "wait_s.all.p99"),
    ("wait 9-32 mean (h)", "wait_s.9-32.mean"),
    ("wait 9-32 p99 (h)", "wait_s.9-32.p99"),
    ("wait 33+ mean (h)", "wait_s.33+.mean"),
    ("wait 33+ p99 (h)", "wait_s.33+.p99"),
    ("wait p99: 33+ / all", "wait_p99_33plus_over_all"),
    ("JCT mean (h)", "jct_s.all.mean"),
    ("bounded slowdown mean", "bounded_slowdown.all.mean"),
    ("preemptions", "preemptions.count"),
    ("GPU-h lost to preemption", "preemptions.gpu_hours_lost"),
    ("lost / delivered GPU-h", "preemptions.lost_over_delivered"),
    ("idle GPU-h while waiting", "allocation.idle_while_waiting_gpu_h.total"),
    ("Jain's index", "fairness.jain_index"),
    ("worst 1-h shortfall (GPUs)", "fairness.worst_1h_shortfall_gpus"),
    ("longest in-quota wait (h)", "fairness.longest_in_quota_wait_s"),
    ("makespan (h)", "makespan_s"),
)


# Issue #19's bar for the policy at saturation (docs/SIMULATION.md, "the matrix"): the big
# gangs' wait tail against everyone's, GPUs kept busy while work waits, little work lost to
# preemption, fairness across tenants, and a clear lead over slurm-like in completion time.
BIG_GANG_WAIT_P99_RATIO_MAX = 2.0
WHILE_WAITING_RATIO_MIN = 0.97
LOST_OVER_DELIVERED_MAX = 0.002
JAIN_INDEX_MIN = 0.95
JCT_BELOW_SLURM_MIN = 0.30


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
    if isinstance(value, float) and path.endswith("over_delivered"):
        return f"{value:.3%}"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def headline_rows(summaries: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[label] + [fmt(path, lookup(s, path)) for s in summaries] for label, path in HEADLINE]


def write_summary(
    path: Path, inputs: Mapping[str, Any], summaries: Sequence[Mapping[str, Any]]
) -> None:
    document = {
        "inputs": inputs,
        "policies": {s["policy"]: s for s in summaries},
        "checks": checks(summaries),
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def checks(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The claims fairgpu's policy must meet against the baselines, each with its numbers.

    `holds` is None where the comparison cannot be made (a policy not run, no such jobs).
    """
    by = {s["policy"]: s for s in summaries}
    out: list[dict[str, Any]] = []
    fair, fifo, slurm = by.get("fairgpu"), by.get("fifo"), by.get("slurm-like")
    if fair and slurm:
        for key in ("during_arrivals_ratio", "while_waiting_ratio"):
            a, b = fair["allocation"][key], slurm["allocation"][key]
            out.append(_check(f"allocation {key}: fairgpu >= slurm-like", a, b, a >= b))
    if fair and fifo:
        for bucket in ("33+", "9-32"):
            for stat in ("mean", "p99"):
                a = fair["wait_s"][bucket].get(stat)
                b = fifo["wait_s"][bucket].get(stat)
                holds = None if a is None or b is None else a < b
                out.append(_check(f"wait {bucket} GPUs {stat}: fairgpu < fifo", a, b, holds))
    if fair and slurm:
        a, b = fair["jct_s"]["all"].get("mean"), slurm["jct_s"]["all"].get("mean")
        holds = None if a is None or b is None else a <= (1 - JCT_BELOW_SLURM_MIN) * b
        claim = f"JCT mean: fairgpu >= {JCT_BELOW_SLURM_MIN:.0%} below slurm-like"
        out.append(_check(claim, a, b, holds))
    if fair:
        out += _saturation_checks(fair)
        bound = 3_600.0 + POLICIES["fairgpu"].preemption_grace_s
        worst = fair["fairness"]["longest_in_quota_wait_s"]
        who = fair["fairness"]["longest_in_quota_wait_tenant"]
        out.append(
            _check(
                f"longest in-quota wait of any tenant ({who}) <= 1 h + grace",
                worst,
                bound,
                worst <= bound,
            )
        )
    return out


def _saturation_checks(fair: Mapping[str, Any]) -> list[dict[str, Any]]:
    """fairgpu's own figures against #19's bar; the gang ratio is n/a without 33+ GPU jobs."""
    ratio = fair["wait_p99_33plus_over_all"]
    waiting = fair["allocation"]["while_waiting_ratio"]
    lost = fair["preemptions"]["lost_over_delivered"]
    jain = fair["fairness"]["jain_index"]
    big = BIG_GANG_WAIT_P99_RATIO_MAX
    return [
        _check(
            f"wait p99 of 33+ GPU jobs / of all jobs <= {big:g}",
            ratio,
            big,
            None if ratio is None else ratio <= big,
        ),
        _check(
            f"allocation while work waits >= {WHILE_WAITING_RATIO_MIN:g}",
            waiting,
            WHILE_WAITING_RATIO_MIN,
            waiting >= WHILE_WAITING_RATIO_MIN,
        ),
        _check(
            f"GPU-h lost to preemption / delivered <= {LOST_OVER_DELIVERED_MAX:.1%}",
            lost,
            LOST_OVER_DELIVERED_MAX,
            lost <= LOST_OVER_DELIVERED_MAX,
        ),
        _check(f"Jain's index >= {JAIN_INDEX_MIN:g}", jain, JAIN_INDEX_MIN, jain >= JAIN_INDEX_MIN),
    ]


def _check(claim: str, value: Any, against: Any, holds: bool | None) -> dict[str, Any]:
    return {"claim": claim, "value": value, "against": against, "holds": holds}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def render_markdown(
    inputs: Mapping[str, Any],
    summaries: Sequence[Mapping[str, Any]],
    timings: Mapping[str, Mapping[str, float]],
    plots: Sequence[str],
    guarantees: Mapping[str, Mapping[str, int]] | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """The report; `guarantees` (tenant → GPU type → GPUs) is its first table when given."""
    names = [s["policy"] for s in summaries]
    out = ["# Simulation report", ""]
    if warnings:
        out += [f"**Warning:** {w}" for w in warnings] + [""]
    if guarantees:
        types = sorted({t for by_type in guarantees.values() for t in by_type})
        out += ["## Guaranteed GPUs by tenant and type", ""]
        rows = [[tenant, *(str(g.get(t, 0)) for t in types)] for tenant, g in guarantees.items()]
        totals = [str(sum(g.get(t, 0) for g in guarantees.values())) for t in types]
        out += _table(["tenant", *types], [*rows, ["total", *totals]])
    out += [f"- {key}: `{value}`" for key, value in inputs.items() if not key.startswith("quotas_")]
    if "quotas_proposed" in inputs:
        out += ["", "## Quotas: recorded → proposed (guaranteed / limit per GPU type, shares)", ""]
        out += _table(
            ["org", "recorded", "proposed"],
            [
                [name, _quota(inputs["quotas_recorded"][name]), _quota(proposed)]
                for name, proposed in inputs["quotas_proposed"].items()
            ],
        )
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
    out += _idle_table(names, summaries)
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
            "wait mean / p95 (h)",
            "JCT mean (h)",
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
                _hours(t["wait_s"], "mean", "p95"),
                _hours(t["jct_s"], "mean"),
            ]
            for name, t in s["tenants"].items()
        ]
        out += _table(header, rows)
    claims = checks(summaries)
    if claims:
        out += ["## Checks", ""]
        verdict = {True: "holds", False: "does NOT hold", None: "n/a (no such jobs)"}
        out += _table(
            ["claim", "value", "against", "verdict"],
            [[c["claim"], str(c["value"]), str(c["against"]), verdict[c["holds"]]] for c in claims],
        )
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


def _idle_table(names: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Idle GPU-hours while work waits by cause (docs/SIMULATION.md defines each)."""
    by_policy = [s["allocation"].get("idle_while_waiting_gpu_h", {}) for s in summaries]
    causes = [*IDLE_CAUSES, "total"]
    rows = [[c] + [_gpu_h(idle.get(c)) for idle in by_policy] for c in causes]
    return ["## Idle GPU-hours while work waits, by cause", "", *_table(["cause", *names], rows)]


def _gpu_h(value: Any) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pair(d: Mapping[str, Any]) -> str:
    return "-" if not d["count"] else f"{d['mean']:.2f} / {d['p99']:.2f}"


def _hours(d: Mapping[str, Any], *stats: str) -> str:
    return "-" if not d.get("count") else " / ".join(f"{d[k] / 3600:.2f}" for k in stats)


def _quota(q: Mapping[str, Any]) -> str:
    types = sorted(set(q["guaranteed"]) | set(q["limit"]))
    parts = [f"{t} {q['guaranteed'].get(t, 0)} / {q['limit'].get(t, '-')}" for t in types]
    return ", ".join(parts or ["none"]) + f"; shares {q['shares']:g}"
