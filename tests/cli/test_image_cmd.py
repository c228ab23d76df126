"""`fairgpu submit --image IMG` with no command submits a job that runs the image's ENTRYPOINT
and CMD, `describe` says so; without an image a command is still required. Real server on SQLite
and PostgreSQL."""

from __future__ import annotations

import json

from tests.harness.served import Served


def test_an_image_without_a_command_through_the_cli(served: Served) -> None:
    served.ok("org", "create", "acme")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    token = ada["token"]
    image = "registry.example:5000/team/trainer:2.1"
    job = served.ok("submit", "--parsable", "-t", "1h", "--image", image, token=token).strip()
    shown = json.loads(served.ok("describe", job, "-o", "json", token=token))
    assert (shown["command"], shown["image"], shown["name"]) == ([], image, "trainer")
    assert "Command: (the image's ENTRYPOINT and CMD)" in served.ok("describe", job, token=token)
    given = served.ok("submit", "--parsable", "-t", "1h", "--image", image, "--", "python", "x.py",
                      token=token).strip()  # fmt: skip
    assert json.loads(served.ok("describe", given, "-o", "json", token=token))["command"] == [
        "python", "x.py"
    ]  # fmt: skip
    for args in (("-t", "1h"), ("-t", "1h", "-G", "2")):
        refused = served.run("submit", *args, token=token)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.strip().splitlines()[-1] == "Error: Missing argument 'command'."
    listed = json.loads(served.ok("queue", "-o", "json", token=token))
    assert sorted(j["id"] for j in listed) == sorted([int(job), int(given)])
