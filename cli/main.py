"""The `fairgpu` command: one Typer app; each command group lives in its own module."""

from __future__ import annotations

import typer

from cli import agent, bench, simulate

app = typer.Typer(
    name="fairgpu",
    help="fairgpu: fair-share GPU scheduling for shared GPU data centres.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(bench.app, name="bench")
app.command("simulate")(simulate.simulate)
app.command("agent")(agent.agent)


def main() -> None:
    app()
