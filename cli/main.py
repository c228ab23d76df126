"""The `fairgpu` command: one Typer app; each command group lives in its own module."""

from __future__ import annotations

import sys
import threading

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


def _quiet_thread_exception(args: threading.ExceptHookArgs) -> None:
    """A library's worker thread failing after its command already failed (aiosqlite delivering
    a result to an event loop `asyncio.run` has closed) must not print a traceback either."""
    if sys.flags.dev_mode:
        threading.__excepthook__(args)


def main() -> None:
    """Run the CLI; whatever escapes a command ends as one line on stderr, never a traceback.

    `python -X dev -m cli.main ...` (or PYTHONDEVMODE=1) shows the traceback for debugging.
    """
    threading.excepthook = _quiet_thread_exception
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("fairgpu: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the last line of defence for a person at a shell
        if sys.flags.dev_mode:
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"fairgpu: error: {exc.__class__.__name__}: {detail}".rstrip(": "), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
