"""Trace and quota files, cluster specs and the job model's time limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.sim.cluster import (
    build_nodes,
    default_cluster,
    fit_guarantees,
    gang_shape,
    parse_cluster_spec,
)
from scheduler.sim.config import SimConfig, TimeLimitModel
from scheduler.sim.runner import compare, make_workload, write_outputs
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


def _quotas(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "q.csv"
    path.write_text(text)
    return path


def test_quotas_take_one_row_per_tenant_and_type_with_limits_and_shares(tmp_path: Path) -> None:
    path = _quotas(
        tmp_path,
        "tenant,gpus,gpu_type,limit,shares\na,16,H100,32,3\na,8,A100,,\nb,4,A100,,\n",
    )
    quotas = load_quotas(path)
    assert quotas == [
        Quota("a", 16, "H100", 32, 3.0),
        Quota("a", 8, "A100"),
        Quota("b", 4, "A100"),
    ]
    workload = make_workload(
        [TraceJob("j", "c", 0, 10, 1)], quotas, "2x8xH100,4x4xA100", quotas_source=str(path)
    )
    assert workload.warnings == ()
    a, b, c = workload.orgs
    assert (a.name, a.guaranteed, a.limit, a.shares) == (
        "a",
        {"H100": 16, "A100": 8},
        {"H100": 32},
        3.0,
    )
    assert (b.guaranteed, b.shares) == ({"A100": 4}, 4.0)
    assert (c.name, c.guaranteed) == ("c", {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenant,gpus,gpu_type\na,8,H100\na,4,H100\n", r"q\.csv:3: a second row for a H100"),
        ("tenant,gpus,gpu_type\na,8,\na,4,A100\n", r"q\.csv:3: a has several rows"),
        ("tenant,gpus,limit\na,8,4\n", r"q\.csv:2: limit 4 is below gpus 8"),
        ("tenant,gpus,shares\na,8,-1\n", r"q\.csv:2: shares must be positive"),
        ("tenant,gpus\na,eight\n", r"q\.csv:2: gpus must be a whole number"),
        (
            "tenant,gpus,gpu_type,shares\na,8,H100,1\na,8,A100,2\n",
            r"q\.csv:3: shares 2 for a, which another row gives 1",
        ),
    ],
)
def test_bad_quota_rows_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        load_quotas(_quotas(tmp_path, text))


def test_quotas_that_do_not_fit_the_cluster_name_the_line(tmp_path: Path) -> None:
    trace = [TraceJob("j", "a", 0, 10, 1)]
    untyped = load_quotas(_quotas(tmp_path, "tenant,gpus\na,8\n"))
    with pytest.raises(TraceError, match=r"q\.csv:2: quota of a names no gpu_type.*A100, H100"):
        make_workload(trace, untyped, "2x8xH100,4x4xA100", quotas_source="q.csv")
    # On a one-type cluster a quota without a type is for that type.
    (org,) = make_workload(trace, untyped, "2x4xA100", quotas_source="q.csv").orgs
    assert org.guaranteed == {"A100": 8}
    absent = load_quotas(_quotas(tmp_path, "tenant,gpus,gpu_type\na,8,H100\nb,2,B200\n"))
    with pytest.raises(TraceError, match=r"q\.csv:3: quota of b is for B200, which the cluster"):
        make_workload(trace, absent, "2x8xH100", quotas_source="q.csv")


def test_guarantees_above_a_types_capacity_are_a_warning_the_report_repeats(
    tmp_path: Path,
) -> None:
    quotas = load_quotas(_quotas(tmp_path, "tenant,gpus,gpu_type\na,12,A100\nb,16,H100\n"))
    workload = make_workload(
        [TraceJob("j", "a", 0, 10, 1)], quotas, "2x8xH100,2x4xA100", quotas_source="q.csv"
    )
    assert workload.warnings == (
        "q.csv: guarantees of A100 add up to 12 GPUs, above the cluster's 8 A100 GPUs",
    )
    comparison = compare(workload, ["fairgpu"])
    write_outputs(tmp_path / "out", {"quotas": "q.csv"}, comparison, workload)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**Warning:** q.csv: guarantees of A100 add up to 12 GPUs" in report
    first_table = report[report.index("## ") :].splitlines()
    assert first_table[0] == "## Guaranteed GPUs by tenant and type"
    assert first_table[2:6] == [
        "| tenant | A100 | H100 |",
        "|---|---|---|",
        "| a | 12 | 0 |",
        "| b | 0 | 16 |",
    ]


def test_fit_guarantees_scales_only_the_types_beyond_capacity_and_keeps_shares() -> None:
    quotas = [
        Quota("a", 512, "H100"),
        Quota("b", 256, "H100", limit=600),
        Quota("c", 128, "H100", shares=7.0),
        Quota("a", 8, "A100"),
    ]
    groups = parse_cluster_spec("44x8xH100,2x8xA100")
    fitted, factors = fit_guarantees(quotas, groups)
    assert factors == {"H100": 352 / 896}
    # 201.1, 100.6, 50.3 rounded by largest remainder to add up to the 352 H100 GPUs.
    assert [(q.tenant, q.gpu_type, q.gpus) for q in fitted] == [
        ("a", "H100", 201),
        ("b", "H100", 101),
        ("c", "H100", 50),
        ("a", "A100", 8),
    ]
    assert [q.shares for q in fitted] == [520.0, 256.0, 7.0, 520.0]
    assert fitted[1].limit == 600
    orgs = make_workload([TraceJob("j", "a", 0, 10, 1)], fitted, "44x8xH100,2x8xA100").orgs
    unfitted = make_workload([TraceJob("j", "a", 0, 10, 1)], quotas, "44x8xH100,2x8xA100").orgs
    assert [o.shares for o in orgs] == [o.shares for o in unfitted]


@given(
    st.lists(st.integers(min_value=0, max_value=5_000), min_size=1, max_size=12),
    st.integers(min_value=1, max_value=600),
)
def test_fitted_guarantees_fill_the_capacity_exactly_in_proportion(
    gpus: list[int], nodes: int
) -> None:
    quotas = [Quota(f"t{i}", g) for i, g in enumerate(gpus)]
    capacity = nodes * 8
    fitted, factors = fit_guarantees(quotas, parse_cluster_spec(f"{nodes}x8"))
    total = sum(gpus)
    if total <= capacity:
        assert (fitted, factors) == (quotas, {})
        return
    assert sum(q.gpus for q in fitted) == capacity
    for q, f in zip(quotas, fitted, strict=True):
        assert abs(f.gpus - q.gpus * capacity / total) < 1
