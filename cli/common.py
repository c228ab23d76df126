"""What every command shares: settings from options, and errors as one line on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from scheduler.settings import Settings

NetworkOption = Annotated[
    str | None,
    typer.Option(
        "--network",
        help="private: a network of the job's own (no other job reaches what it listens on; "
        "one-node jobs, on nodes that can); host: the node's, shared with every job there "
        "(NCCL across nodes). Default: private where the node can, for a one-node job "
        "without --image.",
    ),
]
"""`submit` and `run`: the job's network (docs/ISOLATION.md, "The network")."""

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL or SQLite URL (default: FAIRGPU_DATABASE_URL, else ./fairgpu.db).",
        envvar="FAIRGPU_DATABASE_URL",
        show_envvar=True,
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: what a person at a terminal wants."""
    typer.echo(f"fairgpu: error: {message}", err=True)
    raise typer.Exit(code)


def load_settings(database_url: str | None = None) -> Settings:
    """The server-side settings (commands that talk to the database, not the user commands)."""
    from pydantic import ValidationError

    from scheduler.settings import Settings

    try:
        if database_url is not None:
            return Settings(database_url=database_url)
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(
            f"bad setting {where}: {first['msg']}" if where else f"bad settings: {first['msg']}", 2
        )


@contextmanager
def errors_as_lines() -> Iterator[None]:
    """Turn expected failures (database unreachable, bad input) into one line, not a traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except (OSError, ValueError) as exc:
        fail(str(exc) or exc.__class__.__name__)
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            fail(f"database: {detail}")
        if sys.flags.dev_mode:
            raise
        fail(f"{exc.__class__.__name__}: {exc}")
