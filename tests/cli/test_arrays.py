"""Job arrays against the real server (SQLite and PostgreSQL): one submission, `42_7` in every
job route, `cancel 42` for all, the queue's folded rows, `%N` on a real agent."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.services.arrays import MAX_ARRAY_BYTES, MAX_ARRAY_TASKS, parse_array
from tests.harness.served import Served, simulated_agent


def _json(served: Served, *args: str, token: str | None = None) -> Any:
    return json.loads(served.ok(*args, "-o", "json", token=token))


def _elements(served: Served, array_id: str) -> list[dict[str, Any]]:
    jobs = _json(served, "queue", "-t", "PD,R,CF,CD,CA,F")
    return sorted(
        (j for j in jobs if str(j["array_job_id"]) == array_id), key=lambda j: j["array_task_id"]
    )


def test_parse_array() -> None:
    assert parse_array("0-3").task_ids == (0, 1, 2, 3)
    assert parse_array("1,3,5-11:3%2") == parse_array("11,1,3,5,8%2")
    assert parse_array("7%1").limit == 1
    assert len(parse_array(f"1-{MAX_ARRAY_TASKS}").task_ids) == MAX_ARRAY_TASKS
    for bad in ("", "a", "3-1", "1-5:0", "1%0", "1%", f"0-{MAX_ARRAY_TASKS}", "1,,2", "-1"):
        with pytest.raises(ValueError):  # noqa: PT011 (the messages differ by case)
            parse_array(bad)


def test_an_array_is_one_submission_of_many_jobs(served: Served) -> None:
    served.ok("org", "create", "acme")
    array_id = served.ok("submit", "--parsable", "-A", "acme", "--array", "0-5,9%2", "--", "x")
    array_id = array_id.strip()
    elements = _elements(served, array_id)
    assert [j["array_task_id"] for j in elements] == [0, 1, 2, 3, 4, 5, 9]
    assert {j["array_limit"] for j in elements} == {2}
    assert str(elements[0]["id"]) == array_id  # the first element's id names the array
    assert served.ok("queue").count(f"{array_id}_[0-5,9%2]") == 1
    assert json.loads(served.ok("describe", f"{array_id}_9", "-o", "json"))["array_task_id"] == 9
    assert f"Job {array_id}_4: pending" in served.ok("explain", f"{array_id}_4")

    assert f"Cancelled job {array_id}_3" in served.ok("cancel", f"{array_id}_3")
    assert served.ok("hold", array_id).startswith("Held job")
    states = {j["array_task_id"]: (j["state"], j["held"]) for j in _elements(served, array_id)}
    assert states[3] == ("CANCELLED", False)
    assert all(held for task, (state, held) in states.items() if task != 3)
    served.ok("release", array_id)
    assert not any(j["held"] for j in _elements(served, array_id))
    assert f"Cancelled array {array_id}" in served.ok("cancel", array_id)
    assert {j["state"] for j in _elements(served, array_id)} == {"CANCELLED"}
    again = served.run("cancel", array_id)
    assert again.exit_code == 1
    assert "already ended" in again.stderr


def test_bad_array_references_are_refused(served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.admin_token}"}
    for path in ("/v1/jobs/42_x", "/v1/jobs/_7", "/v1/jobs/1_2_3/explain"):
        r = httpx.get(f"{served.url}{path}", headers=headers)
        assert r.status_code == 422, (path, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(f"{served.url}/v1/jobs/42_7", headers=headers).status_code == 404
    bad = served.run("cancel", "42_x")
    assert bad.exit_code == 2
    assert "not a job id" in bad.stderr
    r = httpx.post(
        f"{served.url}/v1/jobs",
        json={"command": ["x"], "array": "0-20000"},
        headers=headers,
    )
    assert r.status_code == 422
    assert "at most 10000" in r.text


def test_an_array_over_the_pending_cap_says_so(served: Served) -> None:
    served.ok("org", "create", "acme")
    served.ok("org", "update", "acme", "--max-pending-jobs", "5")
    refused = served.run("submit", "-A", "acme", "--array", "0-9", "--", "x")
    assert refused.exit_code != 0
    assert "an array of 10 jobs would take org acme to 10 pending jobs" in refused.stderr
    served.ok("submit", "-A", "acme", "--array", "0-4", "--", "x")


def test_an_array_may_not_make_the_server_store_more_than_its_bound(served: Served) -> None:
    """Every task keeps its own copy of the command, environment and script: 5,000 tasks of a
    60 KiB environment would be 300 MiB written from one request of 60 KiB."""
    served.ok("org", "create", "acme")
    headers = {"Authorization": f"Bearer {served.admin_token}"}
    env = {f"V{i}": "x" * 1000 for i in range(60)}  # about 60 KiB per task
    before = len(_json(served, "queue", "-A", "acme", "-t", "PD,CA"))
    r = httpx.post(
        f"{served.url}/v1/jobs",
        json={"command": ["x"], "org": "acme", "env": env, "array": "0-4999"},
        headers=headers,
        timeout=60,  # the array that fits below stores about 32 MiB: slow on a crowded machine
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["max_array_bytes"] == MAX_ARRAY_BYTES
    assert "an array of 5000 tasks would store" in problem["detail"]
    assert len(_json(served, "queue", "-A", "acme", "-t", "PD,CA")) == before  # nothing stored
    fits = MAX_ARRAY_BYTES // problem["task_bytes"]
    assert fits < 5000
    # A token of its own: an array of N jobs takes N submissions (up to the burst) from its
    # token's rate, and the admin's has just spent one on the refused request.
    ada = _json(served, "user", "create", "ada", "--org", "acme", "--token")["token"]
    r = httpx.post(
        f"{served.url}/v1/jobs",
        json={"command": ["x"], "org": "acme", "env": env, "array": f"0-{fits - 1}"},
        headers={"Authorization": f"Bearer {ada}"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    refused = served.run("submit", "-A", "acme", "--array", "0-4999", "--", "x" * 10_000)
    assert refused.exit_code != 0
    assert "MiB of command, environment and script" in refused.stderr
    assert "Traceback" not in refused.stderr


def _wait(what: str, check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def test_tasks_get_their_ids_and_the_limit_holds(served: Served, tmp_path: Path) -> None:
    served.ok("org", "create", "acme")
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "2")
    show = "echo $FAIRGPU_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $FAIRGPU_ARRAY_TASK_COUNT"
    with simulated_agent(served, tmp_path):
        array_id = served.ok(
            "submit", "--parsable", "-A", "acme", "-G", "H100:1", "-t", "5m", "--array", "3-5",
            "--", "sh", "-c", f"{show} $FAIRGPU_ARRAY_TASK_MIN $SLURM_ARRAY_TASK_MAX",
        ).strip()  # fmt: skip
        for task in (3, 4, 5):
            out = served.ok("logs", f"{array_id}_{task}", "-f")
            assert out == f"{array_id} {task} 3 3 5\n"

        # Two free GPUs, but %1: the second task waits for the first.
        slow = served.ok(
            "submit", "--parsable", "-A", "acme", "-G", "H100:1", "-t", "5m", "--array", "0-1%1",
            "--", "sleep", "60",
        ).strip()  # fmt: skip
        _wait("task 0 runs", lambda: _elements(served, slow)[0]["state"] == "RUNNING")

        def throttled() -> bool:
            reasons = _json(served, "explain", f"{slow}_1")["reasons"]
            return [r["code"] for r in reasons] == ["JobArrayTaskLimit"]

        _wait("task 1 waits for the limit", throttled)
        assert _elements(served, slow)[1]["state"] == "PENDING"
        assert "(JobArrayTaskLimit)" in served.ok("queue")
        served.ok("cancel", f"{slow}_0")
        _wait("task 1 starts", lambda: _elements(served, slow)[1]["state"] == "RUNNING")
        served.ok("cancel", slow)
