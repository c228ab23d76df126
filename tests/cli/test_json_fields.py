"""`-o json` stays what docs/CLI.md says: every documented object's fields are exactly the keys
the commands print against the real server (a field added to the API must be documented)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from api.schemas.nodes import UsageRow
from tests.cli.test_commands import register_node
from tests.harness.served import Served

DOC = Path(__file__).resolve().parents[2] / "docs" / "CLI.md"

# What each documented command prints: (object, whether a list of them).
COMMANDS = {
    "fairgpu queue": ("job", True),
    "fairgpu history": ("job", True),
    "fairgpu describe JOB": ("job", False),
    "fairgpu explain JOB": ("explanation", False),
    "fairgpu whoami": ("user", False),
    "fairgpu share": ("share report", False),
    "fairgpu usage": ("usage report", False),
    "fairgpu node list": ("node", True),
}


def documented() -> tuple[list[str], dict[str, dict[str, str]]]:
    """The commands of the `-o json prints` table, and each object's fields with their
    meanings."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Output for people and for scripts", 1)[1]
    objects: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"^### (.+?)\n\n((?:\|.*\n)+)", section, re.MULTILINE):
        rows = [line.split(" | ") for line in match.group(2).splitlines()[2:]]
        objects[match.group(1)] = {row[0].strip("| `"): row[-1] for row in rows}
    commands = re.findall(r"^\| `(fairgpu [^`]+)` \| .*(?:\[|`-o json`)", section, re.MULTILINE)
    return commands, objects


def keys(value: Any) -> set[str]:
    assert isinstance(value, dict), value
    return set(value)


def check(objects: dict[str, dict[str, str]], name: str, printed: dict[str, Any]) -> None:
    fields = set(objects[name])
    missing, undocumented = fields - keys(printed), keys(printed) - fields
    assert not undocumented, f"document {sorted(undocumented)} in docs/CLI.md's `### {name}`"
    assert not missing, f"docs/CLI.md's `### {name}` lists {sorted(missing)}: not printed"


def test_the_doc_lists_every_checked_command() -> None:
    commands, objects = documented()
    assert commands == list(COMMANDS)
    assert {name for name, _ in COMMANDS.values()} <= set(objects)


@pytest.fixture
def printed(served: Served) -> dict[str, Any]:
    """Each command's JSON with something in it: an org, a member, a pending and a cancelled
    job, a registered node."""
    served.ok("org", "create", "acme")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    token = ada["token"]
    held = int(served.ok("submit", "--parsable", "--hold", "-t", "1h", "true", token=token))
    gone = int(served.ok("submit", "--parsable", "--hold", "-t", "1h", "true", token=token))
    served.ok("cancel", str(gone), token=token)
    join = json.loads(served.ok("join-token", "create", "--uses", "1", "-o", "json"))
    register_node(served, join["token"])

    def run(*args: str, as_user: bool = True) -> Any:
        return json.loads(served.ok(*args, "-o", "json", token=token if as_user else None))

    return {
        "fairgpu queue": run("queue"),
        "fairgpu history": run("history"),
        "fairgpu describe JOB": run("describe", str(held)),
        "fairgpu explain JOB": run("explain", str(held)),
        "fairgpu whoami": run("whoami"),
        "fairgpu share": run("share"),
        "fairgpu usage": run("usage"),
        "fairgpu node list": run("node", "list", as_user=False),
    }


def test_json_output_has_exactly_the_documented_fields(printed: dict[str, Any]) -> None:
    _, objects = documented()
    for command, (name, is_list) in COMMANDS.items():
        out = printed[command]
        items = out if is_list else [out]
        assert items, f"{command} printed nothing to check"
        for item in items:
            if command == "fairgpu describe JOB":
                for event in item.pop("events"):
                    check(objects, "event", event)
            check(objects, name, item)

    for share in printed["fairgpu share"]["data"]:
        check(objects, "share", share)
    # No job has run, so no usage yet: the rows are checked against the API's own model.
    rows = printed["fairgpu usage"]["data"] or [dict.fromkeys(UsageRow.model_fields)]
    for row in rows:
        check(objects, "usage row", row)
    gpu_fields = set(re.findall(r"`(\w+)`", objects["node"]["gpus"]))
    for node in printed["fairgpu node list"]:
        for gpu in node["gpus"]:
            assert set(gpu) == gpu_fields, "docs/CLI.md's node `gpus` row lists a GPU's fields"
