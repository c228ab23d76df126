"""Trace and quota files, cluster specs and the job model's time limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.sim.cluster import build_nodes, default_cluster, gang_shape, parse_cluster_spec
from scheduler.sim.config import SimConfig, TimeLimitModel
from scheduler.sim.trace import (
    Quota,
    TraceError,
    TraceJob,
    generate_trace,
    load_quotas,
    load_trace,
    write_quotas,
    write_trace,
)


def test_trace_round_trip_divides_submit_times(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_trace(path, [TraceJob("b", "x", 600, 10, 2), TraceJob("a", "y", 60, 5, 1)])
    jobs = load_trace(path, time_scale=6)
    assert [(j.name, j.submit_time_s, j.num_gpus) for j in jobs] == [("a", 10, 1), ("b", 100, 2)]


def test_trace_with_missing_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("job_id,submit_time_s,duration_s\n1,0,5\n")
    with pytest.raises(TraceError, match="num_gpus"):
        load_trace(path)


def test_quotas_round_trip_and_default_cluster(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    write_quotas(path, [Quota("a", 512), Quota("b", 64)])
    quotas = load_quotas(path)
    assert quotas == [Quota("a", 512), Quota("b", 64)]
    (group,) = default_cluster(quotas)
    nodes = build_nodes([group])
    assert len(nodes) == 72
    assert {len(n.gpus) for n in nodes} == {8}
    assert len({n.domain for n in nodes}) == 2


def test_cluster_spec_with_sites_types_and_domains() -> None:
    groups = parse_cluster_spec("east:4x8xH100/2, west:2x4xA100")
    nodes = build_nodes(groups)
    assert [(n.site, n.gpu_type, len(n.gpus)) for n in nodes[3:5]] == [
        ("east", "H100", 8),
        ("west", "A100", 4),
    ]
    assert sorted({n.domain for n in nodes}) == ["east-d0", "east-d1", "west-d0"]
    with pytest.raises(TraceError):
        parse_cluster_spec("4 nodes")


@given(st.integers(min_value=1, max_value=512), st.sampled_from([4, 8]))
def test_gang_shape_covers_the_job_exactly(gpus: int, per_node: int) -> None:
    tasks, nodes = gang_shape(gpus, per_node)
    assert tasks * nodes == gpus
    assert tasks <= per_node


def test_time_limit_models() -> None:
    assert SimConfig(time_limit_model=TimeLimitModel.EXACT).time_limit_s(90) == 90
    assert (
        SimConfig(time_limit_model=TimeLimitModel.FACTOR, time_limit_factor=2).time_limit_s(90)
        == 180
    )
    assert SimConfig().time_limit_s(3_601) == 7_200
    assert SimConfig().time_limit_s(5) == 3_600


def test_generated_trace_is_philly_shaped_and_reproducible() -> None:
    a = generate_trace(jobs=2_000, tenants=["t0", "t1", "t2"], seed=3)
    assert a == generate_trace(jobs=2_000, tenants=["t0", "t1", "t2"], seed=3)
    single = sum(1 for j in a if j.num_gpus == 1) / len(a)
    assert 0.85 < single < 0.98
    assert sum(1 for j in a if j.tenant == "t0") > sum(1 for j in a if j.tenant == "t1")
