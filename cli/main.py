"""The `fairgpu` command: one Typer app; each command lives in its own module, imported only
when it runs (cli/lazy.py, cli/commands.py)."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING

import typer

from cli.commands import COMMANDS
from cli.lazy import LazyGroup

if TYPE_CHECKING:
    from cli.config import Credentials


class _Fairgpu(LazyGroup):
    commands_lazy = COMMANDS


app = typer.Typer(
    name="fairgpu",
    help="fairgpu: fair-share GPU scheduling for shared GPU data centres.",
    invoke_without_command=True,  # bare `fairgpu`: the help and where to start (_root)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: see cli/lazy.plain
    cls=_Fairgpu,
)


@app.callback()
def _root(ctx: typer.Context) -> None:
    """fairgpu: fair-share GPU scheduling for shared GPU data centres."""
    if ctx.invoked_subcommand is None:
        from cli.config import resolve

        typer.echo(ctx.get_help())
        typer.echo("\n" + start_here(resolve()))


def start_here(creds: Credentials | None) -> str:
    """The first commands to run, from what this shell has configured (read locally: bare
    `fairgpu` answers at once, whatever the network)."""
    from cli.config import login_command

    if creds is None:
        first = [
            (login_command(None), "the URL and a token come from your cluster's admin"),
            ("fairgpu whoami", "who the server thinks you are"),
        ]
    elif creds.token is None:
        first = [(login_command(creds.server, creds.insecure), f"not logged in to {creds.server}")]
    else:
        first = [("fairgpu whoami", f"logged in to {creds.server}")]
    first += [
        ("fairgpu submit -G 1 -t 1h -- python train.py", "a job: 1 GPU for an hour"),
        ("fairgpu submit train.sh", "a batch script with #FAIRGPU or #SBATCH lines"),
        ("fairgpu queue --me", "your jobs, and why each waits"),
        ("fairgpu --install-completion", "tab completion for your shell"),
    ]
    width = max(len(command) for command, _ in first)
    lines = [f"  {command:<{width}}  # {why}" for command, why in first]
    return "\n".join(["Start here:", *lines, "Coming from Slurm? docs/CLI.md maps sbatch, squeue "
                       "and friends to fairgpu."])  # fmt: skip


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
