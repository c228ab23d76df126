"""Dependencies (afterok, afterany, afternotok, singleton) and `fairgpu update`, against the
real server and its scheduling cycle (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.harness.served import Served


def _json(served: Served, *args: str, token: str | None = None) -> Any:
    return json.loads(served.ok(*args, "-o", "json", token=token))


def _submit(served: Served, *args: str, token: str | None = None) -> str:
    return served.ok("submit", "--parsable", "-t", "1h", *args, "--", "x", token=token).strip()


def _reasons(served: Served, job: str, timeout_s: float = 20) -> dict[str, Any]:
    """The job's reasons once a cycle has looked at it: code -> reason."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = _json(served, "explain", job)
        if info["evaluated"] or time.monotonic() > deadline:
            return {r["code"]: r for r in info["reasons"]}
        time.sleep(0.2)


def _wait_reason(served: Served, job: str, check: Any, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not check(reasons := _reasons(served, job)):
        assert time.monotonic() < deadline, reasons
        time.sleep(0.3)
    return reasons


def test_dependency_kinds_and_singleton(served: Served) -> None:
    served.ok("org", "create", "acme")
    first = _submit(served, "-A", "acme", "--hold")
    anyway = _submit(served, "-A", "acme", "-d", f"afterany:{first}")
    failed = _submit(served, "-A", "acme", "--dependency", f"afternotok:{first}")
    ok = _submit(served, "-A", "acme", "--after", first)
    single = _submit(served, "-A", "acme", "-J", "nightly", "-d", "singleton")
    later = _submit(served, "-A", "acme", "-J", "nightly", "-d", "singleton")
    assert _json(served, "describe", anyway)["dependency"] == f"afterany:{first}"
    assert f"Dependency: afternotok:{first}" in served.ok("describe", failed)

    reasons = _wait_reason(served, anyway, lambda r: "Dependency" in r)
    assert reasons["Dependency"]["details"] == {f"afterany:{first}": "PENDING"}
    assert f"afterany:{first} (PENDING)" in served.ok("explain", anyway)
    reasons = _wait_reason(served, later, lambda r: "Dependency" in r)
    assert reasons["Dependency"]["details"] == {f"singleton:{single}": "PENDING"}
    assert "Dependency" not in _reasons(served, single)

    served.ok("cancel", first, single)
    for job in (anyway, failed, later):
        _wait_reason(served, job, lambda r: "Dependency" not in r)
    _wait_reason(served, ok, lambda r: "DependencyNeverSatisfied" in r)

    refused = served.run("submit", "-A", "acme", "--after", first, "--", "x")
    assert refused.exit_code != 0
    assert "can never be met" in refused.stderr
    bad = served.run("submit", "-A", "acme", "-d", "after:1", "--", "x")
    assert bad.exit_code != 0
    assert "bad dependency 'after:1'" in bad.stderr
    unknown = served.run("submit", "-A", "acme", "-d", "afterany:999999", "--", "x")
    assert unknown.exit_code != 0
    assert "unknown job id" in unknown.stderr


def test_update_a_pending_job_and_an_array(served: Served) -> None:
    served.ok("org", "create", "acme")
    ada = _json(served, "user", "create", "ada", "--org", "acme", "--token")["token"]
    job = _submit(served, "-t", "2h", token=ada)
    assert "time limit 1h" in served.ok("update", job, "-t", "1h", "-J", "short", token=ada)
    described = _json(served, "describe", job, token=ada)
    assert (described["time_limit_s"], described["name"]) == (3600, "short")
    raised = served.run("update", job, "-t", "3h", token=ada)
    assert raised.exit_code != 0
    assert "members may only lower" in raised.stderr
    served.ok("update", job, "-t", "3h")  # a platform admin may
    served.ok("update", job, "--hold", token=ada)
    assert _json(served, "describe", job)["held"] is True
    served.ok("update", job, "--release", token=ada)
    assert _json(served, "describe", job)["held"] is False
    events = [e["kind"] for e in _json(served, "describe", job)["events"]]
    assert events.count("job.update") == 2

    array = served.ok(
        "submit", "--parsable", "--array", "0-4", "-t", "2h", "--", "x", token=ada
    ).strip()
    served.ok("cancel", f"{array}_2", token=ada)
    served.ok("update", array, "-t", "30m", "--hold", token=ada)
    tasks = [j for j in _json(served, "queue", "-t", "PD,CA") if j["array_job_id"] == int(array)]
    by_task = {j["array_task_id"]: (j["time_limit_s"], j["held"]) for j in tasks}
    assert by_task == {0: (1800, True), 1: (1800, True), 2: (7200, False), 3: (1800, True),
                       4: (1800, True)}  # fmt: skip
    served.ok("cancel", job)
    ended = served.run("update", job, "-t", "10m")
    assert ended.exit_code != 0
    assert "only pending jobs" in ended.stderr
    nothing = served.run("update", job)
    assert nothing.exit_code == 2
