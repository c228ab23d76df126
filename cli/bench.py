"""`fairgpu bench ...`: benchmarks that print one JSON object per measurement on stdout."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks; each prints JSON lines on stdout.", no_args_is_help=True)
