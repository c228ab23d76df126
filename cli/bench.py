"""`fairgpu bench ...`: benchmarks that print one JSON object per measurement on stdout."""

from __future__ import annotations

import json
from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks; each prints JSON lines on stdout.", no_args_is_help=True)


@app.command("core")
def core(
    quick: Annotated[
        bool, typer.Option("--quick", help="Only the small sizes: a few seconds in all.")
    ] = False,
    size: Annotated[
        list[str] | None,
        typer.Option(
            "--size",
            help="A size to run (repeatable): tiny, small, medium, wide, deep, large.",
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(min=1, help="Cycles timed per size (default 20 small, 7 large)."),
    ] = None,
) -> None:
    """Time full scheduling cycles on synthetic snapshots; one JSON line per size."""
    from scheduler.core import bench as core_bench

    names = tuple(size) if size else (core_bench.QUICK if quick else core_bench.DEFAULT)
    unknown = [n for n in names if n not in core_bench.SIZES]
    if unknown:
        raise typer.BadParameter(f"unknown size(s): {', '.join(unknown)}", param_hint="--size")
    for row in core_bench.run(names, repeats):
        typer.echo(json.dumps(row))
