"""`fairgpu submit --secret-env NAME=VALUE|NAME=@file` against a real server (SQLite and
PostgreSQL): the values are stored sealed, `describe` shows names only, and every refusal is one
line that names the variable, never its value."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import Result

from cli.main import app as cli_app
from scheduler.db import Job
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.secretenv import cipher, generate_key, unseal
from tests.conftest import run_async
from tests.harness.served import Served, serve

KEY = generate_key()


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    yield from serve(database_url, tmp_path)


@pytest.fixture
def keyed_served(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path
) -> Iterator[Served]:
    monkeypatch.setenv("FAIRGPU_SECRET_KEYS", KEY)
    yield from serve(database_url, tmp_path)


def _sealed(database_url: str, job_id: int) -> dict[str, str]:
    async def read() -> dict[str, str]:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                stored = await session.scalar(
                    select(Job.secret_env_ciphertext).where(Job.id == job_id)
                )
        finally:
            await engine.dispose()
        return dict(stored or {})

    return run_async(read)


def test_submit_with_secret_env(keyed_served: Served, database_url: str, tmp_path: Path) -> None:
    served = keyed_served
    served.ok("org", "create", "acme")
    token_file = tmp_path / "hf"
    token_file.write_text("hf_from_file_0123\n")
    out = served.ok(
        "submit", "--parsable", "-A", "acme", "-t", "10", "-e", "PLAIN=p",
        "--secret-env", "DB_PASSWORD=pw_inline_4567", "--secret-env", f"HF_TOKEN=@{token_file}",
        "--", "true",
    )  # fmt: skip
    job_id = int(out.strip())
    sealed = _sealed(database_url, job_id)
    assert set(sealed) == {"DB_PASSWORD", "HF_TOKEN"}
    assert "pw_inline_4567" not in str(sealed)
    assert unseal(cipher(KEY), sealed) == {
        "DB_PASSWORD": "pw_inline_4567",
        "HF_TOKEN": "hf_from_file_0123",
    }
    shown = served.ok("describe", str(job_id))
    assert "DB_PASSWORD=***" in shown
    assert "HF_TOKEN=***" in shown
    assert "PLAIN=p" in shown
    as_json = served.ok("describe", str(job_id), "-o", "json")
    for text in (shown, as_json):
        assert "pw_inline_4567" not in text
        assert "hf_from_file" not in text


def test_secret_env_errors(served: Served, tmp_path: Path) -> None:
    """Refused before anything is sent, in one line; a server without a key says how to set one."""
    served.ok("org", "create", "acme")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    cases = {
        "NOVALUE_secretvalue9": "use NAME=VALUE or NAME=@file",
        "1BAD=secretvalue9": "bad secret variable '1BAD'",
        f"T=@{tmp_path / 'missing'}": f"cannot read T from {tmp_path / 'missing'}: No such file",
        f"T=@{tmp_path}": "cannot read T from",
        "T=@": "names no file",
        f"T=@{binary}": "not UTF-8 text",
    }
    for item, expected in cases.items():
        result = served.run("submit", "-A", "acme", "-t", "10", "--secret-env", item, "--", "true")
        assert result.exit_code == 2, (item, result.output)
        assert expected in result.output, (item, result.output)
        assert "secretvalue9" not in result.output.replace("NOVALUE_secretvalue9", "")
    result = served.run(
        "submit", "-A", "acme", "-t", "10", "--secret-env", "T=secretvalue9", "--", "true"
    )
    assert result.exit_code == 1, result.output
    assert "FAIRGPU_SECRET_KEYS" in result.output
    assert "secretvalue9" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_gen_secret_key(served: Served) -> None:
    key = served.ok("admin", "gen-secret-key").strip()
    cipher(key)  # a valid Fernet key
    assert served.ok("admin", "gen-secret-key").strip() != key


def test_rotate_secrets(keyed_served: Served, database_url: str) -> None:
    """`admin rotate-secrets` re-seals with the first key, after which the old key can go."""
    served = keyed_served
    served.ok("org", "create", "acme")
    job_id = int(
        served.ok(
            "submit", "--parsable", "-A", "acme", "-t", "10", "--secret-env", "T=v1", "--", "true"
        ).strip()
    )
    new = generate_key()

    def rotate(keys: str | None) -> Result:
        env = {"FAIRGPU_DATABASE_URL": database_url, "FAIRGPU_SECRET_KEYS": keys}
        return served.runner.invoke(cli_app, ["admin", "rotate-secrets"], env=env)

    refused = rotate(None)
    assert refused.exit_code == 1, refused.output
    assert "gen-secret-key" in refused.output
    result = rotate(f"{new},{KEY}")
    assert result.exit_code == 0, result.output
    assert "re-encrypted the secrets of 1 job(s)" in result.output
    assert unseal(cipher(new), _sealed(database_url, job_id)) == {"T": "v1"}
    stranded = rotate(generate_key())
    assert stranded.exit_code == 1, stranded.output
    assert f"1 job(s) have secrets no listed key decrypts: {job_id}" in stranded.output
