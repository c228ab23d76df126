"""A user's first minutes: bare `fairgpu` says where to start, a command before login says the
exact login to run, `login` checks the token and says who it belongs to, and shell completion
installs and completes (real bash, real `fairgpu` processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import app
from tests.harness.served import Served

FAIRGPU = Path(sys.executable).with_name("fairgpu")


def bare_env(config_dir: Path, **extra: str) -> dict[str, str | None]:
    """No server or token from the test's own environment: only what the test gives."""
    return {"FAIRGPU_SERVER": None, "FAIRGPU_TOKEN": None, "FAIRGPU_INSECURE": None,
            "FAIRGPU_CA_FILE": None, "FAIRGPU_CONFIG_DIR": str(config_dir), **extra}  # fmt: skip


def test_bare_fairgpu_lists_the_commands_and_where_to_start(served: Served) -> None:
    nothing = served.runner.invoke(app, [], env=bare_env(served.config_dir))
    assert nothing.exit_code == 0
    assert "  submit " in nothing.stdout
    assert "Start here:" in nothing.stdout
    assert "fairgpu login --server URL" in nothing.stdout
    with_server = served.runner.invoke(
        app, [], env=bare_env(served.config_dir, FAIRGPU_SERVER=served.url)
    )
    assert f"fairgpu login --server {served.url}" in with_server.stdout


def test_a_command_before_login_says_the_exact_login_to_run(served: Served) -> None:
    result = served.runner.invoke(
        app, ["queue"], env=bare_env(served.config_dir, FAIRGPU_SERVER=served.url)
    )
    assert result.exit_code == 4
    assert result.stderr.strip() == (
        f"fairgpu: error: not logged in to {served.url}: "
        f"run `fairgpu login --server {served.url}` or set FAIRGPU_TOKEN"
    )


def test_login_checks_the_token_and_says_who_it_belongs_to(served: Served) -> None:
    served.ok("org", "create", "acme")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    env = bare_env(served.config_dir)
    refused = served.runner.invoke(
        app, ["login", "--server", served.url, "--token", "fg_u_wrong"], env=env
    )
    assert refused.exit_code == 4
    assert "login: not authenticated" in refused.stderr
    assert not (served.config_dir / "config.json").exists()

    # The token is asked for, not typed on the command line.
    logged = served.runner.invoke(
        app, ["login", "--server", served.url], input=ada["token"] + "\n", env=env
    )
    assert logged.exit_code == 0, logged.output
    assert f"Logged in to {served.url} as ada (member) in org acme" in logged.stdout
    assert ada["token"] not in logged.stdout
    assert (served.config_dir / "config.json").stat().st_mode & 0o777 == 0o600
    # The saved server and token are used from then on.
    who = served.runner.invoke(app, ["whoami", "-o", "json"], env=env)
    assert who.exit_code == 0, who.output
    assert (json.loads(who.stdout)["name"], json.loads(who.stdout)["org"]) == ("ada", "acme")
    # And `login` alone logs in again to the saved server.
    again = served.runner.invoke(app, ["login", "--token", served.admin_token], env=env)
    assert f"Logged in to {served.url} as root (platform-admin);" in again.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_completion_writes_bash_completion_that_completes(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "FAIRGPU_CONFIG_DIR": str(tmp_path / "cfg")}
    env["PATH"] = f"{FAIRGPU.parent}{os.pathsep}{env['PATH']}"
    # The shell is the one the command is typed in (Typer looks at the parent process), so the
    # command runs from bash, as a user's would: under `make` the test's own parent is sh (and
    # `; exit` keeps bash from exec'ing the command, which would leave sh as its parent).
    installed = subprocess.run(
        ["bash", "-c", f"'{FAIRGPU}' --install-completion; exit $?"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / ".bash_completions" / "fairgpu.sh"
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        shell = (f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                 '_fairgpu_completion fairgpu; printf "%s\\n" "${COMPREPLY[@]}"')  # fmt: skip
        out = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("fairgpu", "que") == ["queue"]
    assert complete("fairgpu", "queue", "--st") == ["--states", "--start"]
    assert complete("fairgpu", "node", "l") == ["list"]
