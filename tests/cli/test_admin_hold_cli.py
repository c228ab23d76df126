"""`fairgpu hold` by an org admin is an admin hold: the member's `release` fails in one line
naming who held it and why, `describe` and `explain` show it, `hold --user` leaves it to the
owner. Real server on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from tests.harness.served import Served


def test_an_admins_hold_through_the_cli(served: Served) -> None:
    served.ok("org", "create", "acme")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    boss = json.loads(
        served.ok(
            "user", "create", "boss", "--org", "acme", "--role", "org-admin", "--token",
            "-o", "json",
        )
    )  # fmt: skip
    job = served.ok("submit", "--parsable", "-G", "1", "-t", "1h", "sleep", "9", token=ada["token"])
    job = job.strip()
    out = served.ok("hold", job, "--reason", "quota review", token=boss["token"])
    assert f"Held job {job} (admin hold)" in out
    refused = served.run("release", job, token=ada["token"])
    assert refused.exit_code != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "held by an admin by user:boss (quota review)" in lines[0]
    described = served.ok("describe", job, token=ada["token"])
    assert "admin hold by user:boss: quota review" in described
    assert "JobHeldAdmin" in served.ok("explain", job, token=ada["token"])
    assert "(JobHeldAdmin)" in served.ok("queue", token=ada["token"])
    assert "Released" in served.ok("release", job, token=boss["token"])
    assert "(user hold)" in served.ok("hold", job, "--user", token=boss["token"])
    assert "Released" in served.ok("release", job, token=ada["token"])
