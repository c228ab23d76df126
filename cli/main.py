"""The `fairgpu` command: one Typer app; each command group lives in its own module."""

from __future__ import annotations

import typer

from cli import admin, agent, bench, db, server, simulate
from cli import commands as user_commands

app = typer.Typer(
    name="fairgpu",
    help="fairgpu: fair-share GPU scheduling for shared GPU data centres.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(bench.app, name="bench")
app.command("simulate")(simulate.simulate)
app.command("agent")(agent.agent)
app.add_typer(db.app, name="db")
app.command("server")(server.server)
app.add_typer(admin.app, name="admin")
user_commands.register(app)


def main() -> None:
    app()
