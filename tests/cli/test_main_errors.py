"""Whatever escapes a command ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_an_unexpected_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    # A directory where the SQLite file should be: the database layer fails deep inside.
    bad = tmp_path / "is-a-directory.db"
    bad.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "db", "check", "--database-url", f"sqlite:///{bad}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("fairgpu: error:")


def test_main_turns_any_escaping_exception_into_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cli.main

    def exploding_app() -> None:
        raise RuntimeError("boom\nsecond line that must not show")

    monkeypatch.setattr(cli.main, "app", exploding_app)
    with pytest.raises(SystemExit) as exit_info:
        cli.main.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "fairgpu: error: RuntimeError: boom\n"


def test_a_failing_background_thread_prints_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As when aiosqlite's worker thread outlives the event loop of a failed command."""
    import threading

    import cli.main

    def app_with_a_dying_thread() -> None:
        def worker() -> None:
            raise RuntimeError("Event loop is closed")

        t = threading.Thread(target=worker)
        t.start()
        t.join()

    monkeypatch.setattr(cli.main, "app", app_with_a_dying_thread)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after the test
    cli.main.main()
    assert "Traceback" not in capsys.readouterr().err
