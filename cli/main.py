"""The `fairgpu` command: one Typer app; each command lives in its own module, imported only
when it runs (cli/lazy.py, cli/commands.py)."""

from __future__ import annotations

import sys
import threading

import typer

from cli.commands import COMMANDS
from cli.lazy import LazyGroup


class _Fairgpu(LazyGroup):
    commands_lazy = COMMANDS


app = typer.Typer(
    name="fairgpu",
    help="fairgpu: fair-share GPU scheduling for shared GPU data centres.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: see cli/lazy.plain
    cls=_Fairgpu,
)


@app.callback()
def _root() -> None:
    """fairgpu: fair-share GPU scheduling for shared GPU data centres."""


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
