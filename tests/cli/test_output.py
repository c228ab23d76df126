"""Human times and the output formats."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from cli.output import Column, Format, elapsed, human_duration, relative, render


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (60, "1m"),
        (750, "12m30s"),
        (3600, "1h"),
        (7980, "2h13m"),
        (86_400 * 3 + 3600 * 4, "3d4h"),
        (86_400 * 2, "2d"),
        (-5, "0s"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_relative_times() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert relative((now + timedelta(minutes=40)).isoformat(), now) == "in 40m"
    assert relative((now - timedelta(minutes=5)).isoformat(), now) == "5m ago"
    assert relative("2026-11-22T12:00:00", now) == "now"  # naive means UTC
    assert relative(None, now) == "-"
    assert elapsed("2026-11-22T10:00:00Z", now=now) == "2h"
    assert elapsed("2026-11-22T10:00:00Z", "2026-11-22T10:00:30Z") == "30s"


COLUMNS = [Column("ID", lambda r: r["id"]), Column("NAME", lambda r: r["name"], wide_only=True)]
ROWS: list[dict[str, Any]] = [{"id": 1, "name": "train"}, {"id": 22, "name": None}]


def test_table_wide_and_no_headers(capsys: pytest.CaptureFixture[str]) -> None:
    render(ROWS, COLUMNS, Format.TABLE)
    out = capsys.readouterr().out
    assert "ID" in out
    assert "22" in out
    assert "NAME" not in out
    render(ROWS, COLUMNS, Format.WIDE, no_headers=True)
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines == [["1", "train"], ["22", "-"]]


def test_json_and_yaml_are_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    render(ROWS, COLUMNS, Format.JSON)
    assert json.loads(capsys.readouterr().out) == ROWS
    render(ROWS, COLUMNS, Format.YAML, data={"data": ROWS})
    assert yaml.safe_load(capsys.readouterr().out) == {"data": ROWS}
