"""Durations, GPU requests, times and environment pairs as people type them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.parse import (
    GpuRequest,
    format_memory,
    parse_duration,
    parse_env,
    parse_gpus,
    parse_memory,
    parse_since,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h30m", 5400),
        ("90m", 5400),
        ("45s", 45),
        ("2d", 172_800),
        ("1w", 604_800),
        ("1.5h", 5400),
        ("90", 5400),  # Slurm: a bare number is minutes
        ("10:30", 630),  # MM:SS
        ("01:30:00", 5400),  # HH:MM:SS
        ("2-00:00:00", 172_800),
        ("1-12", 129_600),  # D-HH
        ("1-0:30", 88_200),  # D-HH:MM
        (" 2H ", 7200),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1x", "1h-2m", "-5", "0", "0s", "1:2:3:4", "h"])
def test_bad_durations_are_usage_errors(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_duration(text)


@settings(max_examples=60)
@given(st.integers(0, 30), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_slurm_and_unit_forms_agree(d: int, h: int, m: int, s: int) -> None:
    total = ((d * 24 + h) * 60 + m) * 60 + s
    if total == 0:
        return
    assert parse_duration(f"{d}-{h:02d}:{m:02d}:{s:02d}") == total
    assert parse_duration(f"{d}d{h}h{m}m{s}s") == total


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8", GpuRequest(None, 8)),
        ("H100:8", GpuRequest("H100", 8)),
        ("gpu:A100-80GB:2", GpuRequest("A100-80GB", 2)),
        ("gpu:4", GpuRequest(None, 4)),
    ],
)
def test_gpu_requests(text: str, want: GpuRequest) -> None:
    assert parse_gpus(text) == want


@pytest.mark.parametrize("text", ["", "H100", "H100:x", "a:b:c:d", "-1", "H100:"])
def test_bad_gpu_requests(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_gpus(text)


def test_since_accepts_dates_and_durations_ago() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T08:00+01:00", now).utcoffset() == timedelta(hours=1)
    with pytest.raises(typer.BadParameter):
        parse_since("last tuesday", now)


def test_env_pairs() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in (["A"], ["1A=2"], ["=x"]):
        with pytest.raises(typer.BadParameter):
            parse_env(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64G", 64 << 30),
        ("64g", 64 << 30),
        ("64GB", 64 << 30),
        ("64GiB", 64 << 30),
        ("512M", 512 << 20),
        ("1T", 1 << 40),
        ("1.5G", 3 << 29),
        ("4096", 4 << 30),  # Slurm: a bare number is MiB
        ("2048K", 2 << 20),
        (" 8G ", 8 << 30),
    ],
)
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "G", "64X", "-1G", "0", "1K", "65T", "64 G B", "1e3G"])
def test_bad_memory_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_memory(text)


@given(st.integers(1, 64 << 10), st.sampled_from(["M", "G"]))
def test_memory_formats_back_as_typed(n: int, unit: str) -> None:
    size = parse_memory(f"{n}{unit}")
    if size <= 1 << 46:
        assert parse_memory(format_memory(size)) == size
