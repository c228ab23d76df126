"""`fairgpu simulate` end to end on a small generated trace, and the run's determinism."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from scheduler.sim.trace import Quota, generate_trace, write_quotas, write_trace

TENANTS = ["big", "mid", "small"]


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    trace, quotas = tmp_path / "trace.csv", tmp_path / "quotas.csv"
    write_trace(trace, generate_trace(jobs=300, tenants=TENANTS, mean_interarrival_s=30, seed=7))
    write_quotas(quotas, [Quota("big", 16), Quota("mid", 8), Quota("small", 8)])
    return trace, quotas


def simulate(trace: Path, quotas: Path, out: Path, *extra: str) -> str:
    args = ["simulate", "--trace", str(trace), "--quotas", str(quotas), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_simulate_writes_every_output_for_every_policy(tmp_path: Path) -> None:
    trace, quotas = write_inputs(tmp_path)
    output = simulate(trace, quotas, tmp_path / "out", "--time-scale", "2")
    assert "wait mean (h)" in output
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"summary.json", "timings.json", "report.md", "allocation.png",
                     "tenants.png", "wait_cdf.png"}  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["policies"]) == ["fairgpu", "fifo", "slurm-like"]
    claims = {c["claim"].split(":")[0] for c in summary["checks"]}
    assert "allocation during_arrivals_ratio" in claims
    for figures in summary["policies"].values():
        assert figures["jobs"]["completed"] + figures["jobs"]["unschedulable"] == 300
        assert set(figures["tenants"]) == set(TENANTS)
        assert 0 < figures["allocation"]["overall_ratio"] <= 1
    assert (tmp_path / "out" / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Tenants under slurm-like" in (tmp_path / "out" / "report.md").read_text()


def test_same_input_gives_identical_summary(tmp_path: Path) -> None:
    trace, quotas = write_inputs(tmp_path)
    for out in ("one", "two"):
        simulate(trace, quotas, tmp_path / out, "--policy", "fairgpu", "--time-scale", "4")
    first = (tmp_path / "one" / "summary.json").read_bytes()
    assert first == (tmp_path / "two" / "summary.json").read_bytes()
    assert json.loads(first)["policies"]["fairgpu"]["jobs"]["total"] == 300


def test_from_db_reads_the_quotas_file_first(tmp_path: Path) -> None:
    """--from-db is real now (tests/sim/test_from_db.py); a missing file fails before the DB."""
    missing = tmp_path / "proposed.csv"
    args = ["simulate", "--from-db", "--since", "30d", "--quotas", str(missing)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "No such file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    trace, quotas = write_inputs(tmp_path)
    args = ["simulate", "--trace", str(trace), "--quotas", str(quotas), "--policy", "lottery"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "lottery" in result.output


def test_a_quota_the_cluster_cannot_hold_is_a_one_line_error(tmp_path: Path) -> None:
    trace, _ = write_inputs(tmp_path)
    quotas = tmp_path / "typed.csv"
    quotas.write_text("tenant,gpus,gpu_type\nbig,16,H100\nmid,8,A100\nsmall,8\n")
    args = ["simulate", "--trace", str(trace), "--quotas", str(quotas)]
    result = CliRunner().invoke(app, [*args, "--cluster", "2x8xH100,4x4xA100"])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {quotas}:4: quota of small names no gpu_type")


def test_oversubscribed_guarantees_are_warned_of_and_repeated_in_the_report(
    tmp_path: Path,
) -> None:
    trace, _ = write_inputs(tmp_path)
    quotas = tmp_path / "typed.csv"
    quotas.write_text("tenant,gpus,gpu_type\nbig,16,H100\nmid,24,A100\nsmall,8,H100\n")
    out = tmp_path / "out"
    args = ["simulate", "--trace", str(trace), "--quotas", str(quotas), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--cluster", "2x8xH100,4x4xA100", "--policy", "fifo"])
    assert result.exit_code == 0, result.output
    warning = f"{quotas}: guarantees of A100 add up to 24 GPUs, above the cluster's 16 A100 GPUs"
    assert f"warning: {warning}" in result.stderr
    assert f"**Warning:** {warning}" in (out / "report.md").read_text()


def test_fit_guarantees_scales_an_oversubscribed_type_and_says_so(tmp_path: Path) -> None:
    trace, _ = write_inputs(tmp_path)
    quotas = tmp_path / "typed.csv"
    quotas.write_text("tenant,gpus,gpu_type\nbig,16,H100\nmid,24,A100\nsmall,8,A100\n")
    out = tmp_path / "out"
    args = ["simulate", "--trace", str(trace), "--quotas", str(quotas), "--out", str(out)]
    cluster = ["--cluster", "2x8xH100,4x4xA100", "--policy", "fairgpu", "--fit-guarantees"]
    result = CliRunner().invoke(app, [*args, *cluster])
    assert result.exit_code == 0, result.output
    warning = (
        f"{quotas}: guarantees of A100 add up to 32 GPUs, above the cluster's 16 A100 GPUs; "
        "--fit-guarantees scaled them by 0.5000 to fit"
    )
    assert f"warning: {warning}" in result.stderr
    report = (out / "report.md").read_text()
    assert f"**Warning:** {warning}" in report
    assert "| big | 0 | 16 |" in report
    assert "| mid | 12 | 0 |" in report
    assert "| small | 4 | 0 |" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["fit_guarantees"] == {"A100": 0.5}


def test_fit_guarantees_is_refused_with_from_db(tmp_path: Path) -> None:
    quotas = tmp_path / "q.csv"
    quotas.write_text("org,gpu_type,guaranteed,limit\n")
    args = ["simulate", "--from-db", "--since", "30d", "--quotas", str(quotas), "--fit-guarantees"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--fit-guarantees" in result.output
