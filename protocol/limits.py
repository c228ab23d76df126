"""The limits of a job's payload, shared by the submit schema and the agent protocol.

What the server accepts it must be able to send: `api/schemas/jobs.py` (JobCreate) and
`protocol/agent.py` (TaskSpec) build their command, environment, workdir, image and time limit
from these types, so a submission that validates always gives a TaskSpec that validates
(tests/protocol/test_limits.py checks it with hypothesis). The submit schema may add policy on
top (reserved variable names, printable paths); it never loosens these.

Sizes are bytes of UTF-8 unless a name says characters. Linux allows 128 KiB per argument and
about 2 MiB for argv and environment together, so these fit a single exec with room to spare.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

MAX_GPUS_PER_NODE = 64
MAX_ARGS = 256
MAX_COMMAND_BYTES = 64 * 1024
"""argv as exec sees it: every argument's bytes plus its terminating NUL."""
MAX_ENV_VARS = 256
MAX_ENV_NAME_CHARS = 256
MAX_ENV_BYTES = 64 * 1024
"""The environment as exec sees it: NAME=value and a NUL per variable."""
MAX_WORKDIR_CHARS = 1024
MAX_IMAGE_CHARS = 512
MAX_TIME_LIMIT_S = 2**31 - 1  # the jobs.time_limit_s column is an INTEGER
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME = re.compile(ENV_NAME_PATTERN)


def _utf8_bytes(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def check_command(value: list[str]) -> list[str]:
    if value and not value[0]:
        raise ValueError("the program (first argument) must not be empty")
    total = sum(_utf8_bytes(a) + 1 for a in value)
    if total > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {total} bytes; at most {MAX_COMMAND_BYTES}")
    if any("\x00" in a for a in value):
        raise ValueError("arguments must not contain NUL bytes")
    return value


SERVER_ENV_VARS = 16
SERVER_ENV_BYTES = 1024
"""Room a task's environment keeps beyond a job's for the variables the server adds to it
(FAIRGPU_ARRAY_*, FAIRGPU_RESTART_COUNT and their SLURM_* aliases): a job at the limits of its
environment can still be sent."""


def check_env(
    value: dict[str, str], max_vars: int = MAX_ENV_VARS, max_bytes: int = MAX_ENV_BYTES
) -> dict[str, str]:
    if len(value) > max_vars:
        raise ValueError(f"{len(value)} variables; at most {max_vars}")
    total = 0
    for key, val in value.items():
        if not _ENV_NAME.match(key) or len(key) > MAX_ENV_NAME_CHARS:
            raise ValueError(f"bad variable name {key[:64]!r}: [A-Za-z_][A-Za-z0-9_]*")
        if "\x00" in val:
            raise ValueError(f"{key}: values must not contain NUL bytes")
        total += len(key) + _utf8_bytes(val) + 2
    if total > max_bytes:
        raise ValueError(f"environment is {total} bytes; at most {max_bytes}")
    return value


def check_task_env(value: dict[str, str]) -> dict[str, str]:
    return check_env(value, MAX_ENV_VARS + SERVER_ENV_VARS, MAX_ENV_BYTES + SERVER_ENV_BYTES)


def check_env_with_secrets(env: dict[str, str], secret_env: dict[str, str]) -> dict[str, str]:
    """The environment a task is sent: `env` and `secret_env` together, within the limits of
    one environment (each alone is an `Environment`). A name in both is refused, so neither
    silently wins; the message names the variables, never their values."""
    both = sorted(set(env) & set(secret_env))
    if both:
        listed = ", ".join(name[:64] for name in both[:5])
        raise ValueError(f"set in both env and secret_env: {listed}")
    return check_env({**env, **secret_env})


Arg = Annotated[str, Field(max_length=MAX_COMMAND_BYTES)]
Command = Annotated[
    list[Arg], Field(min_length=1, max_length=MAX_ARGS), AfterValidator(check_command)
]
"""argv; the first element is the program."""
ImageCommand = Annotated[list[Arg], Field(max_length=MAX_ARGS), AfterValidator(check_command)]
"""A command, or none (`[]`) where a container image is given: the image's ENTRYPOINT and CMD
then run, as `docker run IMAGE` runs them (agents/imagelaunch.py)."""
Environment = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_ENV_BYTES)]], AfterValidator(check_env)
]
TaskEnvironment = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_ENV_BYTES)]], AfterValidator(check_task_env)
]
"""A task's environment: the job's, and the few variables the server adds."""
Workdir = Annotated[str, Field(min_length=1, max_length=MAX_WORKDIR_CHARS)]
Image = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_CHARS)]
