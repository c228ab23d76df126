"""The what-if on a cluster's own history: recorded jobs under proposed quotas, beside reality."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scheduler.core.types import Org
from scheduler.sim.cluster import build_nodes, parse_cluster_spec
from scheduler.sim.config import SimConfig, policy_config
from scheduler.sim.engine import ProgressFn
from scheduler.sim.history import History, to_trace
from scheduler.sim.metrics import summarize
from scheduler.sim.proposed import ProposedQuota, apply_quotas
from scheduler.sim.recorded import RECORDED, recorded_result
from scheduler.sim.runner import Comparison, Workload, compare
from scheduler.sim.trace import TraceError


def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


def whatif_workload(
    history: History,
    proposed: Sequence[ProposedQuota],
    quotas_path: Path,
    cluster_spec: str | None,
    config: SimConfig,
) -> Workload:
    """The recorded jobs on the recorded cluster (or `cluster_spec`) under the proposed quotas."""
    window = f"between {iso(history.since_s)} and {iso(history.until_s)}"
    if not history.jobs:
        skipped = ", ".join(f"{n} {why}" for why, n in history.left_out.items())
        raise TraceError(
            f"no jobs to replay: none submitted {window} held GPUs"
            + (f" ({skipped})" if skipped else "")
        )
    nodes = build_nodes(parse_cluster_spec(cluster_spec)) if cluster_spec else history.nodes
    if not nodes:
        raise TraceError("the database records no nodes with GPUs: nothing to replay on")
    orgs = apply_quotas(history.orgs, proposed, {n.gpu_type for n in nodes}, quotas_path)
    trace = to_trace(history, config.checkpoint_interval_s)
    description: dict[str, Any] = {
        "source": "database",
        "since": iso(history.since_s),
        "until": iso(history.until_s),
        "start": iso(history.start_s),
        "quotas": quotas_path.name,
        "jobs": len(trace),
        "jobs_censored_running_at_read": history.censored,
        "jobs_left_out": history.left_out,
        "nodes": len(nodes),
        "gpus": sum(len(n.gpus) for n in nodes),
        "cluster": cluster_spec or "as recorded",
        "quotas_recorded": _quota_table(history.orgs),
        "quotas_proposed": _quota_table(orgs),
    }
    return Workload(trace, [], nodes, orgs, description)


def _quota_table(orgs: Sequence[Org]) -> dict[str, dict[str, Any]]:
    return {
        o.name: {
            "shares": o.shares,
            "guaranteed": dict(sorted(o.guaranteed.items())),
            "limit": dict(sorted(o.limit.items())),
        }
        for o in orgs
    }


def compare_whatif(
    history: History,
    workload: Workload,
    policies: Sequence[str],
    config: SimConfig,
    *,
    progress: Callable[[str], ProgressFn] | None = None,
) -> Comparison:
    """Every policy under the proposed quotas, with what happened as the first column."""
    comparison = compare(workload, policies, config, progress=progress)
    total = sum(len(n.gpus) for n in history.nodes)
    result = recorded_result(history, workload.trace, total, config.checkpoint_interval_s)
    grace_s = policy_config("fairgpu").preemption_grace_s
    summary, series = summarize(result, config.bucket_s, grace_s)
    comparison.summaries.insert(0, summary)
    comparison.series = {RECORDED: series, **comparison.series}
    return comparison
