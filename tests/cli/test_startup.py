"""A person waits for every start-up: the CLI imports only what the command it runs needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli.commands import COMMANDS

HEAVY = ("sqlalchemy", "alembic", "fastapi", "matplotlib", "pynvml", "uvicorn", "httpx")
USER_MODULES = ("cli.main", "cli.jobs", "cli.submit", "cli.history", "cli.orgs", "cli.users",
                "cli.nodes", "cli.usage")  # fmt: skip
# What a person's everyday command needs none of: tables and help are plain text.
PRESENTATION = ("rich", "markdown_it", "yaml")


def _imported_after(statement: str, env: dict[str, str] | None = None) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return {name.split(".")[0] for name in out.stdout.splitlines()[-1].split()}


@pytest.mark.parametrize("module", USER_MODULES)
def test_user_commands_import_no_server_database_or_gpu_library(module: str) -> None:
    assert _imported_after(f"import {module}") & {*HEAVY, *PRESENTATION} == set()


@pytest.mark.parametrize("args", [[], ["--help"], ["queue", "--help"], ["node", "list", "--help"]])
def test_help_is_printed_without_rich(args: list[str]) -> None:
    run = f"from cli.main import app\ntry: app({args!r})\nexcept SystemExit: pass"
    assert _imported_after(f"exec({run!r})") & {*HEAVY, *PRESENTATION} == set()


@pytest.mark.parametrize(
    "args",
    [["submit", "--hold", "-G", "H100:2", "-N", "2", "-t", "1h", "-e", "A=1", "--", "true"],
     ["queue", "-o", "wide", "-t", "PD,R", "--me"], ["cancel", "7", "8"], ["usage", "--by", "user"],
     ["history", "-S", "2d"], ["describe", "7", "-o", "json"]],
)  # fmt: skip
def test_a_command_runs_without_pydantic(args: list[str]) -> None:
    """Typer would convert each option through pydantic (cli/coercion.py): the command parses
    its options, then fails to reach a closed port (exit 3), with no pydantic imported."""
    run = (
        f"from cli.main import app\ntry: app({args!r})\nexcept SystemExit as e: assert e.code == 3"
    )
    env = {"FAIRGPU_SERVER": "http://127.0.0.1:1", "FAIRGPU_TOKEN": "fg_u_x"}
    assert _imported_after(f"exec({run!r})", env) & {*HEAVY, *PRESENTATION, "pydantic"} == set()


def test_the_entry_point_imports_no_command_module() -> None:
    loaded = _imported_after("import cli.main")
    assert not loaded & {"httpx", "rich", "yaml", "scheduler", "api", "agents", *HEAVY}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_listed_help_is_the_commands_own(name: str) -> None:
    entry = COMMANDS[name]
    command = entry.load(name)
    own = (command.help or "").strip().splitlines()[0]
    assert entry.help == own
