"""Per-org limits from the CLI (#14 item 4): `org update --max-priority/--max-pending-jobs`,
shown by `org get` and `org list`, and what a refused `submit` prints."""

from __future__ import annotations

import json
from typing import Any

from tests.cli.test_errors import one_line
from tests.harness.served import Served


def _as_json(served: Served, *args: str, token: str | None = None) -> Any:
    return json.loads(served.ok(*args, "-o", "json", token=token))


def test_org_priority_and_pending_limits(served: Served) -> None:
    served.ok("org", "create", "acme")
    user = _as_json(served, "user", "create", "ada", "--org", "acme", "--token")["token"]
    refused = served.run("submit", "--priority", "high", "-t", "1h", "--", "x", token=user)
    assert refused.exit_code != 0
    assert "priority normal at most" in one_line(refused.stderr)

    served.ok("org", "update", "acme", "--max-priority", "high", "--max-pending-jobs", "1")
    org = _as_json(served, "org", "get", "acme")
    assert (org["max_priority_class"], org["max_pending_jobs"]) == ("high", 1)
    assert "MAX_PRIORITY" in served.ok("org", "list")
    served.ok("submit", "--priority", "high", "-t", "1h", "--", "x", token=user)
    capped = served.run("submit", "-t", "1h", "--", "x", token=user)
    assert capped.exit_code != 0
    assert "pending jobs" in one_line(capped.stderr)

    served.ok("org", "update", "acme", "--max-priority", "default", "--max-pending-jobs", "-1")
    org = _as_json(served, "org", "get", "acme")
    assert org["max_priority_class"] == "normal"
    assert org["max_pending_jobs"] > 1
    bad = served.run("org", "update", "acme", "--max-priority", "urgent")
    assert bad.exit_code != 0


def test_org_interactive_max_time(served: Served) -> None:
    served.ok("org", "create", "prog")
    served.ok("org", "create", "lab", "--parent", "prog")
    served.ok("org", "update", "prog", "--interactive-max-time", "2h")
    assert _as_json(served, "org", "get", "lab")["interactive_max_time_s"] == 7200
    assert "INTERACTIVE_MAX" in served.ok("org", "list", "-o", "wide")
    served.ok("org", "update", "lab", "--interactive-max-time", "3h")
    assert _as_json(served, "org", "get", "lab")["interactive_max_time_s"] == 3 * 3600
    served.ok("org", "update", "lab", "--interactive-max-time", "default")
    assert _as_json(served, "org", "get", "lab")["interactive_max_time_s"] == 7200
    bad = served.run("org", "update", "lab", "--interactive-max-time", "soon")
    assert bad.exit_code != 0
    assert "Traceback" not in bad.stderr
