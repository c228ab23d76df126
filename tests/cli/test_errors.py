"""Errors are one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.harness.served import Served


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_server(tmp_path: Path) -> None:
    env = {
        "FAIRGPU_SERVER": f"http://127.0.0.1:{closed_port()}",
        "FAIRGPU_TOKEN": "x",
        "FAIRGPU_CONFIG_DIR": str(tmp_path),
    }
    for args in (["queue"], ["submit", "true"], ["org", "list", "-o", "json"], ["logs", "1"]):
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 3, (args, result.output)
        assert "cannot reach server" in one_line(result.stderr)
        assert result.stdout == ""


def test_nothing_configured(tmp_path: Path) -> None:
    env = {"FAIRGPU_SERVER": "", "FAIRGPU_TOKEN": "", "FAIRGPU_CONFIG_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["queue"], env=env)
    assert result.exit_code == 2
    assert "fairgpu login" in one_line(result.stderr)


@pytest.mark.parametrize("bad", ["1x", "0", "soon", "1:2:3:4"])
def test_bad_duration_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    env = {"FAIRGPU_SERVER": "http://127.0.0.1:1", "FAIRGPU_CONFIG_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["submit", "-t", bad, "--", "true"], env=env)
    assert result.exit_code == 2
    assert "duration" in result.stderr
    assert "Traceback" not in result.output


def test_server_side_errors(served: Served) -> None:
    bad_token = served.run("queue", token="fg_u_not-a-token")
    assert bad_token.exit_code == 4
    assert "not authenticated" in one_line(bad_token.stderr)

    unknown = served.run("describe", "999")
    assert unknown.exit_code == 5
    assert "999" in one_line(unknown.stderr)
    for args in (["explain", "999"], ["logs", "999"], ["cancel", "999"], ["hold", "999"]):
        result = served.run(*args)
        assert result.exit_code != 0, args
        assert "999" in one_line(result.stderr)

    served.ok("org", "create", "acme")
    duplicate = served.run("org", "create", "acme")
    assert duplicate.exit_code == 1
    assert "acme" in one_line(duplicate.stderr)
    invalid = served.run("org", "create", "bad name!")
    assert invalid.exit_code == 1
    assert "HTTP 422" in one_line(invalid.stderr)
    missing = served.run("quota", "set", "nope", "--gpu-type", "H100", "--guaranteed", "1")
    assert missing.exit_code == 5
    member = served.ok("user", "create", "bo", "--org", "acme", "--token", "-o", "json")
    token = __import__("json").loads(member)["token"]
    forbidden = served.run("org", "create", "other", token=token)
    assert forbidden.exit_code == 4
    assert "forbidden" in one_line(forbidden.stderr)
    wrong_org = served.run("submit", "-A", "other", "true", token=token)
    assert wrong_org.exit_code != 0
    assert "Traceback" not in wrong_org.output
