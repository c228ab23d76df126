"""`describe`'s Restarts line: how often a job was requeued, and after which ends."""

from __future__ import annotations

from cli.jobs import _restarts


def _event(from_state: str | None, to_state: str) -> dict[str, str | None]:
    return {"kind": "job.state", "from_state": from_state, "to_state": to_state}


def test_restarts_name_what_each_requeue_followed() -> None:
    events = [
        _event(None, "PENDING"),
        _event("PENDING", "STARTING"),
        _event("RUNNING", "PREEMPTED"),
        _event("PREEMPTED", "PENDING"),
        _event("RUNNING", "NODE_FAIL"),
        _event("NODE_FAIL", "PENDING"),
        {"kind": "job.hold", "from_state": None, "to_state": None},
    ]
    assert _restarts({"requeue_count": 2}, events) == "2 (after PREEMPTED, NODE_FAIL)"
    assert _restarts({"requeue_count": 0}, events[:2]) == "0"
