"""`fairgpu usage`: GPU-hours allocated and busy, and energy, by org, user or GPU type (sreport)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from cli.client import connect
from cli.output import Column, Format, NoHeadersOption, OutputOption, local_time, render
from cli.parse import parse_since


class By(StrEnum):
    ORG = "org"
    USER = "user"
    GPU_TYPE = "gpu_type"


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def usage(
    output: OutputOption = Format.TABLE,
    no_headers: NoHeadersOption = False,
    by: Annotated[By, typer.Option("--by", help="org, user or gpu_type.")] = By.ORG,
    period: Annotated[Period, typer.Option("--period", help="day, week or month.")] = Period.DAY,
    since: Annotated[
        str, typer.Option("--starttime", "-S", help="ISO date or a duration ago (default 30d).")
    ] = "30d",
    until: Annotated[
        str | None, typer.Option("--endtime", "-E", help="ISO date or a duration ago.")
    ] = None,
    account: Annotated[str | None, typer.Option("--account", "-A", help="Only this org.")] = None,
) -> None:
    """GPU-hours allocated, busy and billed, energy, and GPU-hours lost to preemption."""
    params: dict[str, Any] = {
        "by": by.value,
        "period": period.value,
        "since": parse_since(since).isoformat(),
        "until": parse_since(until).isoformat() if until else None,
        "org": account,
    }
    with connect("usage") as client:
        body = client.get("/v1/usage", **params)
    render(
        body["data"],
        [
            Column("PERIOD", lambda r: local_time(r["period_start"])[:10]),
            Column(by.value.upper(), lambda r: r["key"]),
            Column("GPU_HOURS", lambda r: f"{r['gpu_hours_allocated']:.2f}", justify="right"),
            Column("BUSY_HOURS", lambda r: f"{r['gpu_hours_busy']:.2f}", justify="right"),
            Column("BUSY", lambda r: _ratio(r), justify="right"),
            Column("BILLED", lambda r: f"{r['billed_gpu_hours']:.2f}", justify="right"),
            Column("ENERGY_KWH", lambda r: f"{r['energy_joules'] / 3.6e6:.2f}", justify="right"),
            Column("PREEMPTED_H", lambda r: f"{r['preempted_gpu_hours']:.2f}", justify="right"),
        ],
        output,
        no_headers=no_headers,
        data=body,
        empty="no usage in that period",
    )


def _ratio(row: dict[str, Any]) -> str:
    allocated = row["gpu_hours_allocated"]
    return f"{row['gpu_hours_busy'] / allocated * 100:.0f}%" if allocated else "-"
