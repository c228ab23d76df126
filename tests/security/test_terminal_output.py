"""A job's text is another user's text: `describe` and `queue`, as a colleague or a platform
admin reads them, print its control characters as escapes, never raw, so that a hostile job
cannot drive the reader's terminal (OSC 52 writes the clipboard, others retitle the window,
move the cursor over earlier lines, or reverse the text with a bidi override)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.served import Served, serve

HOSTILE = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\u202e"


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    yield from serve(database_url, tmp_path)


def test_describe_and_queue_escape_control_characters(served: Served) -> None:
    served.ok("org", "create", "acme")
    job_id = served.ok(
        "submit", "--parsable", "-A", "acme", "-t", "10", "-e", f"X={HOSTILE}",
        "--", "echo", HOSTILE,
    ).strip()  # fmt: skip
    for args in (("describe", job_id), ("queue", "-A", "acme"), ("queue", "-o", "wide")):
        out = served.ok(*args)
        assert not any(c in out for c in "\x1b\x07\u202e"), (args, out)
    described = served.ok("describe", job_id)
    assert "echo \\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\u202e" in described
    assert "X=\\x1b]52" in described
