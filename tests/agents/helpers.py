"""Builders shared by the agent tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from protocol.agent import TaskSpec


def spec(task_id: int = 1, command: list[str] | None = None, **overrides: Any) -> TaskSpec:
    fields: dict[str, Any] = {
        "task_id": task_id,
        "job_id": 100 + task_id,
        "org": "acme",
        "node_rank": 0,
        "num_nodes": 1,
        "gpus": [0],
        "command": ["true"] if command is None else command,
        "time_limit_s": 60,
    }
    fields.update(overrides)
    return TaskSpec(**fields)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
