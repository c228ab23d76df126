"""The agent's container entrypoint, built once where this checkout lacks it (`make test` and
`make install` build it first; a checkout that only ran `pytest` after pulling it had none, and
every container test failed on the missing helper instead of testing anything)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agents.container import DEFAULT_HELPER


@pytest.fixture(scope="session", autouse=True)
def exec_helper() -> Path:
    if not DEFAULT_HELPER.exists():
        root = Path(__file__).resolve().parents[2]
        subprocess.run(["make", "-s", "helper"], cwd=root, check=True, timeout=300)
    return DEFAULT_HELPER
