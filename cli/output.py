"""Listings as people and scripts read them: aligned plain-text tables, or the API's own JSON /
YAML.

`-o table` shows the default columns, `-o wide` adds the rest, `-o json` and `-o yaml` print
the server's objects unchanged (so `json.loads` of the output is the API reply), and
`--no-headers` drops the header row for `awk`/`cut`. Times read as people say them: `2h13m`,
`in 40m`, `5m ago`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer

COLUMN_GAP = "   "


class Format(StrEnum):
    TABLE = "table"
    WIDE = "wide"
    JSON = "json"
    YAML = "yaml"


OutputOption = Annotated[
    Format, typer.Option("--output", "-o", help="table, wide, json or yaml.", case_sensitive=False)
]
NoHeadersOption = Annotated[
    bool, typer.Option("--no-headers", help="Leave out the header row (tables only).")
]


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    value: Callable[[dict[str, Any]], Any]
    wide_only: bool = False
    justify: str = "left"


def print_data(data: Any, fmt: Format) -> None:
    """JSON or YAML of the API objects, with datetimes as ISO strings."""
    if fmt is Format.JSON:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        import yaml  # only -o yaml pays for it

        typer.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def render(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    fmt: Format = Format.TABLE,
    *,
    no_headers: bool = False,
    data: Any = None,
    empty: str | None = None,
) -> None:
    """Print `rows` as `fmt`; for json/yaml print `data` (default: the rows themselves)."""
    if fmt in (Format.JSON, Format.YAML):
        print_data(list(rows) if data is None else data, fmt)
        return
    if not rows and empty and not no_headers:
        typer.echo(empty, err=True)
        return
    shown = [c for c in columns if fmt is Format.WIDE or not c.wide_only]
    lines = [[cell(c.value(row)) for c in shown] for row in rows]
    if not no_headers:
        lines.insert(0, [c.header for c in shown])
    typer.echo(table_text(lines, [c.justify == "right" for c in shown]), nl=bool(lines))


def table_text(lines: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns as wide as their widest cell, three spaces apart; one row per line whatever the
    terminal's width (squeue's way: `grep` and `awk` see whole rows)."""
    widths = [max((len(line[i]) for line in lines), default=0) for i in range(len(right))]
    return "\n".join(
        COLUMN_GAP.join(
            text.rjust(width) if flush_right else text.ljust(width)
            for text, width, flush_right in zip(line, widths, right, strict=True)
        ).rstrip()
        for line in lines
    )


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return visible(" ".join(str(value).splitlines()))  # one row, one line


def visible(text: str) -> str:
    """Control characters as escapes (`\\x1b`): a job's command, environment or name is another
    user's text, and must not drive the terminal of whoever reads it (an admin included)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def human_duration(seconds: float | None) -> str:
    """Two most significant units: `45s`, `12m30s`, `2h13m`, `3d4h`."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3_600:
        m, r = divmod(s, 60)
        return f"{m}m{r:02d}s" if r else f"{m}m"
    if s < 86_400:
        h, r = divmod(s, 3_600)
        return f"{h}h{r // 60:02d}m" if r // 60 else f"{h}h"
    d, r = divmod(s, 86_400)
    return f"{d}d{r // 3_600}h" if r // 3_600 else f"{d}d"


def parse_time(value: Any) -> datetime | None:
    """An API timestamp (ISO 8601) as an aware datetime; naive ones are UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def relative(value: Any, now: datetime | None = None) -> str:
    """`in 40m`, `5m ago`, `now`; `-` when unknown."""
    when = parse_time(value)
    if when is None:
        return "-"
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    if abs(delta) < 1:
        return "now"
    return f"in {human_duration(delta)}" if delta > 0 else f"{human_duration(-delta)} ago"


def local_time(value: Any) -> str:
    """A timestamp in the reader's zone, to the second: `2026-11-22 13:05:10`."""
    when = parse_time(value)
    if when is None:
        return "-"
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def elapsed(start: Any, end: Any = None, now: datetime | None = None) -> str:
    """Run time so far (or in all, once ended), as Slurm's TIME column."""
    began = parse_time(start)
    if began is None:
        return "0s"
    stop = parse_time(end) or now or datetime.now(UTC)
    return human_duration((stop - began).total_seconds())


def gib(n_bytes: Any) -> str:
    if not isinstance(n_bytes, int | float) or n_bytes <= 0:
        return "-"
    return f"{n_bytes / 2**30:.0f}GiB"
