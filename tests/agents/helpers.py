"""Builders shared by the agent tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

from protocol.agent import TaskSpec

REQUIRE_DOCKER = os.environ.get("FAIRGPU_REQUIRE_DOCKER") == "1"
"""Set by .ci/run, whose tests/services.sh starts dockerd: a docker test that cannot run there
fails instead of skipping, as FAIRGPU_REQUIRE_POSTGRES does for PostgreSQL."""
REQUIRE_PODMAN = os.environ.get("FAIRGPU_REQUIRE_PODMAN") == "1"
"""Set by .ci/run, whose tests/services.sh installs podman: the same for podman's tests."""


def docker_unusable(why: str, runtime: str = "docker") -> NoReturn:
    """Skip a test that needs docker (or podman), saying why; fail it where that runtime is
    required."""
    message = f"{runtime} is not usable here: {why}"
    variable = "FAIRGPU_REQUIRE_PODMAN" if runtime == "podman" else "FAIRGPU_REQUIRE_DOCKER"
    if REQUIRE_PODMAN if runtime == "podman" else REQUIRE_DOCKER:
        pytest.fail(f"{message} ({variable}=1)")
    pytest.skip(message)


def require_cgroups() -> None:
    """Fail the test where this host's cgroups cannot hold task groups. The probe group is this
    process's own: xdist workers creating and removing one shared name raced on cgroup v2 (one
    removed it between another's mkdir and its write of cgroup.subtree_control: ENOENT, seen
    with 8 workers on a GPU machine's 6.18 kernel)."""
    from agents.cgroups import CgroupError, open_hierarchy

    try:
        open_hierarchy(f"fairgpu-probe-{os.getpid()}").remove()
    except CgroupError as exc:
        pytest.fail(f"this host has no usable cgroups: {exc}")


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
