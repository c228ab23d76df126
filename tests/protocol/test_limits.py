"""Anything the server accepts can be sent: every valid JobCreate gives a valid TaskSpec."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from api.schemas.jobs import JobCreate
from protocol.agent import TaskSpec
from protocol.limits import (
    MAX_ARGS,
    MAX_COMMAND_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_IMAGE_CHARS,
    MAX_WORKDIR_CHARS,
    SERVER_ENV_VARS,
)
from scheduler.db import Job, Task
from scheduler.secretenv import cipher, generate_key, seal
from scheduler.services.arrays import MAX_ARRAY_TASK_ID, MAX_ARRAY_TASKS
from scheduler.services.jobsubmit import JobSpec, submission_rows
from scheduler.services.scheduling.work import task_spec

# Lengths near every limit, in characters of one, two and four UTF-8 bytes.
_sized = st.builds(
    lambda char, n: char * n,
    st.sampled_from(["a", "é", "\U0001f600", "\x7f"]),
    st.sampled_from([0, 1, 8191, 8192, 8193, 9000, MAX_COMMAND_BYTES // 4, MAX_COMMAND_BYTES]),
)
_text = st.one_of(st.text(max_size=64), _sized)
_good_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,40}", fullmatch=True)
_name = st.one_of(_good_name, _good_name, _good_name, st.text(max_size=8))


def _path_like(most: int) -> st.SearchStrategy[str]:
    """Printable text up to `most` characters, the limit itself often."""
    char = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
    return st.text(char, min_size=1, max_size=8) | st.builds(
        lambda c, n: c * n,
        st.sampled_from(["a", "é", "\U0001f600"]),
        st.sampled_from([most - 1, most]),
    )


# The property is about accepted submissions, so the values are drawn near the limits but
# mostly within them: a body over a limit is only thrown away (other tests check the refusals).
@st.composite
def submissions(draw: st.DrawFn) -> dict[str, Any]:
    args = [draw(st.text(min_size=1, max_size=64) | _sized.filter(bool))]
    args += draw(st.lists(_text, max_size=3))
    args += ["x"] * draw(st.sampled_from([0, 1, MAX_ARGS - len(args)]))
    env = draw(st.dictionaries(_name, _text, max_size=4))
    for i in range(draw(st.sampled_from([0, MAX_ENV_VARS - 8]))):
        env[f"V{i}"] = "v"
    secret_env = draw(st.dictionaries(_name, _text, max_size=3))
    if draw(st.booleans()):  # as many variables as fit, split between the two
        secret_env.update({f"S{i}": "s" for i in range(MAX_ENV_VARS - len(env) - len(secret_env))})
    body: dict[str, Any] = {"command": args, "env": env, "secret_env": secret_env}
    body["workdir"] = draw(st.none() | _path_like(MAX_WORKDIR_CHARS))
    body["image"] = draw(st.none() | _path_like(MAX_IMAGE_CHARS))
    body["time_limit"] = draw(st.none() | st.integers(-1, 2**32))
    # A batch script is sent inside the argv: script and arguments must fit one exec together.
    body["script"] = draw(st.none() | (st.text(max_size=8) | _sized).map("#!/bin/sh\n".__add__))
    body["nodes"] = draw(st.integers(1, 3))
    return body


_CIPHER = cipher(generate_key())


MAX_TASK_ENV_VARS = MAX_ENV_VARS + SERVER_ENV_VARS


def spec_of(create: JobCreate, *, node_rank: int = 0, array: bool = False) -> TaskSpec:
    """The TaskSpec the server builds for a job submitted as `create` (jobs.py, then work.py)."""
    values, _ = submission_rows(
        secret_env_ciphertext=seal(_CIPHER, create.secret_env),
        org_id=7,
        user_id=3,
        actor="user:test",
        spec=JobSpec(**create.spec_fields()),
        idempotency_key=None,
        time_limit_s=create.time_limit or 3600,
        now=datetime.now(UTC),
    )
    job = Job(id=41, **values)
    stats = None
    if array:  # the longest values the server adds: an array's last task, requeued often
        job.array_job_id, job.array_task_id, job.requeue_count = 2**63 - 1, MAX_ARRAY_TASK_ID, 2**31
        stats = (MAX_ARRAY_TASKS, MAX_ARRAY_TASK_ID, MAX_ARRAY_TASK_ID)
    task = Task(id=99, job_id=job.id, attempt=0, node_rank=node_rank)
    gpus = [(i, f"GPU-{i}") for i in range(create.gpus_per_node)]
    return task_spec(
        task,
        job,
        org="acme",
        gpus=gpus,
        master_addr="10.0.0.1",
        secret_cipher=_CIPHER,
        array_stats=stats,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(submissions())
def test_every_accepted_submission_can_be_sent(body: dict[str, Any]) -> None:
    try:
        create = JobCreate.model_validate(body)
    except ValidationError:
        assume(False)
        return
    for rank in range(create.nodes):
        spec = spec_of(create, node_rank=rank)
        restarts = {"FAIRGPU_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": "0"}
        assert spec.env == {**create.env, **create.secret_env, **restarts}
        # What goes over the wire is read back by the agent with the same model.
        assert TaskSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    "body",
    [
        {"command": ["python", "-c", "x" * 9000]},
        {"command": ["python", *["a"] * (MAX_ARGS - 1)]},
        {"command": ["p", "y" * (MAX_COMMAND_BYTES - 4)]},
        {"command": ["p"], "env": {"A": "v" * (MAX_ENV_BYTES - 4)}},
        {"command": ["p"], "env": {f"V{i}": "" for i in range(MAX_ENV_VARS)}},
        {"command": ["p"], "workdir": "/" + "d" * 1023, "image": "i" * 512},
        {
            "command": ["p"],
            "env": {"A": "v" * 9000},
            "secret_env": {"B": "v" * (MAX_ENV_BYTES - 9006)},
        },
        {"command": ["p"], "secret_env": {f"V{i}": "" for i in range(MAX_ENV_VARS)}},
    ],
)
def test_boundary_submissions_can_be_sent(body: dict[str, Any]) -> None:
    spec_of(JobCreate.model_validate({**body, "time_limit": 60}))
    spec = spec_of(JobCreate.model_validate({**body, "time_limit": 60}), array=True)
    assert spec.env["SLURM_ARRAY_TASK_ID"] == str(MAX_ARRAY_TASK_ID)


@pytest.mark.parametrize(
    "body",
    [
        {"command": ["p", "y" * (MAX_COMMAND_BYTES - 2)]},
        {"command": ["p", *["a"] * MAX_ARGS]},
        {"command": ["p"], "env": {"1A": "v"}},
        {"command": ["p"], "env": {f"V{i}": "" for i in range(MAX_TASK_ENV_VARS + 1)}},
        {"command": ["p"], "workdir": "/" + "d" * 1024},
        {"command": ["p"], "time_limit": 2**31},
    ],
)
def test_beyond_the_limits_is_refused_by_both(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobCreate.model_validate({"time_limit": 60, **body})
    spec = {
        "task_id": 1,
        "job_id": 1,
        "node_rank": 0,
        "num_nodes": 1,
        "gpus": [0],
        "command": body["command"],
        "env": body.get("env", {}),
        "workdir": body.get("workdir"),
        "time_limit_s": body.get("time_limit", 60),
    }
    with pytest.raises(ValidationError):
        TaskSpec.model_validate(spec)


@pytest.mark.parametrize(
    "body",
    [
        {"env": {"A": "v" * 9000}, "secret_env": {"B": "v" * (MAX_ENV_BYTES - 9005)}},
        {"env": {"A": ""}, "secret_env": {f"V{i}": "" for i in range(MAX_ENV_VARS)}},
        {"env": {"A": "1"}, "secret_env": {"A": "2"}},
        {"secret_env": {"FAIRGPU_JOB_SECRET": "x"}},
        {"secret_env": {"1A": "v"}},
    ],
)
def test_secret_env_shares_the_environments_limits(body: dict[str, Any]) -> None:
    """env and secret_env are sent as one environment: together they fit its limits."""
    with pytest.raises(ValidationError):
        JobCreate.model_validate({"command": ["p"], "time_limit": 60, **body})
