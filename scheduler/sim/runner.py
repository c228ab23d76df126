"""One comparison: load a workload, run each policy through the core, write every output."""

from __future__ import annotations

import json
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.core.types import Node, Org
from scheduler.sim.cluster import (
    DEFAULT_GPU_TYPE,
    build_nodes,
    build_orgs,
    check_quotas,
    default_cluster,
    fit_guarantees,
    parse_cluster_spec,
)
from scheduler.sim.config import POLICY_NAMES, SimConfig, policy_config
from scheduler.sim.engine import ProgressFn, ScheduleFn, Simulator
from scheduler.sim.metrics import Series, summarize
from scheduler.sim.plots import write_plots
from scheduler.sim.records import SimResult
from scheduler.sim.report import render_markdown, write_summary
from scheduler.sim.trace import Quota, TraceJob, add_big_gangs, load_quotas, load_trace


@dataclass(frozen=True, slots=True)
class Workload:
    trace: list[TraceJob]
    quotas: list[Quota]
    nodes: tuple[Node, ...]
    orgs: tuple[Org, ...]
    description: dict[str, Any]
    warnings: tuple[str, ...] = ()  # about the inputs; the report repeats them


@dataclass(slots=True)
class Comparison:
    summaries: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


def make_workload(
    trace: list[TraceJob],
    quotas: list[Quota],
    cluster_spec: str | None = None,
    description: Mapping[str, Any] | None = None,
    quotas_source: str = "quotas",
    fit: bool = False,
) -> Workload:
    """The workload to simulate; with `fit`, guarantees beyond a type's capacity are scaled
    down to it (fit_guarantees) and the warning says by what factor."""
    groups = parse_cluster_spec(cluster_spec) if cluster_spec else default_cluster(quotas)
    warnings = check_quotas(quotas, groups, quotas_source)
    info = dict(description or {})
    if fit:
        quotas, factors = fit_guarantees(quotas, groups)
        warnings = [
            f"{w}; --fit-guarantees scaled them by {factors[t]:.4f} to fit"
            for w, t in zip(warnings, sorted(factors), strict=True)
        ]
        info["fit_guarantees"] = {t: round(f, 6) for t, f in sorted(factors.items())}
    nodes = build_nodes(groups)
    orgs = build_orgs(quotas, [j.tenant for j in trace], groups[0].gpu_type or DEFAULT_GPU_TYPE)
    info.update(
        jobs=len(trace),
        nodes=len(nodes),
        gpus=sum(len(n.gpus) for n in nodes),
        cluster=cluster_spec
        or ",".join(
            f"{g.site}:{g.nodes}x{g.gpus_per_node}x{g.gpu_type}/{g.domains}" for g in groups
        ),
    )
    return Workload(trace, quotas, nodes, orgs, info, tuple(warnings))


def load_workload(
    trace_path: Path,
    quotas_path: Path,
    cluster_spec: str | None,
    time_scale: float,
    big_gangs: BigGangs | None = None,
    fit: bool = False,
) -> Workload:
    """The trace file's workload, plus synthetic 64- and 128-GPU gangs when `big_gangs` asks;
    `fit` as make_workload's."""
    trace = load_trace(trace_path, time_scale)
    description: dict[str, Any] = {
        "trace": trace_path.name,
        "quotas": quotas_path.name,
        "time_scale": time_scale,
    }
    if big_gangs is not None:
        trace = add_big_gangs(trace, big_gangs.seed, big_gangs.rate_factor)
        description["big_gangs"] = {
            "seed": big_gangs.seed,
            "rate_factor": big_gangs.rate_factor,
            "added": sum(1 for j in trace if j.name.startswith("big")),
        }
    return make_workload(
        trace, load_quotas(quotas_path), cluster_spec, description, str(quotas_path), fit
    )


@dataclass(frozen=True, slots=True)
class BigGangs:
    """Synthetic big gangs to add to a trace (`--big-gangs SEED`, `--big-gang-rate-factor`)."""

    seed: int
    rate_factor: float = 1.0


def default_schedule() -> ScheduleFn:
    from scheduler.core import Scheduler  # imported when a simulation runs

    fn: ScheduleFn = Scheduler().schedule
    return fn


def run_policy(
    workload: Workload,
    policy: str,
    sim_config: SimConfig,
    *,
    schedule: ScheduleFn | None = None,
    progress: ProgressFn | None = None,
) -> SimResult:
    simulator = Simulator(
        policy=policy,
        trace=workload.trace,
        nodes=workload.nodes,
        orgs=workload.orgs,
        policy_config=policy_config(policy, half_life_s=sim_config.half_life_s),
        sim_config=sim_config,
        schedule=schedule or default_schedule(),
        progress=progress,
    )
    return simulator.run()


def compare(
    workload: Workload,
    policies: Sequence[str] = POLICY_NAMES,
    sim_config: SimConfig | None = None,
    *,
    schedule: ScheduleFn | None = None,
    progress: Callable[[str], ProgressFn] | None = None,
) -> Comparison:
    """Run every policy on the same workload; results keep the order of `policies`."""
    config = sim_config or SimConfig()
    comparison = Comparison()
    for policy in policies:
        result = run_policy(
            workload,
            policy,
            config,
            schedule=schedule,
            progress=progress(policy) if progress else None,
        )
        grace_s = policy_config(policy).preemption_grace_s
        summary, series = summarize(result, config.bucket_s, grace_s)
        comparison.summaries.append(summary)
        comparison.series[policy] = series
        stats = result.stats
        comparison.timings[policy] = {
            "wall_s": round(stats.wall_s, 2),
            "core_s": round(stats.core_s, 2),
            "snapshot_s": round(stats.snapshot_s, 2),
            "cycles": stats.cycles,
            "max_pending": stats.max_pending,
            "peak_rss_mib": round(peak_rss_mib(), 1),
        }
    return comparison


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_outputs(
    out_dir: Path,
    inputs: Mapping[str, Any],
    comparison: Comparison,
    workload: Workload | None = None,
) -> list[Path]:
    """summary.json is deterministic; wall-clock figures go to timings.json and the report.

    With the trace-mode `workload`, the report opens with its warnings and guarantees.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_summary(out_dir / "summary.json", inputs, comparison.summaries)
    (out_dir / "timings.json").write_text(json.dumps(comparison.timings, indent=2) + "\n")
    plots = write_plots(out_dir, comparison.series)
    guarantees = None
    if workload is not None:
        guarantees = {o.name: dict(o.guaranteed) for o in workload.orgs if o.guaranteed}
    report = render_markdown(
        inputs,
        comparison.summaries,
        comparison.timings,
        plots,
        guarantees,
        workload.warnings if workload is not None else (),
    )
    (out_dir / "report.md").write_text(report)
    names = ["summary.json", "timings.json", "report.md", *plots]
    return [out_dir / n for n in names]
