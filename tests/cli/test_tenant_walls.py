"""The tenant wall from the CLI: `org create --group`, `org update --tenant/--group`, the WALL
column, and what `usage --by user` shows a programme's admin of the companies under it."""

from __future__ import annotations

import json
from typing import Any

from tests.harness.served import Served


def _as_json(served: Served, *args: str, token: str | None = None) -> Any:
    return json.loads(served.ok(*args, "-o", "json", token=token))


def test_org_wall_is_set_and_shown(served: Served) -> None:
    served.ok("org", "create", "startups")
    served.ok("org", "create", "acme", "--parent", "startups")
    served.ok("org", "create", "acme-vision", "--parent", "acme", "--group")
    orgs = {o["name"]: o["tenant"] for o in _as_json(served, "org", "list")}
    assert orgs == {"startups": True, "acme": True, "acme-vision": False}
    wide = served.ok("org", "list", "-o", "wide")
    assert "WALL" in wide
    assert "group" in wide

    served.ok("org", "update", "acme-vision", "--tenant")
    assert _as_json(served, "org", "get", "acme-vision")["tenant"] is True
    served.ok("org", "update", "acme-vision", "--group")
    assert _as_json(served, "org", "get", "acme-vision")["tenant"] is False

    admin = _programme_admin(served)
    refused = served.run("org", "update", "acme", "--group", token=admin)
    assert refused.exit_code != 0
    assert "Traceback" not in refused.stderr


def test_a_programme_admin_sees_a_companys_settings_as_hidden(served: Served) -> None:
    served.ok("org", "create", "startups")
    served.ok("org", "create", "acme", "--parent", "startups")
    served.ok("org", "update", "acme", "--images", "registry.acme.internal/secret-*")
    admin = _programme_admin(served)
    wide = served.ok("org", "list", "-o", "wide", token=admin)
    [acme] = [line for line in wide.splitlines() if " acme " in f"{line} "]
    assert "hidden" in acme
    assert "secret" not in wide
    assert "secret" in served.ok("org", "list", "-o", "wide")  # the platform admin's view


def _programme_admin(served: Served) -> str:
    """A new org admin of `startups` (the programme above the companies): their token."""
    token: str = _as_json(
        served,
        "user",
        "create",
        "prog-admin",
        "--org",
        "startups",
        "--role",
        "org-admin",
        "--token",
    )["token"]
    return token
